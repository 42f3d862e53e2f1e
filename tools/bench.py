"""Benchmark driver behind tools/bench-prep, tools/bench-loader and tools/bench-train.

Runs each contender in turn, `--reps` times round-robin (so that a slow moment of this shared
machine hits all of them alike), and prints medians and ratios as a markdown table.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
REFERENCE = os.path.join(SHARED, "bench", "seed_baseline.py")
RELEASE = os.path.join(ROOT, "target", "release")


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def timed(cmd, **kw):
    t = time.perf_counter()
    sh(cmd, **kw)
    return time.perf_counter() - t


def json_line(cmd, **kw):
    out = sh(cmd, **kw).stdout.strip().splitlines()
    return json.loads(out[-1])


def ensure_data(data):
    """The full real tarballs, the extracted python and binary batches, the tensor files."""
    os.makedirs(data, exist_ok=True)
    if not os.path.exists(os.path.join(data, "cifar-10-binary.tar.gz")):
        sh([sys.executable, os.path.join(SHARED, "tools", "make-cifar-tarballs.py"), data])
    for sub, tgz in (("py", "cifar-10-python.tar.gz"), ("bin", "cifar-10-binary.tar.gz")):
        if not os.path.isdir(os.path.join(data, sub)):
            os.makedirs(os.path.join(data, sub))
            sh(["tar", "xzf", os.path.join(data, tgz), "-C", os.path.join(data, sub)])
    sh([os.path.join(RELEASE, "cifar-prep"), os.path.join(data, "cifar-10-binary.tar.gz"), "--out", data])


def last_json(path):
    """The last line of a JSON-lines file (cifar-train's metrics: the summary)."""
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def interleaved(contenders, reps, batch_sizes):
    """Each (contender, batch size)'s results over `reps` rounds, each contender run after the
    others in turn: whatever one leaves behind (a warm or busy machine) falls on each alike."""
    rows = {}
    for rep in range(reps):
        k = rep % len(contenders)
        for b in batch_sizes:
            for name, run in contenders[k:] + contenders[:k]:
                rows.setdefault((name, b), []).append(run(b))
    return rows


def field(rows, name, b, key="images_per_s"):
    return [r[key] for r in rows[(name, b)]]


def ratio(num, den):
    """The median of the ratios within each rep (runs seconds apart): this machine's speed
    drifts between reps by more than the differences measured."""
    return median([n / d for n, d in zip(num, den)])


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def median(xs):
    return statistics.median(xs)


def bench_prep(args):
    if args.part in ("all", "cifar"):
        bench_prep_cifar(args)
    if args.part in ("all", "folder"):
        bench_prep_folder(args)


def bench_prep_folder(args):
    """The 60,000 real JPEGs into tensor files, beside torchvision's ImageFolder + DataLoader
    reading the same folder once."""
    data = args.data
    os.makedirs(data, exist_ok=True)
    tgz = os.path.join(SHARED, "data", "cifar-10-jpeg.tar.gz")
    folder = os.path.join(data, "jpeg")
    if not os.path.isdir(os.path.join(folder, "cifar-10-jpeg")):
        os.makedirs(folder, exist_ok=True)
        sh(["tar", "xzf", tgz, "-C", folder])
    root = os.path.join(folder, "cifar-10-jpeg")
    out = tempfile.mkdtemp(dir=data, prefix="bench-prep-folder-")
    prep = os.path.join(RELEASE, "cifar-prep")
    from_tgz = [prep, tgz, "--out", out, "--force"]
    from_dir = [prep, root, "--out", out, "--force"]
    tv = ("import sys, torch, torchvision, torchvision.transforms as T\n"
          "tf = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])\n"
          "n = 0\n"
          "for split in ('train', 'test'):\n"
          "    ds = torchvision.datasets.ImageFolder(sys.argv[1] + '/' + split, transform=tf)\n"
          "    for x, y in torch.utils.data.DataLoader(ds, batch_size=256, num_workers=2):\n"
          "        n += len(y)\n"
          "assert n == 60000, n\n")
    runs = {"tgz": [], "dir": [], "torchvision": []}
    for rep in range(args.reps):
        warm(tgz)
        order = ["tgz", "dir", "torchvision"]
        order = order[rep % 3:] + order[:rep % 3]
        for what in order:
            if what == "tgz":
                runs["tgz"].append(timed(from_tgz))
            elif what == "dir":
                runs["dir"].append(timed(from_dir))
            else:
                runs["torchvision"].append(timed([sys.executable, "-c", tv, root]))
    shutil.rmtree(out)
    med = {k: median(v) for k, v in runs.items()}
    ref = med["torchvision"]
    print(f"\n{args.reps} runs each (order rotated), medians: 60,000 JPEGs (32x32) into f32 tensor files\n")
    print("| what | seconds (median) | × faster than the reference |")
    print("|---|---:|---:|")
    print(f"| `cifar-prep cifar-10-jpeg.tar.gz --force` (the archive) | {med['tgz']:.2f} | {ref / med['tgz']:.1f}× |")
    print(f"| `cifar-prep cifar-10-jpeg/ --force` (the extracted folder) | {med['dir']:.2f} | {ref / med['dir']:.1f}× |")
    print(f"| reference: torchvision `ImageFolder` + `DataLoader(num_workers=2)`, one pass over the folder | {ref:.2f} | 1.0× |")
    print("\nall runs:", json.dumps({k: [round(x, 3) for x in v] for k, v in runs.items()}))


def bench_prep_cifar(args):
    data = args.data
    ensure_data(data)
    tgz = os.path.join(data, "cifar-10-binary.tar.gz")
    out = tempfile.mkdtemp(dir=data, prefix="bench-prep-")
    prep = [os.path.join(RELEASE, "cifar-prep"), tgz, "--out", out, "--force"]
    sh(prep)
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    mb = (written + (1 << 20) - 1) >> 20
    tv = ("import torchvision, sys\n"
          "class C(torchvision.datasets.CIFAR10):\n"
          "    def _check_integrity(self): return True\n"
          "    def _load_meta(self): self.classes = list(range(10))\n"
          "C(sys.argv[1], train=True); C(sys.argv[1], train=False)\n")
    runs = {"cifar-prep": [], "gzip -dc": [], "dd": [], "torchvision": []}
    for _ in range(args.reps):
        warm(tgz)
        runs["cifar-prep"].append(timed(prep))
        runs["gzip -dc"].append(timed(["sh", "-c", f"gzip -dc {tgz} >/dev/null"]))
        runs["dd"].append(timed(["dd", "if=/dev/zero", f"of={out}/dd.bin", "bs=1M", f"count={mb}", "conv=fsync"]))
        os.remove(f"{out}/dd.bin")
        runs["torchvision"].append(timed([sys.executable, "-c", tv, os.path.join(data, "py")]))
    shutil.rmtree(out)
    med = {k: median(v) for k, v in runs.items()}
    bound = max(med["gzip -dc"], med["dd"])
    print(f"\n{args.reps} runs each, medians; cifar-prep writes {written / 1e6:.0f} MB (f32 train + test)\n")
    print("| what | seconds (median) | × the larger bound |")
    print("|---|---:|---:|")
    print(f"| `cifar-prep cifar-10-binary.tar.gz --force` | {med['cifar-prep']:.2f} | {med['cifar-prep'] / bound:.2f} |")
    print(f"| bound: `gzip -dc` of the same file | {med['gzip -dc']:.2f} | {med['gzip -dc'] / bound:.2f} |")
    print(f"| bound: `dd if=/dev/zero bs=1M count={mb} conv=fsync` | {med['dd']:.2f} | {med['dd'] / bound:.2f} |")
    print(f"| torchvision `CIFAR10(train=True)` + `(train=False)` | {med['torchvision']:.2f} | {med['torchvision'] / bound:.2f} |")
    print("\nall runs:", json.dumps({k: [round(x, 3) for x in v] for k, v in runs.items()}))


def bench_loader(args):
    data = args.data
    ensure_data(data)
    exe = bench_exe("loader")
    warm(os.path.join(data, "cifar10-train.safetensors"))
    rows = {}

    def add(key, result):
        rows.setdefault(key, []).append(result)

    for rep in range(args.reps):
        for b in args.batch_sizes:
            # About a second or more of work for each contender, whatever its speed.
            ref_images = {4: 8000, 32: 16000}.get(b, 24000)
            for w in args.workers:
                runs = [("reference", [sys.executable, REFERENCE, "--root", os.path.join(data, "py"),
                                       "--batch-size", str(b), "--workers", str(w), "--mode", "load",
                                       "--steps", str(ref_images // b), "--json"]),
                        ("loader", [exe, "--data", data, "--mode", "loader", "--batch-size", str(b),
                                    "--workers", str(w), "--images", str(args.images)])]
                if args.baseline:
                    # Another build of this benchmark (an earlier commit's), run beside this one.
                    runs.append(("before", [os.path.abspath(args.baseline), *runs[1][1][1:]]))
                # Rotated each rep: what one run leaves behind (the reference's exiting worker
                # processes, a warm cache) falls on each contender alike.
                k = rep % len(runs)
                for name, cmd in runs[k:] + runs[:k]:
                    add((name, b, w), json_line(cmd))
            add(("tchrs", b, 0), json_line([exe, "--data", data, "--mode", "tchrs", "--batch-size", str(b),
                                            "--images", str(args.images)]))
            add(("memcpy", b, 0), json_line([exe, "--data", data, "--mode", "memcpy", "--batch-size", str(b),
                                             "--images", str(args.images)]))
    med = {k: median([r["images_per_s"] for r in v]) for k, v in rows.items()}
    print(f"\nimages/s, median of {args.reps} runs; the reference is `seed_baseline.py --mode load`\n")
    print("| B | workers | reference | this loader | × reference | tch-rs load_dir + Iter2 | × tch-rs | memcpy bound | % of bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        for w in args.workers:
            ref, ours, tr, mc = med[("reference", b, w)], med[("loader", b, w)], med[("tchrs", b, 0)], med[("memcpy", b, 0)]
            print(f"| {b} | {w} | {ref:,.0f} | {ours:,.0f} | {ours / ref:,.0f}× | {tr:,.0f} | {ours / tr:.1f}× | {mc:,.0f} | {100 * ours / mc:.0f}% |")
    first = {k: median([r["first_batch_ms"] for r in v]) for k, v in rows.items() if k[0] in ("loader", "tchrs")}
    rss = {k: max(r["rss_anon_mb"] for r in v) for k, v in rows.items() if k[0] in ("loader", "tchrs")}
    print("\n| B | workers | loader: open → first batch (ms) | loader: heap beyond page cache (MB) | prefetch × batch bytes + 32 MB | tch-rs: load (ms) | tch-rs heap (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        for w in args.workers:
            budget = 4 * b * 3072 * 4 / 1e6 + 32
            print(f"| {b} | {w} | {first[('loader', b, w)]:.1f} | {rss[('loader', b, w)]:.1f} | {budget:.1f} | "
                  f"{first[('tchrs', b, 0)]:.0f} | {rss[('tchrs', b, 0)]:.0f} |")
    if args.baseline:
        print(f"\nthis loader against `{args.baseline}`, the same runs (images/s, median of {args.reps})\n")
        print("| B | workers | before | after | after ÷ before |")
        print("|---:|---:|---:|---:|---:|")
        for b in args.batch_sizes:
            for w in args.workers:
                after = [r["images_per_s"] for r in rows[("loader", b, w)]]
                before = [r["images_per_s"] for r in rows[("before", b, w)]]
                print(f"| {b} | {w} | {median(before):,.0f} | {median(after):,.0f} | {ratio(after, before):.3f} |")
    print("\nall runs:", json.dumps({"/".join(map(str, k)): [r["images_per_s"] for r in v] for k, v in rows.items()}))


def bench_exe(name):
    sh(["cargo", "bench", "--no-run", "--bench", name], cwd=ROOT)
    exe = sh(["sh", "-c", f"ls -t target/release/deps/{name}-* | grep -v '\\.d$' | head -1"], cwd=ROOT).stdout.strip()
    return os.path.join(ROOT, exe)


def bench_train(args):
    """cifar-train vs the reference's training, and the in-memory step as the bound."""
    data = args.data
    ensure_data(data)
    step_exe = bench_exe("step")
    warm(os.path.join(data, "cifar10-train.safetensors"))
    ref_steps = {4: 1500, 32: 300, 256: 40}
    our_steps = {4: 5000, 32: 1200, 256: 150}
    metrics = os.path.join(tempfile.mkdtemp(), "m.jsonl")

    def reference(b):
        return json_line([sys.executable, REFERENCE, "--root", os.path.join(data, "py"), "--batch-size", str(b),
                          "--workers", "1", "--steps", str(ref_steps.get(b, 40)), "--json"])

    def ours(b, exe=os.path.join(RELEASE, "cifar-train")):
        sh([exe, "--data", data, "--device", "cpu", "--batch-size", str(b),
            "--workers", str(args.workers[0]), "--epochs", "1", "--max-steps", str(our_steps.get(b, 150)),
            "--metrics", metrics])
        return last_json(metrics)

    def bound(b):
        return json_line([step_exe, "--batch-size", str(b), "--steps", str(our_steps.get(b, 150))])

    contenders = [("reference", reference), ("ours", ours), ("bound", bound)]
    if args.baseline:
        # Another build of cifar-train (an earlier commit's), interleaved with the rest.
        contenders.append(("before", lambda b: ours(b, os.path.abspath(args.baseline))))
    rows = interleaved(contenders, args.reps, args.batch_sizes)

    def values(name, b, key="images_per_s"):
        return field(rows, name, b, key)

    med = {k: median(values(*k)) for k in rows}
    wait = {b: median(values("ours", b, "data_wait_share")) for b in args.batch_sizes}
    # The bound times its steps after 20 untimed warm-up steps: set it against our steps after
    # the first, while "× reference" sets whole runs (start-up and all) side by side.
    steady = {b: median(values("ours", b, "steady_images_per_s")) for b in args.batch_sizes}
    first = {b: median(values("ours", b, "first_step_seconds")) for b in args.batch_sizes}
    threads = rows[("reference", args.batch_sizes[0])][0]["torch_threads"]
    print(f"\nCPU training images/s, median of {args.reps} runs; {threads} torch threads for both; "
          f"reference: `seed_baseline.py --workers 1`, cifar-train: `--workers {args.workers[0]}`; "
          "ratios: median of the ratios within each rep\n")
    print("| B | reference | cifar-train | × reference | data wait (share of step) | first step | after it | in-memory step (bound) | % of bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        x_ref = ratio(values("ours", b), values("reference", b))
        of_bound = ratio(values("ours", b, "steady_images_per_s"), values("bound", b))
        print(f"| {b} | {med[('reference', b)]:,.0f} | {med[('ours', b)]:,.0f} | {x_ref:.1f}× | {100 * wait[b]:.2f}% "
              f"| {1e3 * first[b]:.0f} ms | {steady[b]:,.0f} | {med[('bound', b)]:,.0f} | {100 * of_bound:.0f}% |")
    if args.baseline:
        print(f"\nthis build against `{args.baseline}`, the same runs (images/s, median of {args.reps})\n")
        print("| B | before | after | after ÷ before |")
        print("|---:|---:|---:|---:|")
        for b in args.batch_sizes:
            print(f"| {b} | {med[('before', b)]:,.0f} | {med[('ours', b)]:,.0f} "
                  f"| {ratio(values('ours', b), values('before', b)):.3f} |")
    print("\nall runs:", json.dumps({"/".join(map(str, k)): [round(r["images_per_s"]) for r in v] for k, v in rows.items()}))
    print("after the first step:", json.dumps({b: [round(v) for v in values("ours", b, "steady_images_per_s")]
                                                for b in args.batch_sizes}))


def bench_busy(args):
    """cifar-train on a quiet machine and beside one busy process (a loop on one core), its
    default thread choice against a fixed count of all cores, with the reference beside."""
    data = args.data
    ensure_data(data)
    warm(os.path.join(data, "cifar10-train.safetensors"))
    cores = os.cpu_count()
    ref_steps = {4: 1500, 32: 300}
    our_steps = {4: 5000, 32: 1200}
    metrics = os.path.join(tempfile.mkdtemp(), "m.jsonl")
    batch_sizes = [b for b in args.batch_sizes if b in our_steps] or [4, 32]

    def ours(b, extra):
        sh([os.path.join(RELEASE, "cifar-train"), "--data", data, "--device", "cpu", "--batch-size", str(b),
            "--epochs", "1", "--max-steps", str(our_steps[b]), "--no-eval", "--metrics", metrics] + extra)
        return last_json(metrics)["steady_images_per_s"]

    def reference(b):
        return json_line([sys.executable, REFERENCE, "--root", os.path.join(data, "py"), "--batch-size", str(b),
                          "--workers", "1", "--steps", str(ref_steps[b]), "--json"])["images_per_s"]

    contenders = [("default", lambda b: ours(b, [])),
                  (f"--threads {cores}", lambda b: ours(b, ["--threads", str(cores)])),
                  ("reference", reference)]
    rows = {}
    for rep in range(args.reps):
        for b in batch_sizes:
            for busy in ([False, True] if rep % 2 == 0 else [True, False]):
                hog = subprocess.Popen(["sh", "-c", "while :; do :; done"]) if busy else None
                try:
                    if hog:
                        time.sleep(0.5)
                    for name, run in contenders[rep % 3:] + contenders[:rep % 3]:
                        rows.setdefault((name, b, busy), []).append(run(b))
                finally:
                    if hog:
                        hog.kill()
                        hog.wait()
    print(f"\nTraining images/s (after the first step), median of {args.reps} reps, quiet and beside one "
          f"busy process (`sh -c 'while :; do :; done'`, started 0.5 s before), interleaved; {cores} cores\n")
    print("| B | contender | quiet | busy | busy ÷ quiet (median within reps) | quiet ÷ default's quiet |")
    print("|---:|---|---:|---:|---:|---:|")
    for b in batch_sizes:
        for name, _ in contenders:
            q, z = rows[(name, b, False)], rows[(name, b, True)]
            kept = median([y / x for x, y in zip(q, z)])
            vs = median([x / d for x, d in zip(q, rows[("default", b, False)])])
            print(f"| {b} | {name} | {median(q):,.0f} | {median(z):,.0f} | {100 * kept:.0f}% | {100 * vs:.0f}% |")
    print("\nall runs:", json.dumps({f"{n}/{b}/{'busy' if z else 'quiet'}": [round(v) for v in r]
                                    for (n, b, z), r in rows.items()}))


def bench_accuracy(args):
    """The tutorial's settings (SGD lr 0.001 momentum 0.9, no augmentation) for 10 epochs at
    each batch size (default 4 and 32): the test accuracy of the reference and of cifar-train,
    one run each, one after the other."""
    data = args.data
    ensure_data(data)
    rows = []
    for b in args.batch_sizes:
        t = time.perf_counter()
        ref = json_line([sys.executable, REFERENCE, "--root", os.path.join(data, "py"), "--batch-size", str(b),
                         "--epochs", str(args.epochs), "--json"])
        ref_s = time.perf_counter() - t
        metrics = os.path.join(tempfile.mkdtemp(), "m.jsonl")
        t = time.perf_counter()
        sh([os.path.join(RELEASE, "cifar-train"), "--data", data, "--device", "cpu", "--batch-size", str(b),
            "--epochs", str(args.epochs), "--metrics", metrics])
        ours_s = time.perf_counter() - t
        rows.append((b, ref["test_accuracy"], ref_s, last_json(metrics)["test_accuracy"], ours_s))
    print(f"\n{args.epochs} epochs, SGD lr 0.001 momentum 0.9, CPU, one run each\n")
    print("| batch | reference `seed_baseline.py` | wall time (s) | `cifar-train` | wall time (s) | difference |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, ref, ref_s, ours, ours_s in rows:
        print(f"| {b} | {100 * ref:.2f}% | {ref_s:.0f} | {100 * ours:.2f}% | {ours_s:.0f} "
              f"| {100 * (ours - ref):+.2f} points |")


def bench_ddp(args):
    """Data-parallel training with 2 ranks of 1 thread: PyTorch's DDP (gloo, torchrun) against
    `cifar-train --nproc-per-node 2`, and the cost of distribution against 1 rank × 2 threads
    at the same global batch."""
    data = args.data
    ensure_data(data)
    warm(os.path.join(data, "cifar10-train.safetensors"))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # The same steps for both (more than an epoch at 256 per rank), so start-up weighs alike.
    ref_steps = our_steps = {32: 1200, 256: 150}
    metrics = os.path.join(tempfile.mkdtemp(), "m.jsonl")
    exe = os.path.join(RELEASE, "cifar-train")

    def reference(b):
        return json_line([torchrun, "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "tools", "ddp_reference.py"),
                          "--root", os.path.join(data, "py"), "--batch-size", str(b), "--workers", "1",
                          "--threads", "1", "--steps", str(ref_steps.get(b, 40))])

    def ours(b, extra):
        sh([exe, "--data", data, "--device", "cpu", "--epochs", "1", "--max-steps", str(our_steps.get(b, 150)),
            "--no-eval", "--metrics", metrics] + extra)
        return last_json(metrics)

    contenders = [("pytorch-ddp", reference),
                  ("ranks", lambda b: ours(b, ["--nproc-per-node", "2", "--threads", "1", "--batch-size", str(b)])),
                  ("one", lambda b: ours(b, ["--threads", "2", "--batch-size", str(2 * b)]))]
    rows = interleaved(contenders, args.reps, args.batch_sizes)

    def values(name, b, key="images_per_s"):
        return field(rows, name, b, key)

    print(f"\nData-parallel CPU training, 2 ranks × 1 thread on {os.cpu_count()} cores, the job's images/s, "
          f"median of {args.reps} reps (ratios: median of the ratios within each rep)\n")
    print("| B per rank | PyTorch DDP (gloo, torchrun) | `cifar-train --nproc-per-node 2` | × PyTorch DDP "
          "| communication (share of step) | 1 rank × 2 threads at 2B | 2 ranks ÷ 1 rank |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        print(f"| {b} | {median(values('pytorch-ddp', b)):,.0f} | {median(values('ranks', b)):,.0f} "
              f"| {ratio(values('ranks', b), values('pytorch-ddp', b)):.1f}× "
              f"| {100 * median(values('ranks', b, 'communication_share')):.1f}% "
              f"| {median(values('one', b)):,.0f} | {ratio(values('ranks', b), values('one', b)):.2f} |")
    print("\nall runs:", json.dumps({"/".join(map(str, k)): [round(r["images_per_s"]) for r in v] for k, v in rows.items()}))


def bench_python(args):
    """The Python package: its loader alone beside torchvision's DataLoader and the Rust loader,
    and the tutorial's loop over it beside the tutorial's loader and batches in memory."""
    data = args.data
    ensure_data(data)
    sh([os.path.join(ROOT, "tools", "install-python")])
    rust = bench_exe("loader")
    warm(os.path.join(data, "cifar10-train.safetensors"))
    script = os.path.join(ROOT, "tools", "bench_python.py")
    # (torch's images, ours): ours long enough (seconds) that a run's start is not its figure.
    loads = {4: (8000, 1000000), 32: (16000, 1000000), 256: (24000, 1000000)}
    # (the tutorial's loader's steps, ours per source, blocks): ours alternates its loader's
    # blocks with the bound's in one process.
    steps = {4: (1500, 3000, 10), 32: (300, 1200, 12), 256: (40, 160, 8)}

    def py(*a, path=None):
        env = None if path is None else dict(os.environ, PYTHONPATH=path)
        return json_line([sys.executable, script, *map(str, a), "--data", data], env=env)

    def loader_contenders(b):
        theirs, ours = loads.get(b, (24000, 1000000))
        return [
            ("torch/1", lambda: py("loader", "--impl", "torch", "--batch-size", b, "--workers", 1, "--images", theirs)),
            ("torch/2", lambda: py("loader", "--impl", "torch", "--batch-size", b, "--workers", 2, "--images", theirs)),
            ("ours/2", lambda: py("loader", "--impl", "ours", "--batch-size", b, "--workers", 2, "--images", ours)),
            ("rust/2", lambda: json_line([rust, "--data", data, "--mode", "loader", "--batch-size", str(b),
                                          "--workers", "2", "--images", str(ours)])),
        ] + ([("before/2", lambda: py("loader", "--impl", "ours", "--batch-size", b, "--workers", 2, "--images",
                                      ours, path=args.baseline))] if args.baseline else [])

    def loop_contenders(b):
        theirs, ours, blocks = steps.get(b, (40, 160, 8))
        return [
            ("torch", lambda: py("loop", "--impl", "torch", "--batch-size", b, "--workers", 1, "--steps", theirs)),
            ("ours", lambda: py("loop", "--impl", "ours", "--batch-size", b, "--workers", 2, "--steps", ours,
                                "--blocks", blocks)),
        ] + ([("before", lambda: py("loop", "--impl", "ours", "--batch-size", b, "--workers", 2, "--steps", ours,
                                    "--blocks", blocks, path=args.baseline))] if args.baseline else [])

    rows = {}
    for rep in range(args.reps):
        for b in args.batch_sizes:
            for kind, contenders in (("loader", loader_contenders(b)), ("loop", loop_contenders(b))):
                k = rep % len(contenders)
                for name, run in contenders[k:] + contenders[:k]:
                    rows.setdefault((kind, name, b), []).append(run())
                    # The contenders run in a fixed rotation, so each follows the same one every
                    # rep: a moment's pause keeps one's exit (torch's worker processes going
                    # down, their memory freed) out of the next one's timing.
                    time.sleep(1.0)

    def values(kind, name, b, key="images_per_s"):
        return [r[key] for r in rows[(kind, name, b)]]

    def med(kind, name, b, key="images_per_s"):
        return median(values(kind, name, b, key))

    print(f"\nThe loader alone (images/s, median of {args.reps} interleaved runs; ratios: median of the ratios "
          "within each rep)\n")
    print("| B | torch DataLoader(num_workers=1) | (num_workers=2) | cifar_fast.DataLoader(num_workers=2) "
          "| × torch (2) | Rust Loader (2 workers) | % of Rust | cifar_fast: first batch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        ours = values("loader", "ours/2", b)
        print(f"| {b} | {med('loader', 'torch/1', b):,.0f} | {med('loader', 'torch/2', b):,.0f} | {median(ours):,.0f} "
              f"| {ratio(ours, values('loader', 'torch/2', b)):.0f}× | {med('loader', 'rust/2', b):,.0f} "
              f"| {100 * ratio(ours, values('loader', 'rust/2', b)):.0f}% "
              f"| {med('loader', 'ours/2', b, 'first_batch_ms'):.0f} ms |")
    print(f"\nThe tutorial's loop (its net, SGD, 2 torch threads, CPU; images/s, median of {args.reps}; "
          "the bound: the same process's blocks over batches in memory, alternating with the loader's)\n")
    print("| B | over torchvision + DataLoader(num_workers=1) | over cifar_fast.DataLoader(num_workers=2) "
          "| over batches in memory (bound) | % of bound | data wait |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in args.batch_sizes:
        ours = values("loop", "ours", b)
        bound = values("loop", "ours", b, "bound_images_per_s")
        print(f"| {b} | {med('loop', 'torch', b):,.0f} | {median(ours):,.0f} | {median(bound):,.0f} "
              f"| {100 * ratio(ours, bound):.1f}% | {100 * med('loop', 'ours', b, 'data_wait_share'):.2f}% |")
    print("per-run shares of the bound:", json.dumps({b: [round(o / r, 3) for o, r in zip(
        values("loop", "ours", b), values("loop", "ours", b, "bound_images_per_s"))] for b in args.batch_sizes}))
    if args.baseline:
        print(f"\nThis build against {args.baseline} (median of the per-rep ratios, this ÷ that)\n")
        print("| B | loader alone | loop | loop's share of its bound, this / that |")
        print("|---:|---:|---:|---:|")
        for b in args.batch_sizes:
            shares = [values("loop", n, b) for n in ("ours", "before")]
            bounds = [values("loop", n, b, "bound_images_per_s") for n in ("ours", "before")]
            print(f"| {b} | {ratio(values('loader', 'ours/2', b), values('loader', 'before/2', b)):.3f} "
                  f"| {ratio(values('loop', 'ours', b), values('loop', 'before', b)):.3f} "
                  f"| {median(o / r for o, r in zip(*[shares[0], bounds[0]])):.3f} / "
                  f"{median(o / r for o, r in zip(*[shares[1], bounds[1]])):.3f} |")
    print("\nall runs:", json.dumps({"/".join(map(str, k)): [round(r["images_per_s"]) for r in v]
                                    for k, v in rows.items()}))


def photo_folder(data, name, train, val=0):
    """An ImageNet-like folder of real photographs (../shared/tools/make-photo-folder.py)."""
    root = os.path.join(data, name)
    if not os.path.isdir(os.path.join(root, "train")):
        sh([sys.executable, os.path.join(SHARED, "tools", "make-photo-folder.py"), root, "--train", str(train),
            "--val", str(val)])
    return root


def bench_images(args):
    """Images of every size: the loader (RandomResizedCrop and Resize + CenterCrop) beside the
    decode bound and torchvision's ImageFolder + DataLoader; uint8 beside float; memory for 20,000
    and 60,000 images; cifar-prep beside cat of the same files."""
    data = args.data
    n = args.images if args.images != 200000 else 20000
    root = photo_folder(data, f"photos-{n}", n)
    train = os.path.join(root, "train")
    encoded = os.path.join(data, f"photos-{n}-encoded")
    prep = [os.path.join(RELEASE, "cifar-prep"), root, "--out", encoded, "--force", "--store", "encoded"]
    sh(["rm", "-rf", encoded])
    sh(prep)
    file = os.path.join(encoded, f"photos-{n}-train.safetensors")
    sh([os.path.join(ROOT, "tools", "install-python")])
    script = os.path.join(ROOT, "tools", "bench_images.py")
    count = args.count
    b = args.batch_sizes[0]

    def py(*a):
        return json_line([sys.executable, script, *map(str, [*a, "--root", train, "--batch-size", b,
                                                             "--workers", 2, "--images", count])])

    contenders = [
        ("bound", lambda: py("bound")),
        ("torch/rrc", lambda: py("loader", "--impl", "torch", "--transform", "rrc")),
        ("ours/rrc", lambda: py("loader", "--impl", "ours", "--transform", "rrc")),
        ("file/rrc", lambda: py("loader", "--impl", "ours-file", "--file", file, "--transform", "rrc")),
        ("u8/rrc", lambda: py("loader", "--impl", "ours", "--transform", "rrc", "--dtype", "uint8")),
        ("torch/center", lambda: py("loader", "--impl", "torch", "--transform", "center")),
        ("ours/center", lambda: py("loader", "--impl", "ours", "--transform", "center")),
    ]
    files = [os.path.join(d, f) for d, _, fs in sorted(os.walk(root)) for f in sorted(fs)]
    listing = os.path.join(data, f"photos-{n}.files")
    with open(listing, "w") as f:
        f.write("\0".join(files))
    contenders += [
        ("prep", lambda: {"seconds": timed(prep)}),
        ("cat", lambda: {"seconds": timed(["sh", "-c", f"xargs -0 cat < {listing} > {encoded}/cat.bin"])}),
    ]
    rows = interleaved([(k, lambda _b, r=r: r()) for k, r in contenders], args.reps, [b])
    os.remove(os.path.join(encoded, "cat.bin"))
    input_bytes = sum(os.path.getsize(p) for p in files)
    written = sum(os.path.getsize(os.path.join(encoded, f)) for f in os.listdir(encoded))

    def v(name, key="images_per_s"):
        return field(rows, name, b, key)

    def m(name, key="images_per_s"):
        return median(v(name, key))

    print(f"\n{n:,} photographs, {count:,} images a run, B = {b}, 2 workers; median of {args.reps} interleaved "
          "runs, ratios: median of the per-rep ratios\n")
    print("| transform | decode bound (Pillow, 2 processes) | torchvision ImageFolder + DataLoader(2) "
          "| cifar_fast (folder) | × bound | × torchvision | cifar_fast (encoded file) | first batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| RandomResizedCrop(224) + flip + Normalize | {m('bound'):,.0f} | {m('torch/rrc'):,.0f} "
          f"| {m('ours/rrc'):,.0f} | {ratio(v('ours/rrc'), v('bound')):.2f}× | {ratio(v('ours/rrc'), v('torch/rrc')):.2f}× "
          f"| {m('file/rrc'):,.0f} | {m('ours/rrc', 'first_batch_ms'):.0f} ms |")
    print(f"| Resize(256) + CenterCrop(224) + Normalize | {m('bound'):,.0f} | {m('torch/center'):,.0f} "
          f"| {m('ours/center'):,.0f} | {ratio(v('ours/center'), v('bound')):.2f}× "
          f"| {ratio(v('ours/center'), v('torch/center')):.2f}× | | {m('ours/center', 'first_batch_ms'):.0f} ms |")
    print(f"| RandomResizedCrop(224) + flip, uint8 (PILToTensor) | | | {m('u8/rrc'):,.0f} "
          f"| {ratio(v('u8/rrc'), v('bound')):.2f}× | × float: {ratio(v('u8/rrc'), v('ours/rrc')):.2f} | "
          f"| {m('u8/rrc', 'first_batch_ms'):.0f} ms |")
    print(f"\nResident memory beyond the page cache (anonymous, process and workers, peak): cifar_fast folder "
          f"{m('ours/rrc', 'anon_mb'):.0f} MB, file {m('file/rrc', 'anon_mb'):.0f} MB; torchvision "
          f"{m('torch/rrc', 'anon_mb'):.0f} MB")
    print(f"cifar-prep of the folder (encoded): {m('prep', 'seconds'):.2f} s; cat of the same files into one: "
          f"{m('cat', 'seconds'):.2f} s; ratio {ratio(v('prep', 'seconds'), v('cat', 'seconds')):.2f}; output "
          f"{written / 1e6:,.1f} MB for {input_bytes / 1e6:,.1f} MB of images ({100 * (written / input_bytes - 1):+.2f}%)")
    print("\nall runs:", json.dumps({k[0]: [round(r.get("images_per_s", r.get("seconds", 0)), 2) for r in rs]
                                    for k, rs in rows.items()}))


def bench_images_memory(args):
    """The loader's memory for the same photographs listed 20,000 and 60,000 times over (hard
    links: the per-image state the loader keeps, not the bytes, grows)."""
    data = args.data
    src = os.path.join(photo_folder(data, "photos-20000", 20000), "train")
    script = os.path.join(ROOT, "tools", "bench_images.py")
    out = {}
    for n in (20000, 60000):
        root = os.path.join(data, f"photos-links-{n}")
        if not os.path.isdir(root):
            for k in range(n // 20000):
                for cls in sorted(os.listdir(src)):
                    dst = os.path.join(root, f"{cls}-{k}")
                    os.makedirs(dst)
                    for f in os.listdir(os.path.join(src, cls)):
                        os.link(os.path.join(src, cls, f), os.path.join(dst, f))
        out[n] = [json_line([sys.executable, script, "loader", "--impl", "ours", "--root", root, "--batch-size",
                             "256", "--workers", "2", "--images", str(args.count)])["anon_mb"]
                  for _ in range(args.reps)]
    print(f"\nResident memory beyond the page cache (MB, anonymous pages of the process and its threads, "
          f"peak over {args.count:,} images, median of {args.reps}): 20,000 images {median(out[20000]):.0f}, "
          f"60,000 images {median(out[60000]):.0f} ({100 * (median(out[60000]) / median(out[20000]) - 1):+.1f}%)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prep", "loader", "train", "accuracy", "busy", "ddp", "python", "images",
                                           "images-memory"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--data", default=os.path.join(ROOT, "data"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch-sizes", type=int, nargs="+", help="default: 4 32 256 (ddp: 32 256, accuracy: 4 32)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--baseline", metavar="EXE",
                    help="train: another cifar-train build to set beside this one; loader: another build of "
                         "benches/loader; python: a folder holding another build of the package (an unpacked "
                         "wheel), set beside this one")
    ap.add_argument("--images", type=int, default=200000, help="images: the folder's size (default 20,000)")
    ap.add_argument("--part", choices=["all", "cifar", "folder"], default="all",
                    help="prep: the CIFAR tarball, the image folder, or both")
    ap.add_argument("--count", type=int, default=4096, help="images: images a loader run reads")
    args = ap.parse_args()
    args.data = os.path.abspath(args.data)
    args.batch_sizes = args.batch_sizes or {"ddp": [32, 256], "accuracy": [4, 32], "images": [256]}.get(args.what, [4, 32, 256])
    {"prep": bench_prep, "loader": bench_loader, "train": bench_train, "accuracy": bench_accuracy,
     "busy": bench_busy, "ddp": bench_ddp, "python": bench_python, "images": bench_images,
     "images-memory": bench_images_memory}[args.what](args)


if __name__ == "__main__":
    main()
