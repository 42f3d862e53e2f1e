"""torchvision transforms as the native pipeline runs them.

The workers run no Python: a transform is read once, here, into the few numbers the Rust side
needs (a normalization; a padded crop and its fill; a resize, a crop of it, a flip; whether the
batch stays uint8). What cannot be read so is refused with a ``TypeError`` naming it, rather
than run differently. Geometric transforms run as torchvision runs them on PIL images, whatever
their place in the Compose.

`ds[i]` draws its random choices here, from torch's generator, with the calls torchvision's
transforms make in the order they make them: after the same `torch.manual_seed`, a sample is
torchvision's.
"""

import math
import struct

SUPPORTED = (
    "ToTensor(), PILToTensor(), Normalize(mean, std), RandomCrop(size, padding=P, padding_mode=..., fill=...), "
    "RandomResizedCrop(size, scale, ratio), Resize(size), CenterCrop(size), RandomHorizontalFlip(), "
    "torchvision.transforms.v2's ToImage() and ToDtype(torch.float32, scale=True), in a Compose "
    "(resizes bilinear, as on PIL images)"
)

MODES = ("constant", "edge", "reflect", "symmetric")


def _f32(x):
    """`x` rounded to float32, as torch holds it."""
    return struct.unpack("f", struct.pack("f", x))[0]


class Native:
    """What the workers do to each sample.

    Fixed-size samples: `norm` (mean, std of pixel / 255, or None for the data's own), a crop
    after `crop_padding` pixels of `padding_mode` padding whose constant is `fill`
    (normalized), and a coin-flip mirror. Images of any size: a resize (`resize`, `(n,)` or `(h,
    w)`; or `random_resized_crop`), a window of it (`center_crop` or `random_window`), the flip,
    and `uint8` batches or normalized floats. `steps` lists the random and geometric steps in
    the order the transform takes them, for `ds[i]` to draw as torchvision draws."""

    def __init__(self, norm=None, random=(), uint8=False):
        self.norm = norm
        self.crop_size = None
        self.crop_padding = 0
        self.padding_mode = "constant"
        self.fill = (0.0, 0.0, 0.0)
        self.flip = False
        self.resize = None
        self.random_resized_crop = None
        self.center_crop = None
        self.random_window = None
        self.uint8 = uint8
        self.dct_scaling = True
        self.max_image_pixels = 89_478_485
        self.steps = list(random)

    @property
    def on_images(self):
        """Whether samples are decoded into a geometry of their own (any size of image)."""
        return bool(self.uint8 or self.resize or self.random_resized_crop or self.center_crop or self.random_window)

    def kwargs(self):
        return dict(norm=self.norm, crop_padding=self.crop_padding, padding_mode=self.padding_mode,
                    fill=list(self.fill), flip=self.flip, crop_size=self.crop_size, resize=self.resize,
                    random_resized_crop=self.random_resized_crop, center_crop=self.center_crop,
                    random_window=self.random_window, uint8=self.uint8, dct_scaling=self.dct_scaling,
                    max_image_pixels=self.max_image_pixels)

    def draw(self):
        """The function `ds[i]` calls with the sample's `(height, width)` for its random choices,
        drawn from torch's generator as torchvision's transforms draw them; `None` where nothing
        is random."""
        if not any(kind in ("crop", "flip", "rrc", "rwindow") for kind, _, _ in self.steps):
            return None
        return self._draw_images if self.on_images else self._draw_padded

    def _draw_padded(self, size):
        """`(dy, dx, flip)` of a padded crop and flip."""
        import torch
        p = self.crop_padding
        dy = dx = p
        flip = False
        for kind, v2, arg in self.steps:
            if kind == "crop":
                if p == 0:
                    continue  # a crop to the image's own size draws nothing, in v1 as in v2
                shape = () if v2 else (1,)
                dy = int(torch.randint(0, 2 * p + 1, size=shape))
                dx = int(torch.randint(0, 2 * p + 1, size=shape))
                if flip:
                    # Flipped before it was cropped: the same window, read from the other side.
                    dx = 2 * p - dx
            elif kind == "flip":
                flip = bool(torch.rand(1) < arg)
        return dy, dx, flip

    def _draw_images(self, size):
        """The geometry of an image of `size` `(h, w)`: `(region, resized, window, flip)`, each
        crop chosen after a flip turned into the crop of the unflipped image it reads."""
        import torch
        h, w = size
        region, resized, window, flipped = (0, 0, h, w), (h, w), None, False
        for kind, v2, arg in self.steps:
            if kind == "rrc":
                out, scale, ratio = arg
                i, j, ch, cw = _random_resized_region(h, w, scale, ratio)
                if flipped:
                    j = w - j - cw
                region, resized = (i, j, ch, cw), out
            elif kind == "resize":
                resized = _resized(resized, arg)
            elif kind == "center":
                window = _center(resized, arg)
                if flipped:
                    window = (window[0], resized[1] - window[1] - window[3], window[2], window[3])
            elif kind == "rwindow":
                window = _random_window(resized, arg, v2)
                if flipped:
                    window = (window[0], resized[1] - window[1] - window[3], window[2], window[3])
            elif kind == "flip":
                if torch.rand(1) < arg:
                    flipped = not flipped
        if window is None:
            window = (0, 0) + tuple(resized)
        return tuple(region), tuple(resized), tuple(window), flipped


