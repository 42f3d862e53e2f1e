"""The datasets: torchvision's `CIFAR10`, `CIFAR100` and `ImageFolder`, and `TensorFile` for a
file `prepare` made, each a map-style dataset over native samples that torch's own DataLoader
reads too, pickles (its file or folder opened anew where it is unpickled) and copies."""

import hashlib
import os
import warnings

from . import _native
from ._native import FormatError
from ._output import converter
from ._transforms import parse

_TO_TENSOR = ([0.0] * 3, [1.0] * 3)


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be an integer, but got {name}={value!r}")
    if value < low:
        raise ValueError(f"{name} should be at least {low}, but got {name}={value}")
    if high is not None and value > high:
        raise ValueError(f"{name} should be at most {high}, but got {name}={value}")
    return value


def _fingerprint(path):
    """What identifies a tensor file: its length and its header (shapes, normalization, and the
    checksum of what it was made from)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(min(n, 100_000_000))
    return os.path.getsize(path), hashlib.sha256(header).hexdigest()


_SIMD_WARNED = False


def _warn_without_simd():
    """Says once that JPEGs decode without libjpeg-turbo's SIMD code (the package was built
    without nasm): the same pixels, at about half the speed."""
    global _SIMD_WARNED
    if not _native.JPEG_SIMD and not _SIMD_WARNED:
        _SIMD_WARNED = True
        warnings.warn("cifar_fast was built without libjpeg-turbo's SIMD code (nasm was not installed): JPEG "
                      "decoding runs at about half speed; install nasm and reinstall the package", stacklevel=4)


def _restore(cls, state):
    """Unpickles a dataset: made anew from `state` (see `_Dataset.__reduce__`)."""
    ds = cls.__new__(cls)
    ds._restore(state)
    return ds


class _Dataset:
    """A map-style dataset over native samples: `len(ds)`, `ds[i]` -> `(image, label)`,
    `ds.classes`, `ds.targets`. torch's own DataLoader reads it too, in worker processes
    started any way (it pickles). Setting `ds.transform` runs the new transform from then on,
    in `ds[i]` and in each DataLoader epoch begun after."""

    def _setup(self, native, transform, spec, output):
        if spec.on_images:
            _warn_without_simd()
        self._native = native
        self._transform = transform
        self._spec = spec
        self._output = output
        self._convert = None

    def _norm_for(self, transform):
        """The normalization of a transform that names none."""
        return _TO_TENSOR

    def _parse(self, transform):
        spec = parse(transform, self._norm_for(transform))
        spec.dct_scaling = getattr(self, "_dct_scaling", True)
        spec.max_image_pixels = getattr(self, "_max_image_pixels", spec.max_image_pixels)
        return spec

    @property
    def transform(self):
        return self._transform

    @transform.setter
    def transform(self, transform):
        spec = self._parse(transform)
        native = self._native.with_transform(spec.kwargs())
        self._native, self._spec, self._transform = native, spec, transform

    def __len__(self):
        return len(self._native)

    def __getitem__(self, index):
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"dataset indices must be integers, not {type(index).__name__}")
        if self._convert is None:
            self._convert = converter(self._output)
        convert, capsule = self._convert
        array, label = self._native.get(index.__index__(), self._spec.draw())
        return convert(array.__dlpack__() if capsule else array), label

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

    def __reduce__(self):
        return _restore, (type(self), self._state())

    def _state(self):
        raise NotImplementedError

    def _restore(self, state):
        raise NotImplementedError

    # A file opened, for TensorFile and the CIFAR datasets.
    def _open_file(self, path, transform, output):
        spec = self._parse(transform)
        self._setup(_native.Dataset.tensor_file(os.fspath(path), spec.kwargs()), transform, spec, output)

    def _decoding(self, dct_scaling, max_image_pixels):
        self._dct_scaling = bool(dct_scaling)
        self._max_image_pixels = _check_int("max_image_pixels", max_image_pixels, 1)

    def _file_state(self):
        path = self._native.path
        return dict(path=path, fingerprint=_fingerprint(path), transform=self._transform, output=self._output,
                    dct_scaling=getattr(self, "_dct_scaling", True),
                    max_image_pixels=getattr(self, "_max_image_pixels", 89_478_485))

    def _reopen_file(self, state):
        path = state["path"]
        try:
            now = _fingerprint(path)
        except OSError:
            now = None
        if now != state["fingerprint"]:
            raise FormatError(f"{path}: is not the file the dataset was pickled with (changed, replaced or "
                              "gone since): open it anew")
        self._decoding(state.get("dct_scaling", True), state.get("max_image_pixels", 89_478_485))
        self._open_file(path, state["transform"], state["output"])


class TensorFile(_Dataset):
    """A tensor file `prepare` (or `cifar-prep`) made, memory-light and zero-copy. Without a
    transform, samples are the file's values (normalized as it was prepared); with one, the
    file's pixels go through it as `ToTensor()` would give them. An encoded file (images of
    every size, kept as their JPEG or PNG bytes) needs a transform that gives them one size
    (`RandomResizedCrop`, `Resize` + `CenterCrop`); its images are decoded by the workers, only
    the part each crop needs, at a DCT scaling of 1/2 to 1/8 where the crop is that many times
    the output (`dct_scaling=False`: Pillow's pixels to the level, slower)."""

    def __init__(self, path, transform=None, output=None, *, dct_scaling=True, max_image_pixels=89_478_485):
        self._decoding(dct_scaling, max_image_pixels)
        self._open_file(path, transform, output)

    def _norm_for(self, transform):
        return None if transform is None else _TO_TENSOR

    _state = _Dataset._file_state
    _restore = _Dataset._reopen_file


class CIFAR10(_Dataset):
    """torchvision's `CIFAR10(root, train, transform, target_transform, download)`.

    `root` is prepared once (into `cifar10-{train,test}.safetensors`) by the library function
    `cifar-train`'s first run uses: prepared files found there, else a CIFAR tarball or
    torchvision's extracted folder there (with or without `download`), else (`download=True`)
    the official download, md5 checked. Samples are `ToTensor()`'s float tensors when no
    transform says otherwise."""

    _dataset = "cifar10"

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False, output=None):
        if target_transform is not None:
            raise TypeError(f"target_transform {target_transform!r} is not run by cifar_fast: labels are "
                            "the dataset's integers")
        train_path, test_path = _native.prepare_root(os.fspath(root), self._dataset, bool(download))
        self.root = root
        self.train = train
        self._open_file(train_path if train else test_path, transform, output)

    def _state(self):
        return dict(self._file_state(), root=self.root, train=self.train)

    def _restore(self, state):
        self.root, self.train = state["root"], state["train"]
        self._reopen_file(state)


