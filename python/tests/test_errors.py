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


def test_a_corrupt_image_in_a_folder_names_it_and_the_loader_goes_on(tmp_path, root):
    d = tmp_path / "f" / "cat"
    d.mkdir(parents=True)
    from PIL import Image
    for i in range(6):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(d / f"{i}.png")
    (d / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    ds = cifar_fast.ImageFolder(tmp_path / "f")
    loader = cifar_fast.DataLoader(ds, batch_size=2, num_workers=2)
    with pytest.raises(cifar_fast.FormatError, match="3.png"):
        list(loader)
    with pytest.raises(cifar_fast.FormatError, match="3.png"):
        ds[3]
    assert len(ds[2][0]) == 3


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
