"""The DataLoader: the same batches whatever the workers, every sample once, shards, resume,
batches that stay the user's, bounded memory, Ctrl-C, no thread left behind."""
import os
import signal
import threading
import time

import pytest
import torch
import torchvision.transforms as T

import cifar_fast

AUGMENTED = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                       T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])


def epochs(loader, n):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]


def test_batches_are_the_same_for_1_2_and_4_workers(root):
    ds = cifar_fast.CIFAR10(root, train=True, transform=AUGMENTED)
    runs = [epochs(cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, num_workers=w, seed=5), 2)
            for w in (0, 1, 2, 4)]
    for run in runs[1:]:
        for e0, e1 in zip(runs[0], run):
            assert len(e0) == len(e1) == 13
            for (x0, y0), (x1, y1) in zip(e0, e1):
                assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # Shuffled anew each epoch, and augmented anew.
    assert not torch.equal(runs[0][0][0][1], runs[0][1][0][1])


def test_each_epoch_holds_every_sample_once(root):
    ds = cifar_fast.CIFAR10(root, train=True, transform=T.ToTensor())
    loader = cifar_fast.DataLoader(ds, batch_size=7, shuffle=True, num_workers=2, seed=1)
    assert len(loader) == 15
    reference = torch.stack([ds[i][0] for i in range(len(ds))])
    for _ in range(2):
        seen = []
        for images, labels in loader:
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            for x, y in zip(images, labels):
                i = int(((reference - x).abs().flatten(1).max(1).values == 0).nonzero()[0])
                assert ds.targets[i] == int(y)
                seen.append(i)
        assert sorted(seen) == list(range(100))
    in_order = [y for _, ys in cifar_fast.DataLoader(ds, batch_size=32) for y in ys.tolist()]
    assert in_order == ds.targets


def test_drop_last_and_batch_sizes(root):
    ds = cifar_fast.CIFAR10(root, train=True)
    assert [len(y) for _, y in cifar_fast.DataLoader(ds, batch_size=32)] == [32, 32, 32, 4]
    assert [len(y) for _, y in cifar_fast.DataLoader(ds, batch_size=32, drop_last=True)] == [32, 32, 32]
    assert len(cifar_fast.DataLoader(ds, batch_size=32, drop_last=True)) == 3


def test_shards_are_even_and_cover_the_epoch(root):
    ds = cifar_fast.CIFAR10(root, train=True)
    reference = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)

    def indices(rank, world, epoch):
        loader = cifar_fast.DataLoader(ds, batch_size=5, shuffle=True, seed=3, rank=rank, world_size=world)
        loader.set_epoch(epoch)
        return [int((reference == x.flatten()).all(1).nonzero()[0]) for xs, _ in loader for x in xs]

    for world in (2, 3):
        for epoch in (0, 1):
            shards = [indices(r, world, epoch) for r in range(world)]
            flat = [i for s in shards for i in s]
            # As DistributedSampler: every sample, the first few again to even the shards.
            assert set(flat) == set(range(100)) and len(flat) == -(-100 // world) * world, f"world {world}"
            assert len({len(s) for s in shards}) == 1


def test_state_dict_resumes_with_exactly_the_remaining_batches(root):
    ds = cifar_fast.CIFAR10(root, train=True, transform=AUGMENTED)
    torch.manual_seed(11)
    loader = cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, num_workers=2)
    whole = epochs(loader, 2)
    torch.manual_seed(11)
    first = cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, num_workers=2)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    del it
    assert state["epoch"] == 0 and state["batches_yielded"] == 5
    # A new loader with another seed takes the saved one.
    resumed = cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, num_workers=1, seed=99)
    resumed.load_state_dict(state)
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    nxt = [(x.clone(), y.clone()) for x, y in resumed]
    got = [head + rest, nxt]
    for e in range(2):
        assert len(got[e]) == len(whole[e])
        for (a, b), (c, d) in zip(got[e], whole[e]):
            assert torch.equal(a, c) and torch.equal(b, d)
    with pytest.raises(ValueError, match="batch_size"):
        cifar_fast.DataLoader(ds, batch_size=4).load_state_dict(state)


def test_an_early_batch_keeps_its_values(root):
    ds = cifar_fast.CIFAR10(root, train=True, transform=AUGMENTED)
    loader = cifar_fast.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    it = iter(loader)
    images, labels = next(it)
    view = images[1:3]
    array = images.numpy()
    saved = images.clone(), labels.clone(), view.clone(), array.copy()
    for _ in it:
        pass
    for _ in loader:
        pass
    assert torch.equal(images, saved[0]) and torch.equal(labels, saved[1])
    assert torch.equal(view, saved[2]) and (array == saved[3]).all()


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_flat_over_20_epochs(root):
    ds = cifar_fast.CIFAR10(root, train=True, transform=AUGMENTED)
    loader = cifar_fast.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
    kept = []
    for epoch in range(20):
        for i, (x, y) in enumerate(loader):
            if i % 5 == 0:
                kept.append(x)  # some batches outlive their epoch
        kept = kept[-3:]
        if epoch == 4:
            after_warmup = rss()
    assert rss() - after_warmup < 4 << 20, f"grew {(rss() - after_warmup) >> 10} KiB over 15 epochs"


