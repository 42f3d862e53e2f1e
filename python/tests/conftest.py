"""Fixtures: a small real CIFAR-10 (10 real images a class, in the official layouts), and
helpers the tests share."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.abspath(os.path.join(HERE, "..", ".."))
SHARED = os.path.join(CHECKOUT, "..", "shared")


@pytest.fixture(scope="session")
def tarballs(tmp_path_factory):
    """A directory with cifar-10-binary.tar.gz and cifar-10-python.tar.gz of 10 real images a class
    per split (100 train, 100 test), made by the shared tool from the real JPEGs."""
    out = tmp_path_factory.mktemp("tarballs")
    subprocess.run([sys.executable, os.path.join(SHARED, "tools", "make-cifar-tarballs.py"), str(out),
                    "--limit", "10"], check=True, stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="session")
def torchvision_root(tarballs, tmp_path_factory):
    """torchvision's root for the same data: the python tarball extracted."""
    root = tmp_path_factory.mktemp("tv")
    with tarfile.open(tarballs / "cifar-10-python.tar.gz") as t:
        t.extractall(root)
    return root


@pytest.fixture(scope="session")
def root(tarballs, tmp_path_factory):
    """Our root: the binary tarball alone, prepared once on first use."""
    root = tmp_path_factory.mktemp("ours")
    shutil.copy(tarballs / "cifar-10-binary.tar.gz", root)
    import cifar_fast
    cifar_fast.CIFAR10(root, train=True, download=True)
    return root


@pytest.fixture
def train_file(root):
    return root / "cifar10-train.safetensors"


def torchvision_cifar(root, train, transform):
    """torchvision's CIFAR10 over the JPEG-made tarball, whose md5 cannot be the official one."""
    from unittest import mock
    import torchvision
    with mock.patch("torchvision.datasets.cifar.check_integrity", return_value=True):
        return torchvision.datasets.CIFAR10(str(root), train=train, transform=transform, download=False)


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """An ImageNet-like folder of real photographs (the shared tool's, ImageNet's sizes, JPEG
    settings and oddities: grey, CMYK, a PNG named .JPEG, EXIF rotation), 60 train and 20 val
    images in 4 classes, a third of them odd."""
    out = tmp_path_factory.mktemp("photos")
    subprocess.run([sys.executable, os.path.join(SHARED, "tools", "make-photo-folder.py"), str(out),
                    "--train", "60", "--val", "20", "--classes", "4", "--odd-share", "0.3", "--seed", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    return out
