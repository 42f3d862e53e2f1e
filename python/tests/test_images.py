"""Images of every size, as torchvision reads them: real photographs (ImageNet's sizes and
oddities) decoded to Pillow's pixels, torchvision's RandomResizedCrop / Resize / CenterCrop to
the level, uint8 batches, the same batches from the folder and from its encoded file."""
import copy
import os
import pickle
import shutil
import warnings

import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2 as v2

import cifar_fast

RRC = T.Compose([T.RandomResizedCrop(96), T.RandomHorizontalFlip(), T.PILToTensor()])
CENTER = T.Compose([T.Resize(112), T.CenterCrop(96), T.PILToTensor()])


def compare(ours, theirs, seeds):
    """Per-value absolute differences of ours[i] and theirs[i] after the same torch seed."""
    diffs = []
    for i in seeds:
        torch.manual_seed(i)
        a, la = ours[i]
        torch.manual_seed(i)
        b, lb = theirs[i]
        assert la == lb and a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        diffs.append((a.int() - b.int()).abs().flatten())
    return torch.cat(diffs).float()


@pytest.mark.parametrize("name", ["crop", "rrc", "center", "v2 rrc"])
def test_without_dct_scaling_every_value_is_torchvisions_within_a_level(photos, name):
    transform = {
        # No resize: decoded pixels alone, padded where the image is smaller (zeros, as torchvision).
        "crop": T.Compose([T.CenterCrop(160), T.PILToTensor()]),
        "rrc": RRC,
        "center": CENTER,
        "v2 rrc": v2.Compose([v2.RandomResizedCrop(80, scale=(0.2, 1)), v2.RandomHorizontalFlip(), v2.PILToTensor()]),
    }[name]
    root = str(photos / "train")
    ours = cifar_fast.ImageFolder(root, transform=transform, dct_scaling=False)
    theirs = torchvision.datasets.ImageFolder(root, transform=transform)
    assert ours.classes == theirs.classes and ours.targets == theirs.targets
    d = compare(ours, theirs, range(len(theirs)))
    # Pillow resizes with a vertical pass first for some shapes since 13.0; this resize always
    # runs the horizontal one first (Pillow's order before), so a value may round the other way.
    assert d.max() <= (0 if name == "crop" else 1), f"{name}: {d.max()}"
    assert d.mean() < 0.05


def test_with_dct_scaling_values_stay_within_the_tolerances(photos):
    # A small output from large images: regions of twice the output and more decode at 1/2 to 1/8.
    for transform in (T.Compose([T.Resize(48), T.CenterCrop(48), T.PILToTensor()]),
                      T.Compose([T.RandomResizedCrop(48, scale=(0.5, 1)), T.PILToTensor()])):
        root = str(photos / "train")
        ours = cifar_fast.ImageFolder(root, transform=transform)
        theirs = torchvision.datasets.ImageFolder(root, transform=transform)
        d = compare(ours, theirs, range(len(theirs)))
        assert d.mean() <= 1.5 and d.quantile(0.99) <= 16, (d.mean(), d.quantile(0.99))


def test_uint8_batches_are_the_pixels_of_the_float_ones(photos):
    root = photos / "train"
    u8 = cifar_fast.ImageFolder(root, transform=CENTER)
    f32 = cifar_fast.ImageFolder(root, transform=T.Compose([T.Resize(112), T.CenterCrop(96), T.ToTensor()]))
    (a, y), (b, z) = (next(iter(cifar_fast.DataLoader(ds, batch_size=16))) for ds in (u8, f32))
    assert a.dtype == torch.uint8 and b.dtype == torch.float32 and a.shape == (16, 3, 96, 96)
    assert torch.equal(y, z) and torch.equal(a.float() / 255, b)
    v2u8 = cifar_fast.ImageFolder(root, transform=v2.Compose([v2.Resize(112), v2.CenterCrop(96), v2.ToImage()]))
    assert torch.equal(next(iter(cifar_fast.DataLoader(v2u8, batch_size=16)))[0], a)


@pytest.fixture(scope="module")
def encoded(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoded")
    splits = cifar_fast.prepare(photos, out=out, name="photos")
    return splits


def test_prepare_keeps_jpegs_byte_for_byte_in_a_file_any_safetensors_reader_opens(photos, encoded):
    from safetensors.numpy import load_file
    assert sorted(encoded) == ["train", "val"]
    t = load_file(encoded["train"])
    assert sorted(t) == ["images", "labels", "offsets", "sizes"]
    listing = torchvision.datasets.ImageFolder(str(photos / "train"))
    assert t["labels"].tolist() == listing.targets
    from PIL import Image
    for i, (path, _) in enumerate(listing.samples):
        start, end = t["offsets"][i]
        stored = t["images"][start:end].tobytes()
        with open(path, "rb") as f:
            original = f.read()
        im = Image.open(path)
        assert tuple(t["sizes"][i]) == (im.height, im.width)
        if im.format == "JPEG":
            assert stored == original, path
        else:
            # Another format (the PNG named .JPEG): the lossless PNG of its RGB.
            assert stored[:4] == b"\x89PNG"
    size = sum(os.path.getsize(p) for p, _ in listing.samples)
    assert os.path.getsize(encoded["train"]) <= 1.01 * size + (64 << 10)


def test_the_folder_and_its_encoded_file_give_the_same_batches(photos, encoded):
    t = T.Compose([T.RandomResizedCrop(64), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3)])
    a = cifar_fast.ImageFolder(photos / "train", transform=t)
    b = cifar_fast.TensorFile(encoded["train"], transform=t)
    runs = []
    for ds in (a, b, b):
        for workers in (0, 2):
            loader = cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, seed=4)
            runs.append([(x.clone(), y.clone()) for _ in range(2) for x, y in loader])
    for run in runs[1:]:
        assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(runs[0], run))
    # A new crop each epoch.
    assert not torch.equal(runs[0][0][0], runs[0][len(runs[0]) // 2][0])


def test_resume_mid_epoch_gives_the_remaining_batches(encoded):
    ds = cifar_fast.TensorFile(encoded["train"], transform=RRC)
    whole = [(x.clone(), y.clone()) for x, y in cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, seed=9)]
    loader = cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, seed=9, num_workers=2)
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    del it
    resumed = cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(head) + len(rest) == len(whole)
    assert all(torch.equal(x, u) for (x, _), (u, _) in zip(head + rest, whole))


