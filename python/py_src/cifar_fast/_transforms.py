"""torchvision transforms as the native pipeline runs them.

The workers run no Python: a transform is read once, here, into the few numbers the Rust side
needs (a normalization, a padded crop and its fill, a flip). What cannot be read so is refused
with a ``TypeError`` naming it, rather than run differently.
"""

import math
import struct

SUPPORTED = (
    "ToTensor(), Normalize(mean, std), RandomCrop(size, padding=P, padding_mode=..., fill=...), "
    "RandomHorizontalFlip(), torchvision.transforms.v2's ToImage() and ToDtype(torch.float32, "
    "scale=True), in a Compose"
)

MODES = ("constant", "edge", "reflect", "symmetric")


def _f32(x):
    """`x` rounded to float32, as torch holds it."""
    return struct.unpack("f", struct.pack("f", x))[0]


class Native:
    """What the workers do to each sample: `norm` (mean, std of pixel / 255, or None for the
    data's own), a crop after `crop_padding` pixels of `padding_mode` padding whose constant is
    `fill` (normalized), and a coin-flip mirror. `random` lists the random steps in the order
    the transform takes them, for `ds[i]` to draw as torchvision draws."""

    def __init__(self, norm=None, crop_padding=0, padding_mode="constant", fill=(0.0, 0.0, 0.0), flip=False,
                 crop_size=None, random=()):
        self.norm = norm
        self.crop_size = crop_size
        self.crop_padding = crop_padding
        self.padding_mode = padding_mode
        self.fill = tuple(fill)
        self.flip = flip
        self.random = list(random)

    def kwargs(self):
        return dict(norm=self.norm, crop_padding=self.crop_padding, padding_mode=self.padding_mode,
                    fill=list(self.fill), flip=self.flip, crop_size=self.crop_size)

    def draw(self):
        """One sample's `(dy, dx, flip)` drawn from torch's generator with the calls, in the
        order, torchvision's transforms make them: so `torch.manual_seed(s)` then `ds[i]` gives
        what torchvision gives after the same seed, and torch's DataLoader workers (each seeded
        by torch) draw anew each epoch. `None` where nothing is random."""
        if not self.random:
            return None
        import torch
        p = self.crop_padding
        dy = dx = p
        flip = False
        for kind, v2, arg in self.random:
            if kind == "crop":
                if p == 0:
                    continue  # a crop to the image's own size draws nothing, in v1 as in v2
                size = () if v2 else (1,)
                dy = int(torch.randint(0, 2 * p + 1, size=size))
                dx = int(torch.randint(0, 2 * p + 1, size=size))
                if flip:
                    # Flipped before it was cropped: the same window, read from the other side.
                    dx = 2 * p - dx
            else:
                flip = bool(torch.rand(1) < arg)
        return dy, dx, flip


def _steps(transform):
    if transform is None:
        return []
    inner = getattr(transform, "transforms", None)
    if type(transform).__name__ == "Compose" and isinstance(inner, (list, tuple)):
        return [s for t in inner for s in _steps(t)]
    return [transform]


def _describe(t):
    try:
        return repr(t)
    except Exception:  # a user's object whose repr fails still gets named
        return type(t).__name__


def _refuse(t, why=""):
    return TypeError(f"transform {_describe(t)} is not run by cifar_fast{': ' + why if why else ''}; "
                     f"supported: {SUPPORTED}")


def _triple(name, values):
    if isinstance(values, (int, float)):
        values = [values]
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"Normalize {name} has {len(values)} values; the images have 3 channels")
    return values


def _side(size, what):
    if isinstance(size, int):
        return (size, size)
    size = tuple(size)
    if len(size) == 1:
        return (size[0], size[0])
    if len(size) == 2:
        return size
    raise ValueError(f"RandomCrop {what} {size}: one or two numbers")


