"""Bad input is a Python exception of the right kind, naming what is wrong; the interpreter
(and the next loader) go on."""
import os
import shutil

import pytest
import torch
import torchvision.transforms as T

import cifar_fast


@pytest.fixture
def ds(root):
    return cifar_fast.CIFAR10(root, train=True, transform=T.ToTensor())


@pytest.mark.parametrize("kwargs, kind, words", [
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=-3), ValueError, "batch_size"),
    (dict(batch_size="4"), TypeError, "batch_size"),
    (dict(batch_size=4.0), TypeError, "batch_size"),
    (dict(batch_size=True), TypeError, "batch_size"),
    (dict(num_workers=-1), ValueError, "num_workers"),
    (dict(num_workers="two"), TypeError, "num_workers"),
    (dict(prefetch_factor=0, num_workers=2), ValueError, "prefetch_factor"),
    (dict(rank=2, world_size=2), ValueError, "rank 2"),
    (dict(rank=0), ValueError, "world_size"),
    (dict(rank=-1, world_size=2), ValueError, "rank"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(output="pandas"), ValueError, "output"),
])
def test_bad_arguments(ds, kwargs, kind, words):
    with pytest.raises(kind, match=words):
        cifar_fast.DataLoader(ds, **kwargs)


def test_a_dataset_not_ours_is_a_type_error():
    with pytest.raises(TypeError, match="cifar_fast dataset"):
        cifar_fast.DataLoader([1, 2, 3])


@pytest.mark.parametrize("transform, words", [
    (T.ColorJitter(0.1), "ColorJitter"),
    (T.Compose([T.ToTensor(), lambda x: x * 2]), "function"),
    (T.Compose([T.RandomCrop(28), T.ToTensor()]), "RandomCrop"),
    (T.Compose([T.RandomCrop(32, padding=(1, 2)), T.ToTensor()]), "padding"),
    (T.Compose([T.RandomHorizontalFlip(p=0.3), T.ToTensor()]), "p=0.3"),
    (T.Compose([T.Normalize((0.5,) * 3, (0.5,) * 3), T.ToTensor()]), "ToTensor"),
])
def test_transforms_not_run_natively_are_type_errors(root, transform, words):
    with pytest.raises(TypeError, match=words) as e:
        cifar_fast.CIFAR10(root, train=False, transform=transform)
    assert "supported" in str(e.value) or "ToTensor" in str(e.value)


def test_bad_normalize_values(root):
    with pytest.raises(ValueError, match="std"):
        cifar_fast.CIFAR10(root, train=False, transform=T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0, 1, 1))]))
    with pytest.raises(ValueError, match="3 channels"):
        cifar_fast.CIFAR10(root, train=False, transform=T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5), (1, 1))]))


def test_missing_data_without_download_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz|tarball") as e:
        cifar_fast.CIFAR10(tmp_path / "nothing", train=True, download=False)
    assert str(tmp_path / "nothing") in str(e.value)
    with pytest.raises(FileNotFoundError):
        cifar_fast.TensorFile(tmp_path / "no.safetensors")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header"])
def test_a_corrupt_tensor_file_is_a_format_error(tmp_path, train_file, damage):
    bad = tmp_path / "bad.safetensors"
    data = train_file.read_bytes()
    bad.write_bytes({"garbage": os.urandom(5000), "truncated": data[: len(data) // 2],
                     "header": b"\xff" * 8 + data[8:]}[damage])
    with pytest.raises(cifar_fast.FormatError, match="bad.safetensors") as e:
        cifar_fast.TensorFile(bad)
    assert isinstance(e.value, ValueError)


def test_a_corrupt_tarball_is_a_format_error(tmp_path):
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(3000))
    with pytest.raises(ValueError, match="cifar-10-binary.tar.gz"):
        cifar_fast.CIFAR10(tmp_path, download=True)


def test_index_out_of_range_and_not_an_integer(ds):
    with pytest.raises(IndexError, match="100"):
        ds[100]
    with pytest.raises(IndexError):
        ds[-101]
    with pytest.raises(TypeError):
        ds["3"]
    assert torch.equal(ds[-1][0], ds[99][0])