def test_image_datasets_pickle_and_copy(photos, encoded):
    for ds in (cifar_fast.ImageFolder(photos / "val", transform=CENTER), cifar_fast.TensorFile(encoded["val"], transform=CENTER)):
        for other in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
            assert len(other) == len(ds) and other.targets == ds.targets
            assert all(torch.equal(other[i][0], ds[i][0]) for i in range(len(ds)))


def test_torchs_dataloader_reads_an_image_dataset_under_spawn(photos):
    ds = cifar_fast.ImageFolder(photos / "val", transform=CENTER)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="spawn")
    assert torch.equal(torch.cat([x for x, _ in loader]), torch.stack([ds[i][0] for i in range(len(ds))]))


@pytest.mark.parametrize("transform, words", [
    (T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToTensor()]), "bicubic"),
    (T.Compose([T.CenterCrop(64), T.Resize(64), T.ToTensor()]), "one resize, before any crop"),
    (T.Compose([T.Resize(64), T.ToTensor()]), "size of its own"),
    (T.Compose([T.Resize(64, max_size=80), T.CenterCrop(64), T.ToTensor()]), "max_size"),
])
def test_transforms_not_run_natively_on_images_are_type_errors(photos, transform, words):
    with pytest.raises(TypeError, match=words):
        cifar_fast.ImageFolder(photos / "val", transform=transform)


def test_a_cut_jpeg_or_one_above_the_pixel_limit_fails_its_batch_naming_it(photos, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(photos / "val", folder)
    victim = sorted((folder / "class00").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    ds = cifar_fast.ImageFolder(folder, transform=CENTER)
    loader = cifar_fast.DataLoader(ds, batch_size=1)
    got, errors = 0, []
    it = iter(loader)
    for _ in range(len(loader)):
        try:
            next(it)
            got += 1
        except cifar_fast.FormatError as e:
            errors.append(str(e))
    assert got == len(ds) - 1 and len(errors) == 1 and victim.name in errors[0] and "truncated" in errors[0]
    small = cifar_fast.ImageFolder(photos / "val", transform=CENTER, max_image_pixels=1000)
    with pytest.raises(cifar_fast.FormatError, match="above the limit of 1000 pixels"):
        small[0]


def test_a_decoder_without_simd_says_so(photos, monkeypatch):
    monkeypatch.setattr(cifar_fast._native, "JPEG_SIMD", False)
    monkeypatch.setattr(cifar_fast._datasets, "_SIMD_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cifar_fast.ImageFolder(photos / "val", transform=CENTER)
    assert any("SIMD" in str(w.message) and "nasm" in str(w.message) for w in caught)
    assert cifar_fast._native.JPEG_SIMD is False


def test_a_folder_of_one_size_is_loaded_at_that_size_as_torchvision_does(tmp_path):
    from PIL import Image
    import numpy as np
    import torchvision
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    tf = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    ours = cifar_fast.DataLoader(cifar_fast.ImageFolder(tmp_path, transform=tf), batch_size=4)
    theirs = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(tmp_path, transform=tf), batch_size=4)
    for (x, y), (xt, yt) in zip(ours, theirs):
        assert x.shape[1:] == (3, 48, 64)
        assert torch.allclose(x, xt, atol=1e-6) and torch.equal(y, yt)
    # An image of another size fails its batch, naming it and the way out (torch's collate
    # fails there too); the other batches load.
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "b" / "odd.png")
    loader = cifar_fast.DataLoader(cifar_fast.ImageFolder(tmp_path, transform=tf), batch_size=4)
    it, good = iter(loader), 0
    with pytest.raises(cifar_fast.FormatError, match=r"odd\.png.*32x32, expected 64x48.*resize"):
        for _ in range(2):
            next(it)
            good += 1
    assert good == 1


def test_timeout_without_workers_is_ignored_as_torch_ignores_it(encoded):
    loader = cifar_fast.DataLoader(cifar_fast.TensorFile(encoded["val"], transform=T.Compose([T.Resize(40), T.CenterCrop(32),
                                                                                       T.ToTensor()])),
                                   batch_size=8, num_workers=0, timeout=1e-6)
    assert sum(len(y) for _, y in loader) == len(loader.dataset)
