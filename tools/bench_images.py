"""One measurement of images of every size, one JSON line out; `tools/bench.py images` runs these
interleaved and makes the table.

    python tools/bench_images.py loader --impl ours|ours-file|torch --transform rrc|center
        [--dtype float|uint8] --root FOLDER [--file ENCODED] --batch-size B --workers W --images N
    python tools/bench_images.py bound --root FOLDER --workers W --images N

`loader`: batches alone (each touched once): images/s, the time from the DataLoader's
construction to its first batch, and the resident memory beyond the page cache (anonymous pages,
the peak of this process and its workers, sampled). `bound`: Pillow decoding the same files
whole (`Image.open(f).convert("RGB")`) in `W` processes and nothing else: what any loader that
decodes whole images with Pillow can reach on these cores.
"""
import argparse
import json
import multiprocessing
import os
import sys
import threading
import time

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

import cifar_fast

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def transform(name, dtype, lib):
    geometry = {
        "rrc": [lib.RandomResizedCrop(224), lib.RandomHorizontalFlip()],
        "center": [lib.Resize(256), lib.CenterCrop(224)],
    }[name]
    tail = [lib.PILToTensor()] if dtype == "uint8" else [lib.ToTensor(), lib.Normalize(MEAN, STD)]
    return lib.Compose(geometry + tail)


def anon_kb(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def run_loader(args):
    if args.impl == "torch":
        ds = torchvision.datasets.ImageFolder(args.root, transform=transform(args.transform, args.dtype, T))
        make = lambda: torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                                   num_workers=args.workers)
    else:
        t = transform(args.transform, args.dtype, T)
        ds = (cifar_fast.TensorFile(args.file, transform=t) if args.impl == "ours-file"
              else cifar_fast.ImageFolder(args.root, transform=t))
        make = lambda: cifar_fast.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.workers)
    peak = [0]
    done = threading.Event()

    def sample():
        me = os.getpid()
        while not done.wait(0.05):
            peak[0] = max(peak[0], anon_kb([me, *children(me)]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    dl = make()
    n, first = 0, None
    while n < args.images:
        for images, labels in dl:
            if first is None:
                first = time.perf_counter() - t0
            n += len(labels)
            if n >= args.images:
                break
    secs = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"images_per_s": n / secs, "first_batch_ms": 1e3 * first, "anon_mb": peak[0] / 1024,
            "dtype": str(images.dtype)}


def decode(path):
    with Image.open(path) as im:
        im.convert("RGB")
    return 1


def run_bound(args):
    files = [p for p, _ in torchvision.datasets.ImageFolder(args.root).samples][: args.images]
    with multiprocessing.Pool(args.workers) as pool:
        pool.map(decode, files[: 2 * args.workers])
        t0 = time.perf_counter()
        n = sum(pool.imap_unordered(decode, files, chunksize=16))
        secs = time.perf_counter() - t0
    return {"images_per_s": n / secs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["loader", "bound"])
    ap.add_argument("--impl", choices=["ours", "ours-file", "torch"], default="ours")
    ap.add_argument("--transform", choices=["rrc", "center"], default="rrc")
    ap.add_argument("--dtype", choices=["float", "uint8"], default="float")
    ap.add_argument("--root", required=True)
    ap.add_argument("--file")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=4096)
    args = ap.parse_args()
    print(json.dumps(run_loader(args) if args.what == "loader" else run_bound(args)))


if __name__ == "__main__":
    sys.exit(main())