def small_folder(tmp_path, n, corrupt=()):
    from PIL import Image
    d = tmp_path / "f" / "cat"
    d.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(d / f"{i}.png")
    for i in corrupt:
        (d / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return tmp_path / "f"


def test_a_corrupt_image_in_a_folder_names_it_and_the_loader_goes_on(tmp_path, root):
    ds = cifar_fast.ImageFolder(small_folder(tmp_path, 6, corrupt=[3]))
    loader = cifar_fast.DataLoader(ds, batch_size=2, num_workers=2)
    with pytest.raises(cifar_fast.FormatError, match="3.png"):
        list(loader)
    with pytest.raises(cifar_fast.FormatError, match="3.png"):
        ds[3]
    assert len(ds[2][0]) == 3


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_a_failing_sample_fails_its_batch_and_the_epoch_goes_on_as_in_torch(tmp_path, workers):
    ds = cifar_fast.ImageFolder(small_folder(tmp_path, 10, corrupt=[4]))
    loader = cifar_fast.DataLoader(ds, batch_size=1, num_workers=workers)
    it = iter(loader)
    got, errors = [], []
    for _ in range(len(loader)):
        try:
            got.append(int(next(it)[0][0, 0, 0, 0] * 255 + 0.5))
        except cifar_fast.FormatError as e:
            errors.append(str(e))
    with pytest.raises(StopIteration):
        next(it)
    assert got == [0, 1, 2, 3, 5, 6, 7, 8, 9] and len(errors) == 1 and "4.png" in errors[0]
    assert loader.state_dict()["batches_yielded"] in (10, 0)


def test_a_failing_batch_does_not_hold_the_gil_while_the_others_finish(tmp_path):
    import threading
    import time
    import numpy as np
    from PIL import Image
    d = small_folder(tmp_path, 2, corrupt=[0])
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (2000, 2000, 3), dtype=np.uint8))
    big.save(tmp_path / "big.png", compress_level=1)
    for i in range(2, 42):
        # Seconds of decoding on their way when the first batch fails.
        os.link(tmp_path / "big.png", d / "cat" / f"{i}.png")
    loader = cifar_fast.DataLoader(cifar_fast.ImageFolder(d, resize=True), batch_size=1, num_workers=2)
    ticks, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.002)

    it = iter(loader)
    t = threading.Thread(target=tick)
    t.start()
    try:
        began = time.monotonic()
        with pytest.raises(cifar_fast.FormatError):
            next(it)
        it.close()
        ended = time.monotonic()
    finally:
        stop.set()
        t.join()
    # The ticker's longest wait within the span, its ends included (a span over before the
    # ticker ran again is a wait too).
    gaps = np.diff([began, *[x for x in ticks if began < x < ended], ended])
    assert gaps.max() < 0.3, f"the GIL was held {gaps.max():.2f} s"


def test_a_buffer_that_cannot_be_allocated_is_a_memory_error(tmp_path):
    import subprocess
    import sys
    folder = small_folder(tmp_path, 2)
    script = f"""
import cifar_fast
ds = cifar_fast.ImageFolder({str(folder)!r}, size=(200000, 200000), resize=True)
for what in ("loader", "sample"):
    try:
        next(iter(cifar_fast.DataLoader(ds, batch_size=2, num_workers=1))) if what == "loader" else ds[0]
        print(what, "allocated")
    except MemoryError as e:
        print(what, "MemoryError")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["loader", "MemoryError", "sample", "MemoryError"]


def test_special_files_in_a_folder_are_refused_before_they_are_read(tmp_path):
    import subprocess
    import sys
    folder = small_folder(tmp_path, 3)
    os.mkfifo(folder / "cat" / "9.png")
    script = f"""
import cifar_fast
ds = cifar_fast.ImageFolder({str(folder)!r})
try:
    ds[3]
except cifar_fast.FormatError as e:
    print("sample:", e)
try:
    list(cifar_fast.DataLoader(ds, batch_size=4, num_workers=1))
except cifar_fast.FormatError as e:
    print("loader:", e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("9.png" in l and "FIFO" in l for l in lines), out.stdout


def test_nested_folders_in_a_class_are_read_as_torchvision_reads_them(tmp_path):
    import torchvision
    from PIL import Image
    layout = ["cat/0.png", "cat/sub/1.png", "cat/sub/deeper/2.png", "cat/a b/3.png", "cat/a/4.png",
              "dog/x/5.png", "dog/6.png", "dog/Z/7.png"]
    for k, rel in enumerate(layout):
        p = tmp_path / "n" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (k * 10, 0, 0)).save(p)
    ours = cifar_fast.ImageFolder(tmp_path / "n", transform=T.ToTensor())
    theirs = torchvision.datasets.ImageFolder(str(tmp_path / "n"), transform=T.ToTensor())
    assert len(ours) == len(theirs) == 8 and ours.targets == theirs.targets
    for i in range(8):
        assert torch.equal(ours[i][0], theirs[i][0]), i


def test_a_class_without_images_is_refused_as_torchvision_refuses_it(tmp_path):
    folder = small_folder(tmp_path, 2)
    (folder / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid file for the classes empty"):
        cifar_fast.ImageFolder(folder)


def images_extent(path):
    """Where a tensor file's images lie, `(first byte, byte past the last, count)`, from its
    safetensors header."""
    import json
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))["images"]
    begin, end = info["data_offsets"]
    return 8 + n + begin, 8 + n + end, info["shape"][0]