class CIFAR100(CIFAR10):
    """torchvision's `CIFAR100`, as `CIFAR10` is (fine labels; class names in `classes`)."""

    _dataset = "cifar100"


class ImageFolder(_Dataset):
    """torchvision's `ImageFolder(root, transform, ..., allow_empty)`: `root/<class>/**/<image>`
    with classes in sorted order and images in torchvision's order (sub-folders included),
    decoded by the workers with torchvision's pixels. With a transform that gives every image
    one size (`RandomResizedCrop`, `Resize` + `CenterCrop`, ...), images of every size are read
    as they are, only the part each crop needs decoded (see `TensorFile` for `dct_scaling`);
    otherwise images must be `size` `(width, height)` (by default the first image's, as a batch
    of torchvision's holds one size), or are resized to it with `resize=True`. `samples` lists `(path, class_index)` as torchvision's does."""

    def __init__(self, root, transform=None, target_transform=None, loader=None, is_valid_file=None,
                 allow_empty=False, *, size=None, resize=False, output=None, dct_scaling=True,
                 max_image_pixels=89_478_485):
        for name, value in (("target_transform", target_transform), ("loader", loader),
                            ("is_valid_file", is_valid_file)):
            if value is not None:
                raise TypeError(f"{name} {value!r} is not run by cifar_fast: no Python code runs on the workers "
                                "(images are decoded natively, labels are the class indices)")
        self._size = None if size is None else (_check_int("size", size[0], 1), _check_int("size", size[1], 1))
        self._resize = bool(resize)
        self._decoding(dct_scaling, max_image_pixels)
        spec = self._parse(transform)
        native = _native.Dataset.image_folder(os.fspath(root), spec.kwargs(), size=self._size, resize=self._resize,
                                              allow_empty=bool(allow_empty))
        self.root = root
        self._setup(native, transform, spec, output)

    @property
    def samples(self):
        return [(os.fspath(p), label) for p, label in self._native.listing()[1]]

    imgs = samples

    def _state(self):
        classes, samples = self._native.listing()
        return dict(root=self.root, classes=classes, samples=[(os.fspath(p), l) for p, l in samples],
                    size=self._size, resize=self._resize, transform=self._transform, output=self._output,
                    dct_scaling=self._dct_scaling, max_image_pixels=self._max_image_pixels)

    def _restore(self, state):
        self.root, self._size, self._resize = state["root"], state["size"], state["resize"]
        self._decoding(state.get("dct_scaling", True), state.get("max_image_pixels", 89_478_485))
        transform = state["transform"]
        spec = self._parse(transform)
        native = _native.Dataset.image_folder_listed(os.fspath(self.root), state["classes"], state["samples"],
                                                     spec.kwargs(), size=self._size, resize=self._resize)
        self._setup(native, transform, spec, state["output"])


def prepare(input, out="data", dtype="f32", mean=None, std=None, dataset_stats=False, size=None, name=None,
            force=False, max_image_pixels=89_478_485, store=None, max_side=None, quality=90):
    """`cifar-prep` from Python: `input` (a CIFAR tarball, torchvision's extracted folder, an image
    folder or an archive of one) into tensor files in `out`. Returns `{split: path}`. An image of
    more than `max_image_pixels` pixels (Pillow's `MAX_IMAGE_PIXELS`) is refused.

    `store`: "dense" (decoded pixels of one size), "encoded" (the images' own bytes, each of its
    own size, for `TensorFile(path, transform=...)`), or None: dense where every image has one
    size (or `size` is given), encoded otherwise. `max_side`: with encoded files, images whose
    longer side is over it are shrunk to it and re-encoded as JPEG at `quality`."""
    if store not in (None, "dense", "encoded"):
        raise ValueError(f"store must be 'dense', 'encoded' or None, not {store!r}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    norm = None if mean is None else (_triple3("mean", mean), _triple3("std", std))
    splits = _native.prepare(os.fspath(input), os.fspath(out), dtype=dtype, norm=norm,
                             dataset_stats=bool(dataset_stats), size=size, name=name, force=bool(force),
                             max_image_pixels=_check_int("max_image_pixels", max_image_pixels, 1),
                             store=store,
                             max_side=None if max_side is None else _check_int("max_side", max_side, 1),
                             quality=_check_int("quality", quality, 1, 100))
    return dict(splits)


def _triple3(name, values):
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values, got {len(values)}")
    return values
