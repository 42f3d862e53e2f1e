"""A pip user's first run and the attributes torch users set: data already on disk in
torchvision's layouts is used, the errors name what a pip user has, the package declares what it
needs; a transform set after construction is run, a batch_size set after it is refused; labels
do not keep their batch's images alive."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
import torchvision.transforms as T

import cifar_fast
from conftest import CHECKOUT, torchvision_cifar


def test_torchvisions_extracted_folder_is_used_without_download(torchvision_root, tmp_path):
    root = tmp_path / "tv"
    shutil.copytree(torchvision_root, root)
    assert (root / "cifar-10-batches-py").is_dir()
    ours = cifar_fast.CIFAR10(root, train=False, download=False, transform=T.ToTensor())
    theirs = torchvision_cifar(torchvision_root, False, T.ToTensor())
    assert len(ours) == len(theirs) and all(torch.equal(ours[i][0], theirs[i][0]) for i in range(len(ours)))


@pytest.mark.parametrize("name", ["cifar-10-python.tar.gz", "cifar-10-binary.tar.gz"])
def test_a_tarball_in_root_is_used_without_download(tarballs, tmp_path, name):
    shutil.copy(tarballs / name, tmp_path)
    ds = cifar_fast.CIFAR10(tmp_path, train=True, download=False)
    assert len(ds) == 100


def test_without_data_the_error_names_what_a_pip_user_has(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        cifar_fast.CIFAR10(tmp_path / "none", download=False)
    assert "cifar_fast.prepare" in str(e.value) and "cifar-prep" not in str(e.value)
    assert "cifar-10-python.tar.gz" in str(e.value)


def test_the_offline_fallback_ignores_the_working_directory(tmp_path):
    # A `../shared/data/cifar-10-jpeg.tar.gz` beside wherever the user happens to stand is not
    # taken for the real images.
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "cifar-10-jpeg.tar.gz").write_bytes(b"not the images")
    (tmp_path / "here").mkdir()
    script = f"""
import cifar_fast
try:
    cifar_fast.CIFAR10("root", download=True)
    print("prepared")
except Exception as e:
    print(type(e).__name__, e)
"""
    env = dict(os.environ, CIFAR_FAST_OFFLINE_IMAGES="")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path / "here", capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "not the images" not in out.stdout + out.stderr
    assert str(tmp_path / "shared") not in out.stdout + out.stderr and "../shared" not in out.stderr


def test_the_package_declares_numpy_and_the_rust_it_needs():
    import tomllib
    with open(os.path.join(CHECKOUT, "python", "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert any(d.replace(" ", "").startswith("numpy>=1.22") for d in project["dependencies"])
    with open(os.path.join(CHECKOUT, "python", "Cargo.toml"), "rb") as f:
        package = tomllib.load(f)["package"]
    assert package.get("rust-version")


def test_a_numpy_without_from_dlpack_is_a_clear_import_error(root, monkeypatch):
    import types
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="1.21.6"))
    ds = cifar_fast.CIFAR10(root, train=False, output="numpy")
    with pytest.raises(ImportError, match="NumPy >= 1.22.*1.21.6"):
        ds[0]


def test_a_transform_set_after_construction_is_run(root, torchvision_root):
    ds = cifar_fast.CIFAR10(root, train=False)
    norm = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    loader = cifar_fast.DataLoader(ds, batch_size=100)
    before = next(iter(loader))[0]
    ds.transform = norm
    assert "Normalize" in repr(ds)
    theirs = torchvision_cifar(torchvision_root, False, norm)
    assert torch.equal(ds[5][0], theirs[5][0])
    after = next(iter(loader))[0]
    assert torch.equal(after, before * 2 - 1)
    with pytest.raises(TypeError, match="ColorJitter"):
        ds.transform = T.ColorJitter(0.1)
    assert torch.equal(ds[5][0], theirs[5][0]), "a refused transform changes nothing"


@pytest.mark.parametrize("attr, value", [("batch_size", 64), ("drop_last", True), ("dataset", None),
                                         ("sampler", None)])
def test_setting_what_fixes_the_batches_after_construction_is_refused_as_in_torch(root, attr, value):
    loader = cifar_fast.DataLoader(cifar_fast.CIFAR10(root, train=False), batch_size=4)
    with pytest.raises(ValueError, match=f"{attr} attribute should not be set after DataLoader is initialized"):
        setattr(loader, attr, value)
    assert loader.state_dict()["batch_size"] == 4 and len(loader) == 25


def test_num_workers_set_after_construction_applies_to_the_next_epoch(root):
    loader = cifar_fast.DataLoader(cifar_fast.CIFAR10(root, train=False), batch_size=4, seed=1, shuffle=True)
    loader.num_workers = 2
    before = set(os.listdir("/proc/self/task"))
    it = iter(loader)
    next(it)
    assert len(set(os.listdir("/proc/self/task")) - before) >= 2
    it.close()


def test_labels_kept_alone_do_not_keep_their_images(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file
    n = 20000
    rng = np.random.default_rng(0)
    path = tmp_path / "big.safetensors"
    save_file({"images": rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8),
               "labels": rng.integers(0, 10, n, dtype=np.int64)}, str(path))
    ds = cifar_fast.TensorFile(path)

    def rss():
        # Anonymous memory only: the file's pages, mapped and read, count in the RSS too.
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) << 10 for l in f if l.startswith("RssAnon:"))

    loader = cifar_fast.DataLoader(ds, batch_size=4)
    start = rss()
    labels = [y for _, y in loader]  # 245 MB of images went by
    grown = rss() - start
    assert len(labels) == 5000 and sum(len(y) for y in labels) == n
    assert grown < 40 << 20, f"grew {grown >> 20} MB keeping the labels"
