"""Sample for sample, the values torchvision gives for the same images and transform."""
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as v2
import torchvision.transforms.functional as F

import cifar_fast
from conftest import torchvision_cifar

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

DETERMINISTIC = {
    "tutorial": T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]),
    "to_tensor": T.ToTensor(),
    "cifar_stats": T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]),
    "v2": v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)]),
    "one_value_norm": T.Compose([T.ToTensor(), T.Normalize([0.25], [0.125])]),
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
@pytest.mark.parametrize("train", [True, False])
def test_every_index_equals_torchvision(root, torchvision_root, name, train):
    transform = DETERMINISTIC[name]
    ours = cifar_fast.CIFAR10(root, train=train, transform=transform)
    theirs = torchvision_cifar(torchvision_root, train, transform)
    assert len(ours) == len(theirs) == 100
    assert ours.classes == theirs.classes
    assert ours.targets == theirs.targets
    for i in range(len(theirs)):
        a, la = ours[i]
        b, lb = theirs[i]
        assert la == lb
        assert a.dtype == torch.float32 and a.shape == (3, 32, 32)
        if name == "v2":
            # v2's ToDtype scales by multiplying with 1/255 where ToTensor divides by 255: the
            # two differ by an ulp here and there, and the native pipeline computes ToTensor's.
            assert torch.allclose(a, b, rtol=0, atol=1e-6), f"sample {i}: {(a - b).abs().max()}"
        else:
            assert torch.equal(a, b), f"sample {i}: max difference {(a - b).abs().max()}"
    assert torch.equal(ours[-1][0], ours[len(ours) - 1][0])


def _candidates(img, padding, mode, fill, post=lambda x: x):
    """Every output RandomCrop(32, padding) + RandomHorizontalFlip (then `post`) can give for
    `img` (a PIL image or a tensor), made with torchvision's own functions."""
    padded = F.pad(img, [padding] * 4, fill=fill, padding_mode=mode)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = F.crop(padded, dy, dx, 32, 32)
            out += [post(crop), post(F.hflip(crop))]
    return out


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "symmetric"])
@pytest.mark.parametrize("where", ["before_to_tensor", "after_normalize"])
def test_random_crop_and_flip_give_one_of_torchvisions_outputs(root, torchvision_root, mode, where):
    norm = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    fill = (10, 200, 30) if where == "before_to_tensor" else 0
    crop = T.RandomCrop(32, padding=4, padding_mode=mode, fill=fill)
    if where == "before_to_tensor":
        transform = T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), norm])
    else:
        transform = T.Compose([T.ToTensor(), norm, crop, T.RandomHorizontalFlip()])
    ours = cifar_fast.CIFAR10(root, train=False, transform=transform)
    pil = torchvision_cifar(torchvision_root, False, None)
    flips = shifts = 0
    for i in range(40):
        if where == "before_to_tensor":
            cands = _candidates(pil[i][0], 4, mode, fill, post=T.Compose([T.ToTensor(), norm]))
        else:
            cands = _candidates(norm(T.ToTensor()(pil[i][0])), 4, mode, fill)
        got = ours[i][0]
        hits = [k for k, c in enumerate(cands) if torch.equal(got, c)]
        assert hits, f"sample {i}: not one of RandomCrop's outputs"
        flips += hits[0] % 2
        shifts += hits[0] // 2 != 4 * 9 + 4
    # Random, not stuck: both flips and crops other than the centre occur.
    assert 5 < flips < 35 and shifts > 20


def test_draws_differ_from_access_to_access(root):
    ds = cifar_fast.CIFAR10(root, train=False, transform=T.Compose([T.RandomCrop(32, padding=4), T.ToTensor()]))
    assert any(not torch.equal(ds[0][0], ds[0][0]) for _ in range(10))


def test_tensor_file_without_transform_is_the_files_values(train_file):
    from safetensors.numpy import load_file
    stored = load_file(str(train_file))
    ds = cifar_fast.TensorFile(train_file)
    assert len(ds) == stored["images"].shape[0]
    for i in (0, 17, len(ds) - 1):
        assert torch.equal(ds[i][0], torch.from_numpy(stored["images"][i]))
        assert ds[i][1] == int(stored["labels"][i])


def test_a_u8_file_reads_as_the_f32_one(tmp_path, tarballs, root):
    cifar_fast.prepare(tarballs / "cifar-10-binary.tar.gz", out=tmp_path, dtype="u8")
    t = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    a = cifar_fast.TensorFile(tmp_path / "cifar10-train.safetensors", transform=t)
    b = cifar_fast.TensorFile(root / "cifar10-train.safetensors", transform=t)
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0])


def test_image_folder_matches_torchvisions(tmp_path, root):
    import numpy as np
    from PIL import Image
    import torchvision
    plain = cifar_fast.CIFAR10(root, train=False, transform=T.PILToTensor())
    for i in range(30):
        d = tmp_path / "folder" / plain.classes[plain.targets[i]]
        d.mkdir(parents=True, exist_ok=True)
        pixels = plain[i][0].permute(1, 2, 0).numpy()  # uint8, as torchvision's PILToTensor
        Image.fromarray(np.ascontiguousarray(pixels)).save(d / f"{i:03}.png")
    t = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    ours = cifar_fast.ImageFolder(tmp_path / "folder", transform=t)
    theirs = torchvision.datasets.ImageFolder(str(tmp_path / "folder"), transform=t)
    assert ours.classes == theirs.classes and ours.targets == theirs.targets
    for i in range(len(theirs)):
        assert torch.equal(ours[i][0], theirs[i][0]) and ours[i][1] == theirs[i][1]
