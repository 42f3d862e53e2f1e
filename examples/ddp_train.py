"""Data-parallel training from Python, launched as PyTorch scripts are: each rank builds the
same `cifar_fast.DataLoader`, which takes its shard of every epoch as `DistributedSampler`
would (the same number of batches on every rank, one seed for all), and DDP averages the
gradients over Gloo.

    torchrun --nproc-per-node 2 examples/ddp_train.py            # ./data, 1 epoch
    torchrun --nproc-per-node 2 examples/ddp_train.py --epochs 5 --batch-size 64
"""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as transforms

import cifar_fast

parser = argparse.ArgumentParser()
parser.add_argument("--root", default="./data")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

dist.init_process_group("gloo")  # torchrun gives RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
rank = dist.get_rank()

transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
# Every rank asks for the data; one prepares it, the others wait for it.
trainset = cifar_fast.CIFAR10(root=args.root, train=True, download=True, transform=transform)
loader = cifar_fast.DataLoader(trainset, batch_size=args.batch_size, shuffle=True, num_workers=2)

model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

for epoch in range(args.epochs):
    loader.set_epoch(epoch)
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    if rank == 0:
        print(f"epoch {epoch}: {len(loader)} steps on each of {dist.get_world_size()} ranks, last loss {loss.item():.3f}")

dist.destroy_process_group()
