"""Where arrays go when they leave the package: torch tensors where torch is installed, NumPy
arrays otherwise (or when asked), each taken zero-copy through DLPack."""


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def numpy():
    """NumPy, at a version that takes DLPack (`numpy.from_dlpack`, 1.22 and later)."""
    try:
        import numpy as np
    except ImportError:
        raise ImportError("cifar_fast needs NumPy >= 1.22 for output='numpy' (pip install 'numpy>=1.22'), "
                          "or torch for tensors") from None
    if not hasattr(np, "from_dlpack"):
        raise ImportError(f"cifar_fast needs NumPy >= 1.22 (numpy.from_dlpack); found NumPy "
                          f"{getattr(np, '__version__', '(unknown version)')}: pip install -U 'numpy>=1.22'")
    return np


def resolve(output):
    """The output asked for: torch where it is installed, else NumPy, unless said."""
    if output is None:
        return "torch" if torch_or_none() is not None else "numpy"
    if output not in ("torch", "numpy"):
        raise ValueError(f"output={output!r}: 'torch' or 'numpy'")
    return output


def converter(output):
    """`(convert, capsule)`: the function that takes an array out, and whether it takes the
    array's DLPack capsule (torch) rather than the array (NumPy)."""
    output = resolve(output)
    if output == "torch":
        torch = torch_or_none()
        if torch is None:
            raise ImportError("output='torch' needs torch installed; use output='numpy' without it")
        # The array's own capsule, not the array: torch then takes it as it is, where given the
        # array it first negotiates the protocol's version and options call by call (a quarter
        # of the time a batch spends in `next()` after a training step). Every torch 2.x takes
        # this capsule. `torch._C._from_dlpack` is what `torch.from_dlpack` ends in for a
        # capsule; calling it directly skips that function's probing of its argument (a failed
        # `hasattr`, a Python frame), which at small batches is a visible share of `next()`.
        return getattr(torch._C, "_from_dlpack", None) or torch.from_dlpack, True
    return numpy().from_dlpack, False


def convert_one(array, output):
    """One array out, as `converter(output)` would take it."""
    convert, capsule = converter(output)
    return convert(array.__dlpack__() if capsule else array)
