#!/usr/bin/env python3
"""PyTorch's own data-parallel training, the reference of tools/bench-ddp: the tutorial's net
and data path (torchvision CIFAR10 + DataLoader, as ../shared/bench/seed_baseline.py) under
DistributedDataParallel on the gloo backend, one DistributedSampler shard a rank.

    torchrun --standalone --nproc-per-node 2 tools/ddp_reference.py --root DIR/py \
        [--batch-size 32] [--workers 1] [--steps N] [--threads 1]

--batch-size is each rank's, as in DDP. Rank 0 prints one JSON line: the job's images/s from
the first batch's fetch to the last step's end (all ranks together).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.optim as optim
import torchvision.transforms as transforms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench"))
from seed_baseline import CIFAR10, Net  # noqa: E402  (the reference's own net and dataset)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    transform = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = CIFAR10(root=args.root, train=True, download=False, transform=transform)
    sampler = torch.utils.data.distributed.DistributedSampler(trainset, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(trainset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers)
    net = nn.parallel.DistributedDataParallel(Net())
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)

    dist.barrier()
    images = steps = 0
    t0 = time.perf_counter()
    epoch = 0
    while steps < args.steps:
        sampler.set_epoch(epoch)
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            images += inputs.shape[0] * world
            steps += 1
            if steps >= args.steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"batch_size": args.batch_size, "world": world, "steps": steps,
                          "seconds": round(elapsed, 3), "images_per_s": round(images / elapsed, 1),
                          "torch_threads": torch.get_num_threads()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
