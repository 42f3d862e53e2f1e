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

import threading
import warnings

from . import _native
from ._native import FormatError, WorkerError
from ._transforms import SUPPORTED as SUPPORTED_TRANSFORMS
from ._transforms import parse as _parse

__all__ = [
    "CIFAR10", "CIFAR100", "ImageFolder", "TensorFile", "DataLoader", "prepare", "FormatError",
    "WorkerError", "SUPPORTED_TRANSFORMS",
]

_TO_TENSOR = ([0.0] * 3, [1.0] * 3)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _resolve(output):
    """The output asked for: torch where it is installed, else NumPy, unless said."""
    if output is None:
        return "torch" if _torch() is not None else "numpy"
    return output


def _converter(output):
    """The function that turns a DLPack producer into the output asked for."""
    output = _resolve(output)
    if output == "torch":
        torch = _torch()
        if torch is None:
            raise ImportError("output='torch' needs torch installed; use output='numpy' without it")
        from_dlpack = torch.from_dlpack
        # The array's own capsule, not the array: torch then takes it as it is, where given the
        # array it first negotiates the protocol's version and options call by call (a quarter
        # of the time a batch spends in `next()` after a training step). Every torch 2.x takes
        # this capsule.
        return lambda array: from_dlpack(array.__dlpack__())
    if output == "numpy":
        import numpy
        return numpy.from_dlpack
    raise ValueError(f"output={output!r}: 'torch' or 'numpy'")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be an integer, but got {name}={value!r}")
    if value < low:
        raise ValueError(f"{name} should be at least {low}, but got {name}={value}")
    return value


class _Dataset:
    """A map-style dataset over native samples: `len(ds)`, `ds[i]` -> `(image, label)`,
    `ds.classes`, `ds.targets`. torch's own DataLoader can read it too."""

    def __init__(self, native, transform, output=None):
        self._native = native
        self.transform = transform
        self._output = output
        self._convert = None

    def __len__(self):
        return len(self._native)

    def __getitem__(self, index):
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"dataset indices must be integers, not {type(index).__name__}")
        if self._convert is None:
            self._convert = _converter(self._output)
        array, label = self._native.get(index.__index__())
        return self._convert(array), label

    @property
    def classes(self):
        return self._native.classes

    @property
    def targets(self):
        return self._native.targets

    @property
    def class_to_idx(self):
        return {c: i for i, c in enumerate(self.classes)}

    def __repr__(self):
        return (f"{type(self).__name__}: {len(self)} samples of {tuple(self._native.shape)} from "
                f"{self._native.path}, transform={self.transform!r}")


def _open_file(path, transform, default_norm):
    import os
    return _native.Dataset.tensor_file(os.fspath(path), **_parse(transform, default_norm).kwargs())


class TensorFile(_Dataset):
    """A tensor file `cifar-prep` made, memory-light and zero-copy. Without a transform, samples
    are the file's values (normalized as it was prepared); with one, the file's pixels go
    through it as `ToTensor()` would give them."""

    def __init__(self, path, transform=None, output=None):
        super().__init__(_open_file(path, transform, None if transform is None else _TO_TENSOR), transform, output)


class CIFAR10(_Dataset):
    """torchvision's `CIFAR10(root, train, transform, target_transform, download)`.

    `root` is prepared once (into `cifar10-{train,test}.safetensors`) by the library function
    `cifar-train`'s first run uses: prepared files found there, else a CIFAR tarball or
    torchvision's extracted folder there, else (`download=True`) the official download, md5
    checked, else where offline the real images beside the checkout. Samples are `ToTensor()`'s
    float tensors when no transform says otherwise."""

    _dataset = "cifar10"

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False, output=None):
        if target_transform is not None:
            raise TypeError(f"target_transform {target_transform!r} is not run by cifar_fast: labels are "
                            "the dataset's integers")
        import os
        train_path, test_path = _native.prepare_root(os.fspath(root), self._dataset, bool(download))
        self.root = root
        self.train = train
        super().__init__(_open_file(train_path if train else test_path, transform, _TO_TENSOR), transform, output)