def _random_resized_region(h, w, scale, ratio):
    """torchvision's `RandomResizedCrop.get_params`, call for call (v2's `make_params` makes the
    same calls)."""
    import torch
    area = h * w
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        cw = int(round(math.sqrt(target_area * aspect_ratio)))
        ch = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            i = torch.randint(0, h - ch + 1, size=(1,)).item()
            j = torch.randint(0, w - cw + 1, size=(1,)).item()
            return i, j, ch, cw
    in_ratio = float(w) / float(h)
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _resized(size, arg):
    """torchvision's `_compute_resized_output_size` for `Resize(arg)` (`(n,)` or `(h, w)`)."""
    if len(arg) == 2:
        return tuple(arg)
    h, w = size
    n = arg[0]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(n * long / short)
    return (new_long, n) if w <= h else (n, new_long)


def _center(size, crop):
    """`CenterCrop(crop)`'s window of an image of `size`, padding where the crop is larger."""
    (h, w), (ch, cw) = size, crop

    def offset(n, c):
        return -((c - n) // 2) if c > n else int(round((n - c) / 2.0))

    return offset(h, ch), offset(w, cw), ch, cw


def _random_window(size, crop, v2):
    """`RandomCrop(crop)`'s window (no padding) of an image of `size`, drawn as torchvision."""
    import torch
    (h, w), (th, tw) = size, crop
    if h < th or w < tw:
        raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(h, w)}")
    if v2:
        top = int(torch.randint(0, h - th + 1, size=())) if h > th else 0
        left = int(torch.randint(0, w - tw + 1, size=())) if w > tw else 0
        return top, left, th, tw
    if h == th and w == tw:
        return 0, 0, h, w
    top = torch.randint(0, h - th + 1, size=(1,)).item()
    left = torch.randint(0, w - tw + 1, size=(1,)).item()
    return top, left, th, tw


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
    raise ValueError(f"{what} size {size}: one or two numbers")


def _is_v2(t):
    return type(t).__module__.startswith("torchvision.transforms.v2")


def _bilinear(t):
    """Refuses an interpolation other than bilinear (the native resize is Pillow's bilinear)."""
    mode = getattr(t, "interpolation", None)
    name = getattr(mode, "value", mode)
    if name not in (None, "bilinear", 2):
        raise _refuse(t, f"interpolation {name}: the native resize is bilinear")


