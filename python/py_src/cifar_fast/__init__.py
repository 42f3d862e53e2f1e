"""CIFAR datasets and a DataLoader that never keeps the model waiting.

torchvision's and torch's names over a Rust pipeline: the tutorial's script keeps its loop and
changes only its data lines::

    import cifar_fast
    trainset = cifar_fast.CIFAR10(root="./data", train=True, download=True, transform=transform)
    trainloader = cifar_fast.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)

The transform runs natively on the loader's worker threads (no Python runs there), batches
leave Rust zero-copy through DLPack as torch tensors (or NumPy arrays, with no torch
installed), and the batches of a seed are the same whatever the number of workers.
"""

from ._datasets import CIFAR10, CIFAR100, ImageFolder, TensorFile, prepare
from ._loader import DataLoader
from ._native import FormatError, WorkerError
from ._transforms import SUPPORTED as SUPPORTED_TRANSFORMS

__all__ = [
    "CIFAR10", "CIFAR100", "ImageFolder", "TensorFile", "DataLoader", "prepare", "FormatError",
    "WorkerError", "SUPPORTED_TRANSFORMS",
]
