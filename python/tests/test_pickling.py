"""Datasets pickle and copy (their files reopened where unpickled), so torch's own DataLoader
runs them in worker processes under fork, spawn and forkserver; `ds[i]` draws its random crop
and flip from torch's generator exactly as torchvision does."""
import copy
import pickle

import pytest
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2 as v2

import cifar_fast
from conftest import torchvision_cifar

AUGMENTED = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                       T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])


def folder(tmp_path, root):
    import numpy as np
    from PIL import Image
    plain = cifar_fast.CIFAR10(root, train=False, transform=T.PILToTensor())
    for i in range(20):
        d = tmp_path / "folder" / plain.classes[plain.targets[i]]
        d.mkdir(parents=True, exist_ok=True)
        pixels = plain[i][0].permute(1, 2, 0).numpy()  # uint8, as torchvision's PILToTensor
        Image.fromarray(np.ascontiguousarray(pixels)).save(d / f"{i:03}.png")
    return tmp_path / "folder"


def datasets(tmp_path, root, train_file):
    t = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    return [cifar_fast.CIFAR10(root, train=False, transform=t), cifar_fast.TensorFile(train_file),
            cifar_fast.ImageFolder(folder(tmp_path, root), transform=t)]


def test_datasets_pickle_and_deepcopy_to_the_same_samples(tmp_path, root, train_file):
    for ds in datasets(tmp_path, root, train_file):
        for other in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds), copy.copy(ds)):
            assert type(other) is type(ds) and len(other) == len(ds)
            assert other.classes == ds.classes and other.targets == ds.targets
            assert repr(other.transform) == repr(ds.transform)
            for i in (0, len(ds) // 2, len(ds) - 1):
                assert torch.equal(other[i][0], ds[i][0]) and other[i][1] == ds[i][1]


def test_cifar10_keeps_torchvisions_attributes_across_a_pickle(root):
    ds = pickle.loads(pickle.dumps(cifar_fast.CIFAR10(root, train=False)))
    assert ds.root == root and ds.train is False


@pytest.mark.parametrize("context", ["spawn", "forkserver", "fork"])
def test_torchs_dataloader_runs_a_cifar_fast_dataset_in_worker_processes(root, context):
    ds = cifar_fast.CIFAR10(root, train=True, transform=T.ToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=2, multiprocessing_context=context)
    images = torch.cat([x for x, _ in loader])
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(len(ds))]))


@pytest.mark.parametrize("name, transform", [
    ("v1", AUGMENTED),
    ("v1 flip first", T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4), T.ToTensor()])),
    ("v1 after Normalize", T.Compose([T.ToTensor(), T.Normalize((0.4, 0.5, 0.6), (0.2, 0.3, 0.25)),
                                      T.RandomCrop(32, padding=3, padding_mode="edge"),
                                      T.RandomHorizontalFlip()])),
    ("v2", v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4, padding_mode="symmetric"),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])),
])
def test_a_random_sample_is_torchvisions_for_the_same_torch_seed(root, torchvision_root, name, transform):
    ours = cifar_fast.CIFAR10(root, train=False, transform=transform)
    theirs = torchvision_cifar(torchvision_root, False, transform)
    for i in range(30):
        torch.manual_seed(1000 + i)
        a, _ = ours[i]
        after_ours = torch.rand(1)
        torch.manual_seed(1000 + i)
        b, _ = theirs[i]
        after_theirs = torch.rand(1)
        tol = 1e-6 if name == "v2" else 0
        assert torch.allclose(a, b, rtol=0, atol=tol), f"{name}: sample {i}"
        assert torch.equal(after_ours, after_theirs), "as many draws as torchvision"


def test_under_torchs_forked_workers_each_epoch_draws_anew_as_torchvision(root, torchvision_root):
    ours = cifar_fast.CIFAR10(root, train=False, transform=AUGMENTED)
    theirs = torchvision_cifar(torchvision_root, False, AUGMENTED)
    runs = []
    for ds in (ours, theirs):
        torch.manual_seed(7)
        loader = torch.utils.data.DataLoader(ds, batch_size=25, num_workers=2, multiprocessing_context="fork")
        runs.append([torch.cat([x for x, _ in loader]) for _ in range(2)])
    assert not torch.equal(runs[0][0], runs[0][1]), "a new crop and flip each epoch"
    for e in range(2):
        assert torch.equal(runs[0][e], runs[1][e])
