"""Ctrl-C, threads, signal handlers and fork, as a training script meets them: never a lost or
repeated batch, never a hang."""
import itertools
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torchvision.transforms as T

import cifar_fast
from test_distributed import index_of


def run_script(script, timeout=120):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupts_landing_anywhere_in_next_lose_and_repeat_no_batch(root, workers):
    ds = cifar_fast.CIFAR10(root, train=True, transform=T.ToTensor())
    lookup = index_of(ds)
    script = f"""
    import itertools, signal, cifar_fast, torchvision.transforms as T
    ds = cifar_fast.CIFAR10({str(root)!r}, train=True, transform=T.ToTensor())
    loader = cifar_fast.DataLoader(ds, batch_size=3, shuffle=True, num_workers={workers}, seed=2)
    armed = [False]
    def interrupt(*_):
        # Raises only inside the try below (once each time it is armed): the harness itself
        # must not be interrupted where it cannot catch it.
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt
    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    got, interrupts = [], 0
    for epoch in range(3):
        it = iter(loader)
        while True:
            try:
                before = len(got)
                armed[0] = True
                # list.extend runs in C: no handler runs between next() returning and the append,
                # so a batch missing here was lost inside next().
                got.extend(itertools.islice(it, 1))
                armed[0] = False
                if len(got) == before:
                    break
            except KeyboardInterrupt:
                interrupts += 1
        state = loader.state_dict()
        assert (state["epoch"], state["batches_yielded"]) in ((epoch + 1, 0), (epoch, len(loader))), state
    signal.setitimer(signal.ITIMER_REAL, 0)
    import torch
    torch.save(dict(images=[x for x, _ in got], interrupts=interrupts), {str(root / f"int{workers}.pt")!r})
    """
    run_script(script)
    saved = torch.load(root / f"int{workers}.pt")
    assert saved["interrupts"] > 5, "the timer interrupted the loop"
    seen = [lookup[x.numpy().tobytes()] for xs in saved["images"] for x in xs]
    assert len(seen) == 300
    for epoch in range(3):
        assert sorted(seen[epoch * 100:(epoch + 1) * 100]) == list(range(100))


def slow_folder(tmp_path, n, side=1400):
    """An image folder whose images take tens of milliseconds each to decode."""
    import numpy as np
    from PIL import Image
    d = tmp_path / "slow" / "only"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    for i in range(n):
        img.save(d / f"{i}.png", compress_level=1)
    return tmp_path / "slow"


def test_ctrl_c_interrupts_the_first_batch_of_an_inline_loader_and_loses_nothing(tmp_path):
    folder = slow_folder(tmp_path, 8)
    out = run_script(f"""
    import os, signal, threading, time
    import cifar_fast
    ds = cifar_fast.ImageFolder({str(folder)!r}, resize=True)
    loader = cifar_fast.DataLoader(ds, batch_size=4, num_workers=0)
    sent = []
    def interrupt():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)
    it = iter(loader)
    threading.Timer(0.05, interrupt).start()
    try:
        next(it)
        print("no interrupt")
    except KeyboardInterrupt:
        print(time.monotonic() - sent[0])
    rest = list(it)
    print(len(rest), sum(len(y) for _, y in rest))
    """)
    late, batches, samples = out.split()
    assert float(late) < 0.1, f"KeyboardInterrupt {float(late) * 1e3:.0f} ms after SIGINT"
    assert (batches, samples) == ("2", "8"), "the interrupted batch is served whole, after"


def test_two_threads_sharing_an_iterator_serve_each_batch_once(root):
    ds = cifar_fast.CIFAR10(root, train=True, transform=T.ToTensor())
    lookup = index_of(ds)
    for workers in (0, 2):
        it = iter(cifar_fast.DataLoader(ds, batch_size=2, shuffle=True, num_workers=workers, seed=1))
        got = [[], []]

        def take(k):
            for x, _ in it:
                got[k] += [lookup[v.numpy().tobytes()] for v in x]

        threads = [threading.Thread(target=take, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert sorted(got[0] + got[1]) == list(range(100))


def test_a_signal_handler_may_call_the_loaders_methods(tmp_path):
    folder = slow_folder(tmp_path, 12)
    out = run_script(f"""
    import signal, cifar_fast
    ds = cifar_fast.ImageFolder({str(folder)!r}, resize=True)
    loader = cifar_fast.DataLoader(ds, batch_size=2, num_workers=1)
    it = iter(loader)
    calls = []
    def handler(*_):
        calls.append((len(it), len(loader), loader.state_dict()["batches_yielded"]))
        if len(calls) == 5:
            it.close()
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
    n = sum(1 for _ in it)
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(len(calls) >= 5, n < 6, calls[0][1])
    """, timeout=60)
    assert out.split() == ["True", "True", "6"]


def test_a_forked_child_gets_a_clean_error_from_a_live_iterator_and_a_working_loader(root):
    out = run_script(f"""
    import os, sys, cifar_fast
    ds = cifar_fast.CIFAR10({str(root)!r}, train=True)
    loader = cifar_fast.DataLoader(ds, batch_size=10, shuffle=True, num_workers=2, seed=1)
    it = iter(loader)
    next(it)
    pid = os.fork()
    if pid == 0:
        try:
            next(it)
            print("child: next() worked on the parent's iterator")
        except RuntimeError as e:
            print("child error:", "fork" in str(e))
        print("child batches:", len(list(loader)))
        sys.stdout.flush()
        sys.exit(0)  # and the interpreter exits, with the parent's iterator still alive in it
    _, status = os.waitpid(pid, 0)
    print("child exit:", os.waitstatus_to_exitcode(status))
    print("parent rest:", len(list(it)))
    """, timeout=60)
    assert "child error: True" in out
    assert "child batches: 10" in out
    assert "child exit: 0" in out
    assert "parent rest: 9" in out