def parse(transform, default_norm):
    """`transform` (a torchvision transform, a Compose of them, or None) as a `Native`. A
    RandomCrop's size goes along as `crop_size`, checked against the images' where the data is
    opened. Without ToTensor the samples are still float tensors, as if
    it ended the pipeline; without Normalize they are normalized by `default_norm`."""
    space = "pixels"  # what the values are at this step: 0..255, then 0..1, then normalized
    norm = None
    crop = None
    flip = False
    random = []  # (kind, v2, argument) in the transform's order
    for t in _steps(transform):
        cls = type(t)
        name = cls.__name__
        if not cls.__module__.startswith("torchvision.transforms"):
            raise _refuse(t, "no Python code runs on the workers")
        if name in ("ToTensor", "PILToTensor", "ToImage") or (name == "ToDtype" and _scales_to_float(t)):
            if name in ("ToTensor",) or name == "ToDtype":
                space = "unit" if space == "pixels" else space
            continue
        if name == "Normalize":
            if space != "unit":
                raise TypeError(f"transform {_describe(t)}: Normalize needs float tensors in 0..1; "
                                "put ToTensor() before it")
            if norm is not None:
                raise _refuse(t, "one Normalize is run natively")
            mean, std = _triple("mean", t.mean), _triple("std", t.std)
            if any(not (s > 0) or math.isinf(s) for s in std):
                raise ValueError(f"Normalize std {std}: every value must be positive")
            norm = (mean, std)
            space = "normalized"
        elif name == "RandomCrop":
            if crop is not None:
                raise _refuse(t, "one RandomCrop is run natively")
            size = tuple(_side(t.size, "size"))
            padding = t.padding if t.padding is not None else 0
            pads = [padding] if isinstance(padding, int) else list(padding)
            if len(set(pads)) != 1 or not isinstance(pads[0], int) or pads[0] < 0:
                raise _refuse(t, f"padding {padding}: the same number of pixels on every side is run natively")
            mode = getattr(t, "padding_mode", "constant")
            if mode not in MODES:
                raise ValueError(f"RandomCrop padding_mode {mode!r}: one of {', '.join(MODES)}")
            fill = t.fill
            if isinstance(fill, dict):
                raise _refuse(t, "a fill per input type")
            fill = [0.0] * 3 if fill is None else _triple("fill", fill)
            crop = (pads[0], mode, fill, space, size)
            random.append(("crop", _is_v2(t), None))
        elif name == "RandomHorizontalFlip":
            if any(kind == "flip" for kind, _, _ in random):
                raise _refuse(t, "one RandomHorizontalFlip is run natively")
            p = float(getattr(t, "p", 0.5))
            if p == 0.5:
                flip = True
            elif p != 0.0:
                raise _refuse(t, f"p={p}: a flip with probability 0.5 (or 0) is run natively")
            random.append(("flip", _is_v2(t), p))
        else:
            raise _refuse(t)
    norm = norm or default_norm
    native = Native(norm=norm, random=random)
    if crop is not None:
        padding, mode, fill, space, size = crop
        native.crop_size = tuple(int(x) for x in size)
        native.crop_padding = padding
        native.padding_mode = mode
        native.fill = tuple(_normalized_fill(fill, space, norm))
    native.flip = flip
    return native


def _is_v2(t):
    return type(t).__module__.startswith("torchvision.transforms.v2")


def _scales_to_float(t):
    dtype = getattr(t, "dtype", None)
    return bool(getattr(t, "scale", False)) and "float32" in str(dtype)


def _normalized_fill(fill, space, norm):
    """`fill`, given where the crop stood (`space`), as the normalized value torch computes for it:
    float32 arithmetic in torch's order (pixel / 255, minus the mean, over the std)."""
    if space == "normalized":
        return [_f32(f) for f in fill]
    mean, std = norm if norm is not None else ([0.0] * 3, [1.0] * 3)
    out = []
    for f, m, s in zip(fill, mean, std):
        x = _f32(_f32(f) / 255.0) if space == "pixels" else _f32(f)
        out.append(_f32(_f32(x - _f32(m)) / _f32(s)))
    return out
