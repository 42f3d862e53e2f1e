"""The README's and the guides' examples run as written: every `sh`, `python` and `diff` block of
README.md, docs/*.md and python/README.md is run here on small data (or checked against the file
it shows), unless the line before it says `<!-- not run: REASON -->` with one of the reasons
below; `rust` blocks are doctests (the crate root includes these files under `cfg(doctest)`).

Each block runs in a fresh directory laid out as the checkout is for a user: `target/` and
`tools/` of this checkout, a copy of `docs/`, an empty `data/` (so `cifar-train` prepares it
there on its first run, as on a fresh clone), `photos/{train,val}` of real photographs, and
`../shared/data/cifar-10-jpeg.tar.gz` a small one (10 real images a class). The only rewriting:
`cargo run --release --bin X --` is the binary `target/release/X` that `cargo test` built, and
`cargo build` is that build.
"""
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile

import pytest

from conftest import CHECKOUT, SHARED

DOCS = ["README.md", *sorted(os.path.relpath(p, CHECKOUT) for p in glob.glob(os.path.join(CHECKOUT, "docs", "*.md"))),
        "python/README.md"]
# Why a block may go unrun: what this machine or a test's time lacks, or a test that runs it.
REASONS = ("needs a GPU", "needs the network", "needs several machines", "run by CI",
           "a template", "run by tests/train_run.rs", "installs")
RUST_INCLUDED = re.findall(r'include_str!\("\.\./([^"]+)"\)',
                           open(os.path.join(CHECKOUT, "src", "lib.rs")).read())


def blocks():
    """(file, line, language, text, reason to skip or None) of every fenced example."""
    out = []
    for doc in DOCS:
        lines = open(os.path.join(CHECKOUT, doc)).read().split("\n")
        i = 0
        while i < len(lines):
            m = re.match(r"^```(\w+)", lines[i])
            if m:
                end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
                skip = next((m for m in (re.match(r"<!-- not run: (.*) -->", l) for l in lines[max(0, i - 2):i]) if m),
                            None)
                lang = m.group(1)
                if lang in ("sh", "python", "diff", "rust"):
                    out.append((doc, i + 1, lang, "\n".join(lines[i + 1:end]), skip and skip.group(1)))
                i = end
            i += 1
    return out


BLOCKS = blocks()


def test_every_example_is_run_or_says_why_not():
    assert len(BLOCKS) >= 20, BLOCKS
    for doc, line, lang, _, reason in BLOCKS:
        if reason is not None:
            assert reason.startswith(REASONS), f"{doc}:{line}: {reason!r} is none of {REASONS}"
        if lang == "rust":
            assert doc in RUST_INCLUDED, f"{doc}:{line}: a rust block, but src/lib.rs runs none of {doc}'s"


@pytest.fixture(scope="module")
def small_jpegs(tmp_path_factory):
    """cifar-10-jpeg.tar.gz of the real images, 10 a class and split."""
    out = tmp_path_factory.mktemp("jpegs") / "cifar-10-jpeg.tar.gz"
    taken = {}
    with tarfile.open(os.path.join(SHARED, "data", "cifar-10-jpeg.tar.gz")) as src, \
            tarfile.open(out, "w:gz") as dst:
        for m in src:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4:
                key = tuple(parts[1:3])
                if taken.get(key, 0) < 10:
                    taken[key] = taken.get(key, 0) + 1
                    dst.addfile(m, src.extractfile(m))
            if len(taken) == 20 and all(v == 10 for v in taken.values()):
                break
    return out


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    out = tmp_path_factory.mktemp("docphotos")
    subprocess.run([sys.executable, os.path.join(SHARED, "tools", "make-photo-folder.py"), str(out), "--train", "8",
                    "--val", "4", "--classes", "2", "--odd-share", "0.25", "--seed", "3"],
                   check=True, stdout=subprocess.DEVNULL)
    return out


def checkout_like(tmp_path, small_jpegs, small_photos):
    """A working directory laid out as the module's doc says; returns it."""
    (tmp_path / "shared" / "data").mkdir(parents=True)
    shutil.copy(small_jpegs, tmp_path / "shared" / "data")
    work = tmp_path / "work"
    work.mkdir()
    for name in ("target", "tools", "examples", "python"):
        (work / name).symlink_to(os.path.join(CHECKOUT, name))
    shutil.copytree(os.path.join(CHECKOUT, "docs"), work / "docs")
    (work / "data").mkdir()
    shutil.copytree(small_photos, work / "photos")
    return work


def as_run_here(script):
    script = re.sub(r"cargo build --release --bins\b", ":", script)
    script = re.sub(r"cargo run --release --bin (\S+)( --)?", r"target/release/\1", script)
    return re.sub(r"cargo run --release --example (\S+)( --)?", r"target/release/examples/\1", script)


@pytest.mark.parametrize("doc,line,lang,text,reason", [b for b in BLOCKS if b[2] in ("sh", "python") and not b[4]],
                         ids=lambda v: v if isinstance(v, (str, int)) and not str(v).count("\n") else "")
def test_the_example_runs(doc, line, lang, text, reason, tmp_path, small_jpegs, small_photos):
    work = checkout_like(tmp_path, small_jpegs, small_photos)
    with socket.socket() as sock:  # torchrun's port (29500 by default) may be another program's
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               CIFAR_FAST_OFFLINE_IMAGES=str(tmp_path / "shared" / "data" / "cifar-10-jpeg.tar.gz"),
               PET_MASTER_PORT=port, MASTER_PORT=port)
    if lang == "sh":
        cmd = ["bash", "-euo", "pipefail", "-c", as_run_here(text)]
    else:
        cmd = [sys.executable, "-c", text]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{doc}:{line}:\n{text}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
    assert "panicked" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("doc,line,text", [(b[0], b[1], b[3]) for b in BLOCKS if b[2] == "diff"])
def test_the_tutorials_changed_lines_are_the_example_script(doc, line, text):
    # examples/cifar10_tutorial.py is trained by test_tutorial.py.
    script = open(os.path.join(CHECKOUT, "examples", "cifar10_tutorial.py")).read()
    added = [l[1:].strip() for l in text.split("\n") if l.startswith("+")]
    removed = [l[1:].strip() for l in text.split("\n") if l.startswith("-")]
    assert added and len(added) == len(removed), text
    for new, old in zip(added, removed):
        assert new.replace("root='./data'", "root=args.root") in script, f"{doc}:{line}: {new!r} is not in examples/cifar10_tutorial.py"
        assert old == new.replace("cifar_fast.CIFAR10", "torchvision.datasets.CIFAR10").replace(
            "cifar_fast.DataLoader", "torch.utils.data.DataLoader"), f"{doc}:{line}: {old!r} is not torch's {new!r}"
