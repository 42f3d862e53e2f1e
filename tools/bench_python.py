"""One measurement of the Python package, one JSON line out; `tools/bench.py python` runs these
interleaved and makes the tables.

    python tools/bench_python.py loader --impl ours|torch --batch-size B [--workers W] --images N --data DIR
    python tools/bench_python.py loop --impl ours|torch --batch-size B --steps N [--blocks K] --data DIR

`loader`: batches alone (each touched once), images/s and the time from the DataLoader's
construction to its first batch. `loop`: the tutorial's training loop (its net, SGD lr 0.001
momentum 0.9, two torch threads, CPU) over the loader, with the share of the loop's time spent
waiting for the next batch. `--impl ours` also runs the same loop over batches already in memory
(the bound), in the same process and on the same net, in `K` blocks alternating with the
loader's (ABBA...), so that each share of the bound compares steps taken seconds apart: this
machine's speed drifts between runs by more than the difference measured.
"""
import argparse
import json
import os
import sys
import time
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T

import cifar_fast

TUTORIAL = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def loader(args):
    if args.impl == "ours":
        ds = cifar_fast.CIFAR10(args.data, train=True, transform=TUTORIAL)
        make = lambda: cifar_fast.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.workers)
    else:
        # torchvision over the same images (the python tarball, extracted; md5s are not the
        # official ones, so its integrity check is passed over).
        with mock.patch("torchvision.datasets.cifar.check_integrity", return_value=True):
            ds = torchvision.datasets.CIFAR10(os.path.join(args.data, "py"), train=True, transform=TUTORIAL)
        make = lambda: torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                                   num_workers=args.workers)
    return ds, make


def run_loader(args):
    _, make = loader(args)
    t0 = time.perf_counter()
    dl = make()
    n = 0
    first = None
    while n < args.images:
        for images, labels in dl:
            if first is None:
                first = time.perf_counter() - t0
            n += len(labels)
            if n >= args.images:
                break
    secs = time.perf_counter() - t0
    return {"images_per_s": n / secs, "first_batch_ms": 1e3 * first}


def run_loop(args):
    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    _, make = loader(args)

    def endless(source):
        while True:
            yield from source()

    def steps(batches, n):
        """`n` steps of the tutorial's loop: seconds taken, seconds waiting for batches."""
        waited = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            w = time.perf_counter()
            inputs, labels = next(batches)
            waited += time.perf_counter() - w
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            loss.item()
        return time.perf_counter() - t0, waited

    dl = make()
    if args.impl == "torch":
        secs, waited = steps(endless(lambda: iter(dl)), args.steps)
        return {"images_per_s": args.steps * args.batch_size / secs, "data_wait_share": waited / secs}
    block = max(1, args.steps // args.blocks)
    # The bound's batches: one block's worth from the same loader, copied out and cycled.
    memory = [(x.clone(), y.clone()) for _, (x, y) in zip(range(block), make())]
    sources = {"ours": endless(lambda: iter(dl)), "memory": endless(lambda: iter(memory))}
    for batches in sources.values():
        steps(batches, 20)  # torch's first calls, untimed for both
    spent = {name: [0.0, 0.0] for name in sources}
    for k in range(args.blocks):
        for name in ("ours", "memory") if k % 4 in (0, 3) else ("memory", "ours"):
            secs, waited = steps(sources[name], block)
            spent[name][0] += secs
            spent[name][1] += waited
    images = args.blocks * block * args.batch_size
    return {"images_per_s": images / spent["ours"][0], "data_wait_share": spent["ours"][1] / spent["ours"][0],
            "bound_images_per_s": images / spent["memory"][0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["loader", "loop"])
    ap.add_argument("--impl", required=True, choices=["ours", "torch"])
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=100000)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    print(json.dumps(run_loader(args) if args.what == "loader" else run_loop(args)))


if __name__ == "__main__":
    sys.exit(main())