def threads():
    return len(os.listdir("/proc/self/task"))


def settled_threads(want):
    """The thread count once it reaches `want` (within a second): a joined thread's task can
    linger in /proc for a moment after the join returns."""
    deadline = time.monotonic() + 1
    while threads() != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads()


def test_no_thread_is_left_after_an_early_break(root):
    ds = cifar_fast.CIFAR10(root, train=True, transform=AUGMENTED)
    before = threads()
    loader = cifar_fast.DataLoader(ds, batch_size=4, shuffle=True, num_workers=4)
    for i, _ in enumerate(loader):
        assert threads() >= before + 4
        if i == 2:
            break
    assert settled_threads(before) == before
    # Over, and over again: no thread outlives its epoch.
    for _ in loader:
        pass
    assert settled_threads(before) == before


def slow_folder(tmp_path, n):
    """An image folder whose images take long to decode (big PNGs resized to 32x32)."""
    import numpy as np
    from PIL import Image
    d = tmp_path / "slow" / "only"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (1500, 1500, 3), dtype=np.uint8))
    for i in range(n):
        img.save(d / f"{i}.png", compress_level=1)
    return tmp_path / "slow"


def test_ctrl_c_interrupts_a_wait_for_a_batch(tmp_path):
    # In a fresh interpreter: this one's garbage (a collection, an abandoned loader's close)
    # would be timed with it.
    import subprocess
    import sys
    folder = slow_folder(tmp_path, 4)
    script = f"""
import os, signal, threading, time
import cifar_fast
ds = cifar_fast.ImageFolder({str(folder)!r}, resize=True)
loader = cifar_fast.DataLoader(ds, batch_size=4, num_workers=1)
sent = []
def interrupt():
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGINT)
threading.Timer(0.05, interrupt).start()
try:
    for _ in loader:
        print("batch first")
except KeyboardInterrupt:
    print(time.monotonic() - sent[0])
# The interpreter, and the loader, go on.
print(len(list(loader)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    late, batches = out.stdout.split()
    assert float(late) < 0.1, f"KeyboardInterrupt {float(late) * 1e3:.0f} ms after SIGINT"
    assert batches == "1"


def test_pin_memory_pins_with_cuda_and_warns_once_without(root):
    import warnings
    ds = cifar_fast.CIFAR10(root, train=False, transform=T.ToTensor())
    cifar_fast._loader._PIN_WARNED = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaders = [cifar_fast.DataLoader(ds, batch_size=10, pin_memory=True) for _ in range(2)]
        images, labels = next(iter(loaders[1]))
    pin_warnings = [w for w in caught if "pin_memory" in str(w.message)]
    if torch.cuda.is_available():
        assert not pin_warnings and images.is_pinned() and labels.is_pinned()
    else:
        assert len(pin_warnings) == 1 and not images.is_pinned()
    assert torch.equal(images[0], ds[0][0])


def test_under_torch_distributed_each_rank_takes_its_shard(root, tmp_path):
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = f"""
import json, sys, torch.distributed as dist, cifar_fast
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
ds = cifar_fast.CIFAR10({str(root)!r}, train=True)
loader = cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, seed=4)
labels = [y for _, ys in loader for y in ys.tolist()]
print(json.dumps([loader.rank, loader.world_size, len(loader), labels]))
dist.destroy_process_group()
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], stdout=subprocess.PIPE, text=True)
             for r in (0, 1)]
    import json
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [o[:3] for o in outs] == [[0, 2, 7], [1, 2, 7]]
    ds = cifar_fast.CIFAR10(root, train=True)
    assert sorted(outs[0][3] + outs[1][3]) == sorted(ds.targets)
    assert len(outs[0][3]) == len(outs[1][3]) == 50


def test_keeping_every_batch_grows_the_pool_and_changes_none(root):
    ds = cifar_fast.CIFAR10(root, train=True, transform=AUGMENTED)
    want = epochs(cifar_fast.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, seed=8), 2)
    loader = cifar_fast.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, seed=8)
    kept = [list(loader) for _ in range(2)]  # every batch held: 50, far past the pool
    ptrs = {x.data_ptr() for e in kept for x, _ in e}
    assert len(ptrs) == 50
    for got, exp in zip(kept, want):
        for (a, b), (c, d) in zip(got, exp):
            assert torch.equal(a, c) and torch.equal(b, d)