def parse(transform, default_norm):
    """`transform` (a torchvision transform, a Compose of them, or None) as a `Native`. A
    RandomCrop's size goes along as `crop_size`, checked against the images' where the data is
    opened. Without ToTensor the samples are float tensors, as if it ended the pipeline;
    stopping at ToImage() or PILToTensor() they are uint8, as torchvision gives them; without
    Normalize they are normalized by `default_norm`."""
    # What the values are at this step: PIL pixels, a uint8 tensor, then 0..1, then normalized.
    space = "pixels"
    norm = None
    crop = None
    flip_seen = False
    resample = None  # ("rrc", ...) or ("resize", ...)
    window = None
    steps = []  # (kind, v2, argument) in the transform's order
    for t in _steps(transform):
        cls = type(t)
        name = cls.__name__
        if not cls.__module__.startswith("torchvision.transforms"):
            raise _refuse(t, "no Python code runs on the workers")
        if name in ("PILToTensor", "ToImage"):
            space = "uint8" if space == "pixels" else space
            continue
        if name == "ToTensor" or (name == "ToDtype" and _scales_to_float(t)):
            space = "unit" if space in ("pixels", "uint8") else space
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
        elif name == "RandomResizedCrop" or name == "Resize":
            if resample is not None or window is not None or crop is not None:
                raise _refuse(t, "one resize, before any crop, is run natively")
            _bilinear(t)
            if name == "RandomResizedCrop":
                size = tuple(int(x) for x in _side(t.size, name))
                scale = tuple(float(x) for x in t.scale)
                ratio = tuple(float(x) for x in t.ratio)
                if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
                    raise ValueError(f"{_describe(t)}: scale and ratio should be of kind (min, max), above 0")
                resample = ("rrc", (size, scale, ratio))
                steps.append(("rrc", _is_v2(t), resample[1]))
            else:
                if getattr(t, "max_size", None) is not None:
                    raise _refuse(t, "max_size")
                size = t.size
                size = [size] if isinstance(size, int) else [int(x) for x in size]
                if len(size) not in (1, 2) or min(size) < 1:
                    raise ValueError(f"{_describe(t)}: size should be one or two positive numbers")
                resample = ("resize", tuple(size))
                steps.append(("resize", _is_v2(t), tuple(size)))
        elif name == "CenterCrop":
            if window is not None or crop is not None:
                raise _refuse(t, "one crop is run natively")
            window = ("center", tuple(int(x) for x in _side(t.size, name)))
            steps.append(("center", _is_v2(t), window[1]))
        elif name == "RandomCrop":
            if crop is not None or window is not None:
                raise _refuse(t, "one RandomCrop is run natively")
            size = tuple(int(x) for x in _side(t.size, name))
            padding = t.padding if t.padding is not None else 0
            pads = [padding] if isinstance(padding, int) else list(padding)
            if len(set(pads)) != 1 or not isinstance(pads[0], int) or pads[0] < 0:
                raise _refuse(t, f"padding {padding}: the same number of pixels on every side is run natively")
            if getattr(t, "pad_if_needed", False):
                raise _refuse(t, "pad_if_needed")
            if pads[0] == 0 and resample is not None:
                # A crop of the resized image: a random window of it.
                window = ("rwindow", size)
                steps.append(("rwindow", _is_v2(t), size))
                continue
            if resample is not None:
                raise _refuse(t, "a padded crop after a resize")
            mode = getattr(t, "padding_mode", "constant")
            if mode not in MODES:
                raise ValueError(f"RandomCrop padding_mode {mode!r}: one of {', '.join(MODES)}")
            fill = t.fill
            if isinstance(fill, dict):
                raise _refuse(t, "a fill per input type")
            fill = [0.0] * 3 if fill is None else _triple("fill", fill)
            crop = (pads[0], mode, fill, space, size)
            steps.append(("crop", _is_v2(t), None))
        elif name == "RandomHorizontalFlip":
            if flip_seen:
                raise _refuse(t, "one RandomHorizontalFlip is run natively")
            flip_seen = True
            p = float(getattr(t, "p", 0.5))
            if p not in (0.0, 0.5):
                raise _refuse(t, f"p={p}: a flip with probability 0.5 (or 0) is run natively")
            steps.append(("flip", _is_v2(t), p))
        else:
            raise _refuse(t)
    norm = norm or default_norm
    native = Native(norm=norm, random=steps, uint8=(space == "uint8"))
    native.flip = any(kind == "flip" and p == 0.5 for kind, _, p in steps)
    if resample is not None:
        kind, arg = resample
        if kind == "rrc":
            native.random_resized_crop = arg
        else:
            native.resize = arg
    if window is not None:
        kind, size = window
        if kind == "center":
            native.center_crop = size
        else:
            native.random_window = size
    if crop is not None:
        padding, mode, fill, crop_space, size = crop
        if native.on_images:
            if padding:
                raise TypeError("RandomCrop with padding is not run natively beside a resize, a centre crop or "
                                f"uint8 batches; supported: {SUPPORTED}")
            native.random_window = size
            steps[:] = [("rwindow", v2, size) if kind == "crop" else (kind, v2, a) for kind, v2, a in steps]
        else:
            native.crop_size = tuple(int(x) for x in size)
            native.crop_padding = padding
            native.padding_mode = mode
            native.fill = tuple(_normalized_fill(fill, crop_space, norm))
    return native


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
        x = _f32(_f32(f) / 255.0) if space in ("pixels", "uint8") else _f32(f)
        out.append(_f32(_f32(x - _f32(m)) / _f32(s)))
    return out