def test_a_file_cut_inside_a_page_under_a_live_loader_is_an_error(tmp_path, train_file):
    # The page that holds the new end of the file reads as zeros past it, with no fault to see:
    # the last image's end is cut off inside its last page.
    live = tmp_path / "live.safetensors"
    shutil.copy(train_file, live)
    _, images_end, _ = images_extent(live)
    last_byte = images_end - 1
    page = last_byte // 4096 * 4096
    cut = page + max(1, (last_byte - page) // 2)
    assert page < cut <= last_byte
    ds = cifar_fast.TensorFile(live)
    loader = cifar_fast.DataLoader(ds, batch_size=10, num_workers=2)
    it = iter(loader)
    next(it)
    with open(live, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(cifar_fast.FormatError, match="live.safetensors.*truncated"):
        ds[len(ds) - 1]
    with pytest.raises(cifar_fast.FormatError, match="truncated"):
        for _ in it:
            pass


@pytest.mark.parametrize("download", [False, True])
def test_a_file_given_as_root_is_named_as_a_file(train_file, download):
    with pytest.raises(ValueError, match=r"cifar10-train.safetensors is a file, not a directory: name the "
                                         r"directory that holds the data \(.+\)"):
        cifar_fast.CIFAR10(train_file, train=True, download=download)


@pytest.mark.parametrize("grown_back", [False, True], ids=["cut", "cut-and-grown-back"])
def test_a_cut_inside_the_page_an_image_ends_in_is_an_error(tmp_path, train_file, grown_back):
    # An image in the middle of the file, cut inside the page it ends in: its read faults
    # nowhere and its end reads as zeros. Grown back to its length (as a program rewriting the
    # file in place does), the file's length no longer tells either.
    live = tmp_path / "live.safetensors"
    shutil.copy(train_file, live)
    size = os.path.getsize(live)
    images_start, images_end, count = images_extent(live)
    per_image = (images_end - images_start) // count
    ds = cifar_fast.TensorFile(live)
    k = len(ds) // 2
    start = images_start + k * per_image
    end = start + per_image  # past the image's last byte
    page = (end - 1) // 4096 * 4096
    cut = max(start, page) + (end - max(start, page)) // 2
    assert max(start, page) < cut < end
    assert live.read_bytes()[cut:end].strip(b"\0"), "the bytes cut off must not be zeros already"
    want = ds[k][0].clone()
    loader = cifar_fast.DataLoader(ds, batch_size=1, sampler=[k] * 1000, num_workers=2)
    it = iter(loader)
    assert torch.equal(next(it)[0][0], want)
    with open(live, "r+b") as f:
        f.truncate(cut)
        if grown_back:
            f.truncate(size)
    with pytest.raises(cifar_fast.FormatError, match="live.safetensors.*truncated"):
        ds[k]
    with pytest.raises(cifar_fast.FormatError, match="truncated"):
        for x, _ in it:
            # Batches filled before the cut are whole; none after it is served.
            assert torch.equal(x[0], want)


def test_a_file_truncated_under_a_live_loader_is_an_error(tmp_path, train_file):
    live = tmp_path / "live.safetensors"
    shutil.copy(train_file, live)
    loader = cifar_fast.DataLoader(cifar_fast.TensorFile(live), batch_size=10, num_workers=2)
    it = iter(loader)
    next(it)
    with open(live, "r+b") as f:
        f.truncate(os.path.getsize(live) // 2)
    with pytest.raises(cifar_fast.FormatError, match="live.safetensors.*truncated"):
        for _ in it:
            pass
    # The interpreter goes on; a loader over good data works.
    assert len(list(cifar_fast.DataLoader(cifar_fast.TensorFile(train_file), batch_size=50))) == 2


def test_a_file_replaced_under_a_live_loader_keeps_its_data(tmp_path, train_file):
    live = tmp_path / "live.safetensors"
    shutil.copy(train_file, live)
    ds = cifar_fast.TensorFile(live)
    want = [ds[i][0].clone() for i in range(100)]
    loader = cifar_fast.DataLoader(ds, batch_size=10, num_workers=2)
    it = iter(loader)
    first = next(it)[0]
    other = tmp_path / "other"
    other.write_bytes(os.urandom(1000))
    os.replace(other, live)
    rest = [x for x, _ in it]
    got = torch.cat([first] + rest)
    assert torch.equal(got, torch.stack(want))


def test_an_image_above_the_pixel_limit_is_a_format_error_and_the_limit_can_be_raised(tmp_path):
    from PIL import Image
    for split in ("train", "test"):
        d = tmp_path / "f" / split / "cat"
        d.mkdir(parents=True)
        Image.new("RGB", (40, 30), (1, 2, 3)).save(d / "a.png")
    with pytest.raises(cifar_fast.FormatError, match="40x30 .*above the limit of 1000 pixels"):
        cifar_fast.prepare(tmp_path / "f", out=tmp_path / "out", max_image_pixels=1000)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    with pytest.raises(ValueError, match="max_image_pixels"):
        cifar_fast.prepare(tmp_path / "f", out=tmp_path / "out", max_image_pixels=0)
    splits = cifar_fast.prepare(tmp_path / "f", out=tmp_path / "out", max_image_pixels=1200, name="f")
    assert sorted(splits) == ["test", "train"]