class CIFAR100(CIFAR10):
    """torchvision's `CIFAR100`, as `CIFAR10` is (fine labels; class names in `classes`)."""

    _dataset = "cifar100"


class ImageFolder(_Dataset):
    """torchvision's `ImageFolder(root, transform)`: `root/<class>/<image>` with classes in sorted
    order, decoded by the workers with torchvision's pixels. Images must be `size` `(width,
    height)` (32x32 by default), or are resized to it with `resize=True`."""

    def __init__(self, root, transform=None, size=None, resize=False, output=None):
        import os
        w, h = (32, 32) if size is None else (_check_int("size", size[0], 1), _check_int("size", size[1], 1))
        native = _parse(transform, _TO_TENSOR)
        super().__init__(_native.Dataset.image_folder(os.fspath(root), size=(w, h), resize=bool(resize),
                                                      **native.kwargs()), transform, output)


def prepare(input, out="data", dtype="f32", mean=None, std=None, dataset_stats=False, size=None, name=None,
            force=False, max_image_pixels=89_478_485):
    """`cifar-prep` from Python: `input` (a CIFAR tarball, torchvision's extracted folder, an image
    folder or an archive of one) into tensor files in `out`. Returns `{split: path}`. An image of
    more than `max_image_pixels` pixels (Pillow's `MAX_IMAGE_PIXELS`) is refused."""
    import os
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    norm = None if mean is None else (_triple3("mean", mean), _triple3("std", std))
    splits = _native.prepare(os.fspath(input), os.fspath(out), dtype=dtype, norm=norm,
                             dataset_stats=bool(dataset_stats), size=size, name=name, force=bool(force),
                             max_image_pixels=_check_int("max_image_pixels", max_image_pixels, 1))
    return dict(splits)


def _triple3(name, values):
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values, got {len(values)}")
    return values


_PIN_WARNED = False
_PIN_LOCK = threading.Lock()


def _warn_pin_once():
    global _PIN_WARNED
    with _PIN_LOCK:
        if not _PIN_WARNED:
            _PIN_WARNED = True
            warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then device "
                          "pinned memory won't be used.", stacklevel=3)


