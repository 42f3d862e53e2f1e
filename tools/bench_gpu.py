"""The GPU half of tools/bench-gpu: real data, the CUDA test, then the comparison table."""
import json
import os
import statistics
import subprocess
import sys
import time

carry = sys.argv[1]
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
out_dir = os.environ.get("OUT", "/tmp")
data = "/tmp/cifar-data"


def sh(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return r.stdout


t = time.time()
print(sh(["nvidia-smi", "-L"]).strip())
os.makedirs(f"{data}/py", exist_ok=True)
sh([sys.executable, f"{carry}/make-cifar-tarballs.py", data, "--jpeg-tar", f"{carry}/cifar-10-jpeg.tar.gz"])
sh(["tar", "xzf", f"{data}/cifar-10-python.tar.gz", "-C", f"{data}/py"])
print(sh([f"{carry}/cifar-prep", f"{data}/cifar-10-binary.tar.gz", "--out", data]).strip())
print(f"data ready in {time.time() - t:.0f} s")
print(sh([f"{carry}/loader-test", "--exact", "pinned_batches_reach_cuda_intact", "--nocapture"]).strip()[-400:])

settings = {32: (400, 3000), 512: (40, 600)}  # steps: reference, ours
rows = {}
for _ in range(reps):
    for b, (ref_steps, our_steps) in settings.items():
        r = json.loads(sh([sys.executable, f"{carry}/seed_baseline.py", "--root", f"{data}/py", "--batch-size", str(b),
                           "--workers", "1", "--steps", str(ref_steps), "--device", "cuda", "--json"]).splitlines()[-1])
        rows.setdefault(("reference", b), []).append(r)
        for mode in ("off", "on"):
            m = f"/tmp/m-{mode}.jsonl"
            sh([f"{carry}/cifar-train", "--data", data, "--device", "cuda", "--resident", mode, "--batch-size", str(b),
                # As many epochs as the steps need: --max-steps ends the run.
                "--epochs", "1000", "--max-steps", str(our_steps), "--workers", "2", "--metrics", m])
            with open(m) as f:
                rows.setdefault((mode, b), []).append(json.loads(f.read().strip().splitlines()[-1]))
    for b, (_, our_steps) in settings.items():
        rows.setdefault(("bound", b), []).append(json.loads(sh([f"{carry}/step", "--batch-size", str(b), "--steps",
                                                                  str(our_steps), "--device", "cuda"]).splitlines()[-1]))
med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in rows.items()}
ours = [k for k in rows if k[0] in ("on", "off")]
wait = {k: statistics.median(r["data_wait_share"] for r in rows[k]) for k in ours}
# After the first step (CUDA context, cuDNN and cuBLAS set-up): what the bound, which times its
# steps after 20 untimed ones, is to be set against.
steady = {k: statistics.median(r["steady_images_per_s"] for r in rows[k]) for k in ours}
first = {k: statistics.median(r["first_step_seconds"] for r in rows[k]) for k in ours}
lines = [f"GPU training images/s, median of {reps} runs ({sh(['nvidia-smi', '-L']).strip()}); "
         "reference: `seed_baseline.py --workers 1 --device cuda`", "",
         "| B | data | reference | cifar-train | × ref | data wait | first step | after it | in-memory step (bound) | % of bound |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for b in settings:
    ref, bound = med[("reference", b)], med[("bound", b)]
    for mode, name in (("off", "pipelined"), ("on", "resident")):
        k = (mode, b)
        lines.append(f"| {b} | {name} | {ref:,.0f} | {med[k]:,.0f} | {med[k] / ref:.1f}× | {100 * wait[k]:.2f}% "
                     f"| {1e3 * first[k]:.0f} ms | {steady[k]:,.0f} | {bound:,.0f} | {100 * steady[k] / bound:.0f}% |")
table = "\n".join(lines)
print(table)
print("all runs:", json.dumps({f"{k[0]}/{k[1]}": [round(r["images_per_s"]) for r in v] for k, v in rows.items()}))
with open(f"{out_dir}/gpu.md", "w") as f:
    f.write(table + "\n")
print(f"total {time.time() - t:.0f} s")
