"""Data-parallel loading as torch's DistributedSampler gives it: every rank the same number of
batches, one order from one seed, the ranks' settings checked against each other, a DDP loop
that reaches the end of its epochs, and torch's own samplers taken as they are."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torchvision.transforms as T
from torch.utils.data.distributed import DistributedSampler

import cifar_fast
from conftest import torchvision_cifar


def index_of(ds):
    """Sample values -> dataset index, to name the samples a batch holds."""
    return {ds[i][0].numpy().tobytes(): i for i in range(len(ds))}


def indices(loader, lookup):
    return [lookup[x.numpy().tobytes()] for xs, _ in loader for x in xs]


@pytest.mark.parametrize("world", [2, 3, 7])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_gets_as_many_batches_as_torch_gives_it(root, world, drop_last):
    ds = cifar_fast.CIFAR10(root, train=True)
    lookup = index_of(ds)
    shards = []
    for rank in range(world):
        loader = cifar_fast.DataLoader(ds, batch_size=2, shuffle=True, seed=5, rank=rank, world_size=world,
                                       drop_last=drop_last)
        sampler = DistributedSampler(range(len(ds)), num_replicas=world, rank=rank, drop_last=drop_last)
        theirs = torch.utils.data.DataLoader(range(len(ds)), batch_size=2, sampler=sampler, drop_last=drop_last)
        assert len(loader) == len(theirs)
        got = indices(loader, lookup)
        assert len(got) == len(sampler) - (len(sampler) % 2 if drop_last else 0)
        shards.append(got)
    flat = [i for s in shards for i in s]
    if not drop_last:
        # Padded as DistributedSampler pads: every sample, and the first few repeated.
        assert set(flat) == set(range(len(ds)))
        assert len(flat) == -(-len(ds) // world) * world
    else:
        assert len(set(flat)) == len(flat)


def test_several_ranks_without_a_seed_or_a_process_group_are_refused(root):
    ds = cifar_fast.CIFAR10(root, train=True)
    with pytest.raises(ValueError, match="seed"):
        cifar_fast.DataLoader(ds, batch_size=4, shuffle=True, rank=0, world_size=2)
    # In order, there is nothing to draw.
    assert len(cifar_fast.DataLoader(ds, batch_size=4, rank=1, world_size=2)) == 13


@pytest.mark.parametrize("epoch", [0, 3])
def test_a_distributed_sampler_given_is_followed_batch_for_batch(root, torchvision_root, epoch):
    ours = cifar_fast.CIFAR10(root, train=True, transform=T.ToTensor())
    theirs = torchvision_cifar(torchvision_root, True, T.ToTensor())
    got, want = [], []
    for ds, make, out in ((ours, cifar_fast.DataLoader, got), (theirs, torch.utils.data.DataLoader, want)):
        sampler = DistributedSampler(ds, num_replicas=3, rank=1, shuffle=True, seed=7)
        loader = make(ds, batch_size=5, sampler=sampler)
        sampler.set_epoch(epoch)
        out += [(x.clone(), y.clone()) for x, y in loader]
    assert len(got) == len(want) == 7
    for (a, b), (c, d) in zip(got, want):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_samplers_and_shuffle_are_exclusive_as_in_torch(root):
    ds = cifar_fast.CIFAR10(root, train=True)
    with pytest.raises(ValueError, match="mutually exclusive"):
        cifar_fast.DataLoader(ds, batch_size=4, shuffle=True, sampler=DistributedSampler(ds, 2, 0))
    with pytest.raises(TypeError, match="sampler"):
        cifar_fast.DataLoader(ds, batch_size=4, sampler=42)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script, world, timeout=180):
    """Runs `script` as `world` ranks of one Gloo group; returns each rank's (returncode, stdout,
    stderr). A rank that hangs fails the test with what it printed."""
    port = free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return outs


DDP_LOOP = """
import json, os, torch, torch.distributed as dist, torch.nn as nn, cifar_fast
dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
rank = dist.get_rank()
torch.manual_seed(100 + rank)  # scripts often seed each rank apart: the loader's order must not follow
ds = cifar_fast.CIFAR10({root!r}, train=True)
lookup = {{ds[i][0].numpy().tobytes(): i for i in range(len(ds))}}
loader = cifar_fast.DataLoader(ds, batch_size=2, shuffle=True, num_workers=1)
model = nn.parallel.DistributedDataParallel(nn.Linear(3 * 32 * 32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
seen = []
for epoch in range(2):
    loader.set_epoch(epoch)
    got = []
    for images, labels in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(images.flatten(1)), labels).backward()
        opt.step()
        got += [lookup[x.numpy().tobytes()] for x in images]
    seen.append(got)
print(json.dumps(dict(len=len(loader), seed=loader.seed, seen=seen)))
dist.destroy_process_group()
"""


def test_a_ddp_loop_over_three_ranks_runs_its_epochs_to_the_end(root):
    outs = run_ranks(DDP_LOOP.format(root=str(root)), 3)
    for code, out, err in outs:
        assert code == 0, err[-3000:]
    results = [json.loads(out) for _, out, _ in outs]
    assert len({r["len"] for r in results}) == 1 and results[0]["len"] == 17  # ceil(ceil(100 / 3) / 2)
    assert len({r["seed"] for r in results}) == 1, "the ranks shuffle with one seed"
    for epoch in range(2):
        flat = [i for r in results for i in r["seen"][epoch]]
        assert len(flat) == 102 and set(flat) == set(range(100))
    assert results[0]["seen"][0] != results[0]["seen"][1], "set_epoch reshuffles"


DISAGREE = """
import os, torch.distributed as dist, cifar_fast
dist.init_process_group("gloo")
rank = dist.get_rank()
ds = cifar_fast.CIFAR10({root!r}, train=True)
try:
    cifar_fast.DataLoader(ds, batch_size=4 if rank == 0 else 8, shuffle=True)
    print("accepted")
except ValueError as e:
    print("refused:", e)
dist.destroy_process_group()
"""


def test_ranks_whose_settings_differ_are_refused_on_every_rank(root):
    outs = run_ranks(DISAGREE.format(root=str(root)), 2)
    for code, out, err in outs:
        assert code == 0, err[-3000:]
        assert out.startswith("refused:") and "batch_size" in out, out