class DataLoader:
    """torch's `DataLoader` over a cifar_fast dataset, its batches made by native workers.

    Each `iter()` is the next epoch (or the one `set_epoch` names); `len()` is the batches of an
    epoch; `state_dict()` / `load_state_dict()` resume mid-epoch with exactly the remaining
    batches, as torchdata's `StatefulDataLoader`. The batches are the same whatever
    `num_workers` for a `seed` (by default drawn from torch's generator, so `torch.manual_seed`
    fixes it). Where `torch.distributed` is initialised, each rank loads its shard (every
    `world_size`-th sample of the epoch's order from `rank` on: disjoint, together the whole
    epoch), unless `rank` and `world_size` say otherwise. `pin_memory=True` gives page-locked
    batches where CUDA is available and warns once where it is not."""

    def __init__(self, dataset, batch_size=1, shuffle=False, num_workers=0, drop_last=False, seed=None,
                 pin_memory=False, prefetch_factor=None, rank=None, world_size=None, output=None):
        if not isinstance(dataset, _Dataset):
            raise TypeError(f"dataset must be a cifar_fast dataset (CIFAR10, CIFAR100, ImageFolder, TensorFile), "
                            f"not {type(dataset).__name__}; for other datasets use torch.utils.data.DataLoader")
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        prefetch = None
        if prefetch_factor is not None:
            prefetch = _check_int("prefetch_factor", prefetch_factor, 1) * max(1, num_workers)
        if seed is None:
            seed = _draw_seed()
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed should be an integer, but got seed={seed!r}")
        rank, world_size = _shard(rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.num_workers = num_workers
        self.drop_last = bool(drop_last)
        self.seed = seed % (1 << 64)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.rank, self.world_size = rank, world_size
        self._prefetch = prefetch
        self._convert = _converter(output)
        # Page-locked memory is torch's (a NumPy array has none to give).
        self._pin = self.pin_memory and _resolve(output) == "torch" and _cuda_available()
        if self.pin_memory and not self._pin:
            _warn_pin_once()
        self._native = self._build()
        # The position the next iter() starts at, and the one state_dict() reports.
        self._epoch, self._start = 0, 0
        self._position = (0, 0)

    def _build(self):
        return _native.Loader(self.dataset._native, self.batch_size, self.shuffle, self.seed, self.num_workers,
                              self.drop_last, self._prefetch, self.rank, self.world_size, not self._pin)

    def __len__(self):
        return len(self._native)

    def set_epoch(self, epoch):
        """The epoch the next `iter()` gives (as `DistributedSampler.set_epoch`)."""
        self._epoch, self._start = _check_int("epoch", epoch, 0), 0
        self._position = (self._epoch, 0)

    def __iter__(self):
        epoch, start = self._epoch, self._start
        self._epoch, self._start = epoch + 1, 0
        return _Batches(self, self._native.epoch(epoch, start), epoch, start)

    def state_dict(self):
        """Where the loader stands: the epoch and the batches of it already yielded, with the
        settings that fix the order (checked when loaded)."""
        epoch, done = self._position
        return {"epoch": epoch, "batches_yielded": done, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "drop_last": self.drop_last, "rank": self.rank,
                "world_size": self.world_size, "dataset_len": len(self.dataset)}

    def load_state_dict(self, state):
        """Resumes at `state`: the next `iter()` yields exactly the batches that remained."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), not {type(state).__name__}")
        missing = [k for k in ("epoch", "batches_yielded", "seed") if k not in state]
        if missing:
            raise ValueError(f"state lacks {', '.join(missing)}: not a cifar_fast DataLoader state_dict()")
        for key in ("batch_size", "shuffle", "drop_last", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]!r}, this loader has {getattr(self, key)!r}")
        if "dataset_len" in state and state["dataset_len"] != len(self.dataset):
            raise ValueError(f"state was saved over {state['dataset_len']} samples, this dataset has {len(self.dataset)}")
        epoch = _check_int("epoch", state["epoch"], 0)
        done = _check_int("batches_yielded", state["batches_yielded"], 0)
        if done > len(self):
            raise ValueError(f"batches_yielded {done} is past the epoch's {len(self)} batches")
        seed = state["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed should be an integer, but got seed={seed!r}")
        if seed % (1 << 64) != self.seed:
            self.seed = seed % (1 << 64)
            self._native = self._build()
        self._epoch, self._start = epoch, done
        self._position = (epoch, done)


class _Batches:
    """One epoch's `(images, labels)` batches; leaving the loop early (or dropping it) stops and
    joins its workers."""

    def __init__(self, loader, native, epoch, start):
        self._loader = loader
        self._native = native
        self._epoch = epoch
        self._done = start

    def __iter__(self):
        return self

    def __len__(self):
        return len(self._native)

    def __next__(self):
        pair = self._native.__next__()
        loader = self._loader
        if pair is None:
            loader._position = (self._epoch + 1, 0)
            raise StopIteration
        self._done += 1
        loader._position = (self._epoch, self._done)
        images, labels = loader._convert(pair[0]), loader._convert(pair[1])
        if loader._pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels

    def close(self):
        """Stops the workers now."""
        self._native.close()

    def __del__(self):
        native = getattr(self, "_native", None)
        if native is not None:
            native.close()


def _draw_seed():
    torch = _torch()
    if torch is not None:
        # As torch's DataLoader draws its base seed: from the default generator.
        return int(torch.empty((), dtype=torch.int64).random_().item())
    import secrets
    return secrets.randbits(63)


def _cuda_available():
    torch = _torch()
    return torch is not None and torch.cuda.is_available()


def _shard(rank, world_size):
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is None:
        torch = _torch()
        dist = getattr(torch, "distributed", None) if torch is not None else None
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank {rank} must be below world_size {world_size}")
    return rank, world_size
