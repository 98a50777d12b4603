"""Image decoding and preprocessing: the one code path that training's evaluation and the runtime share.

The arithmetic is Pillow's, in the geometry of timm's and open_clip's evaluation transforms: resize to
``floor(size / crop_pct)`` (the shorter side keeping the aspect ratio, ``resize="shortest"``, or both sides,
``resize="squash"``) with antialiased bicubic or bilinear resampling, center-crop ``size``×``size``, scale to
[0, 1], normalize by mean/std, lay out as CHW float32. ``i2p.runtime.resample`` re-implements the resize in
integer numpy bit-for-bit, and the CUDA kernel in ``i2p.kernels`` does the same arithmetic on the GPU.

Memory per input is bounded before any pixel is decoded (README, "Reliability"):

- a file or bytes object holds at most ``MAX_INPUT_BYTES`` (checked from ``stat`` before reading, and
  the read itself stops there);
- an image has at most ``PreprocessSpec.max_pixels`` pixels (from its header, before decoding);
- an image longer than ``MAX_ASPECT`` times its short side is center-cropped along its long side to
  ``MAX_ASPECT``:1 before the resize. The final center crop reads only the middle square, so the network
  sees the same content (with ``resize="shortest"``), and the resized intermediate stays under
  ``MAX_ASPECT`` × (size / crop_pct)² pixels;
- 16-bit and float pixels are scaled to 8 bits in row blocks with integer (float32 for float input)
  arithmetic, so no full-size wide temporaries;
- decoding threads share one memory budget (``i2p.runtime.memory``): each decode reserves its estimate
  first, so ``workers`` × the per-image cap cannot add up past it.

Time per input is bounded too: a file's structure (JPEG scans and markers, PNG chunks, GIF extension
blocks, TIFF strips) is checked from its bytes before Pillow parses it (``i2p.runtime.decode_work``), and
only the first frame of an animated file is ever decoded.
"""

from __future__ import annotations

import functools
import io
import math
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .decode_work import DecodeWorkError, check_decode_work
from .memory import DECODE_BUDGET, Reservation, decode_cost

# Pillow must not hand us half an image silently: a truncated file is an error, not grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# What untrusted files may be: the common photo formats. Pillow's exotic plugins (EPS runs Ghostscript,
# PSD, FITS, ...) are never reached from a file's magic bytes.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")  # JPEG covers MPO (phones' multi-picture)
# What Pillow raises on malformed data: its documented errors, and the ones benchmarks/fuzz_decode.py found
# escaping its plugins (IndexError from a truncated animated GIF, struct.error, TypeError from TIFF tiles).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error)

MAX_INPUT_BYTES = 64 * 2**20  # an encoded image file (a 64 MP photo is ~30 MB as JPEG q95)
MAX_ASPECT = 16  # longer images are center-cropped to 16:1 before the resize
MAX_SIZE = 1024  # the network's input side: bounds the resize intermediate (MAX_ASPECT * size²)
MAX_PIXELS_LIMIT = 2**27  # the largest max_pixels a manifest may set (134 MP; Pillow refuses 179 MP)
RESIZE_MODES = ("shortest", "squash")  # open_clip's resize_mode / timm's crop_mode "center" and "squash"
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}  # antialiased
MIN_CROP_PCT = 0.5  # timm's models use 0.75 .. 1.0; below 0.5 the resize intermediate would grow past 4x
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """An input could not be turned into a model input; the message names the input and the problem."""


def _check_number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> None:
    """Raise ValueError naming the field unless ``value`` is a finite number (an int if asked) in [lo, hi]."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")


@dataclass(frozen=True)
class PreprocessSpec:
    """What the manifest says about turning an image into the network's input (validated on creation)."""

    size: int = 224
    resize: str = "shortest"  # "shortest": the shorter side to scale_size, aspect kept; "squash": both sides
    interpolation: str = "bicubic"  # Pillow's antialiased bicubic (a = -0.5), or "bilinear"
    crop: str = "center"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = 64_000_000  # decompression-bomb guard, checked before any pixel is decoded
    crop_pct: float = 1.0  # timm's crop fraction: resize to floor(size / crop_pct), then center-crop size

    def __post_init__(self) -> None:
        _check_number("size", self.size, 1, MAX_SIZE, integer=True)
        for key, allowed in (
            ("resize", RESIZE_MODES),
            ("interpolation", tuple(RESAMPLING)),
            ("crop", ("center",)),
        ):
            if not isinstance(getattr(self, key), str) or getattr(self, key) not in allowed:
                raise ValueError(
                    f"{key} must be one of {list(allowed)} (what the runtime reproduces), got {getattr(self, key)!r:.80}"
                )
        _check_number("crop_pct", self.crop_pct, MIN_CROP_PCT, 1.0)
        for key, lo, hi in (("mean", 0.0, 1.0), ("std", 1e-3, 10.0)):
            values = getattr(self, key)
            if not isinstance(values, tuple) or len(values) != 3:
                raise ValueError(f"{key} must be a list of 3 numbers (R, G, B), got {values!r}")
            for channel, v in zip("RGB", values, strict=True):
                _check_number(f"{key}[{channel}]", v, lo, hi)
        _check_number("max_pixels", self.max_pixels, self.size * self.size, MAX_PIXELS_LIMIT, integer=True)

    @property
    def scale_size(self) -> int:
        """The side the image is resized to before the center crop: timm's ``floor(size / crop_pct)``."""
        return math.floor(self.size / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``crop_pct`` only when it is not 1, so runtimes older than it load such artifacts."""
        d = asdict(self)
        if d["crop_pct"] == 1.0:
            del d["crop_pct"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> PreprocessSpec:
        """Parse and validate; ValueError names the key that is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"must be an object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown preprocessing keys {sorted(map(str, unknown))}; this i2p version knows {sorted(known)}"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class ResizePlan:
    """Resized size, crop offsets and filter for one source size: shared by Pillow, numpy and CUDA paths."""

    src_w: int
    src_h: int
    out_w: int
    out_h: int
    left: int
    top: int
    size: int
    interpolation: str = "bicubic"


def resized_size(src_w: int, src_h: int, scale: int, resize: str) -> tuple[int, int]:
    """(width, height) after torchvision's Resize: ``scale`` for the shorter side with the longer floored
    (``Resize(scale)``, "shortest"), or ``scale`` × ``scale`` (``Resize((scale, scale))``, "squash")."""
    if resize == "squash":
        return scale, scale
    if src_w <= src_h:
        return scale, max(1, int(scale * src_h / src_w))
    return max(1, int(scale * src_w / src_h)), scale


def resize_plan(src_w: int, src_h: int, spec: PreprocessSpec) -> ResizePlan:
    """The spec's Resize(scale_size) + CenterCrop(size) geometry (torchvision's rounding), and its filter."""
    out_w, out_h = resized_size(src_w, src_h, spec.scale_size, spec.resize)
    left = int(round((out_w - spec.size) / 2.0))
    top = int(round((out_h - spec.size) / 2.0))
    return ResizePlan(src_w, src_h, out_w, out_h, left, top, spec.size, spec.interpolation)


def aspect_box(width: int, height: int) -> tuple[int, int, int, int] | None:
    """The centered MAX_ASPECT:1 box to crop an over-elongated image to before resizing, else None."""
    short, long = min(width, height), max(width, height)
    if long <= MAX_ASPECT * short:
        return None
    start = (long - MAX_ASPECT * short) // 2
    end = start + MAX_ASPECT * short
    return (start, 0, end, height) if width > height else (0, start, width, end)


def fit_aspect(img: Image.Image) -> Image.Image:
    """``img``, center-cropped to MAX_ASPECT:1 if it is longer (every preprocessing path calls this)."""
    box = aspect_box(img.width, img.height)
    return img if box is None else img.crop(box)


def describe(src: Any) -> str:
    """A short name for an input, for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return os.fsdecode(src) or "<empty path>"
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {src.shape} {src.dtype}>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.size} {src.mode}>"
    return f"<{type(src).__name__}>"


def load_image(src: ImageInput, max_pixels: int = PreprocessSpec.max_pixels) -> Image.Image:
    """Decode any supported input into an upright 8-bit RGB PIL image, or raise ImageError.

    Paths and bytes are checked against ``MAX_INPUT_BYTES`` and ``max_pixels`` (from the header)
    before decoding, so a decompression bomb costs nothing. Animated images yield their first frame.
    """
    with DECODE_BUDGET.session() as reservation:
        return _load(src, max_pixels, reservation)


def _load(src: ImageInput, max_pixels: int, reservation: Reservation) -> Image.Image:
    name = describe(src)
    if isinstance(src, np.ndarray):
        if src.ndim >= 2 and 0 not in src.shape:  # an empty array's error names its shape, below
            _check_dims(src.shape[1], src.shape[0], name, max_pixels)
            reservation.take(decode_cost(src.shape[1], src.shape[0]))
        return _array_to_rgb(src, name)
    if isinstance(src, Image.Image):
        img, encoded = src, 0
    elif isinstance(src, (str, os.PathLike, bytes)):
        img = _open(src, name, max_pixels)
        encoded = len(img.fp.getbuffer()) if isinstance(getattr(img, "fp", None), io.BytesIO) else 0
    else:
        raise TypeError(f"cannot read {name}: expected a path, bytes, a PIL image or a uint8 HxWx3 array")
    try:
        _check_dims(img.width, img.height, name, max_pixels)
        reservation.take(decode_cost(img.width, img.height, encoded))
        # A caller's image may sit on any frame. Files we open sit on frame 0, and asking them is_animated
        # would walk past it (GIF, TIFF): the rest of an animation is never read.
        if img is src and getattr(img, "is_animated", False):
            img.seek(0)
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img, name)
    except ImageError:
        raise
    except (*DECODE_ERRORS, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from e


def _check_dims(width: int, height: int, name: str, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"{name}: a {width}x{height} image has no pixels")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the {max_pixels:,}-pixel limit"
        )


def _open(src: str | os.PathLike | bytes, name: str, max_pixels: int) -> Image.Image:
    """Open (headers only) a path or bytes; refuses oversized input and non-allowlisted formats."""
    if isinstance(src, bytes):
        if len(src) > MAX_INPUT_BYTES:
            raise ImageError(f"{name}: {len(src):,} bytes exceeds the {MAX_INPUT_BYTES:,}-byte input limit")
        data = src
    else:
        data = _read_file(src, name)
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        check_decode_work(data)
    except DecodeWorkError as e:
        raise ImageError(f"{name}: refused before decoding: {e}") from e
    fp = io.BytesIO(data)
    try:
        img = Image.open(fp, formats=_allowed_formats())
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image (not one of {', '.join(_allowed_formats())})") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: exceeds the {max_pixels:,}-pixel limit ({e})") from e
    except DECODE_ERRORS as e:
        raise ImageError(f"{name}: not a readable image ({e})") from e
    _check_dims(img.width, img.height, name, max_pixels)
    return img


def check_header(src: str | os.PathLike | bytes, max_pixels: int = PreprocessSpec.max_pixels) -> None:
    """ImageError unless ``src`` opens as an allowed image within the limits, from its header alone
    (no pixels decoded): the cheap check training runs over a whole data set before it starts."""
    _open(src, describe(src), max_pixels).close()


def open_header(src: str | os.PathLike | bytes, max_pixels: int = PreprocessSpec.max_pixels) -> Image.Image:
    """The image opened lazily after ``check_header``'s checks: its header fields (format, size, mode,
    info, JPEG tables) are read, no pixel is decoded until ``load``. The caller closes it."""
    return _open(src, describe(src), max_pixels)


@functools.cache
def _allowed_formats() -> tuple[str, ...]:
    """FORMATS that this Pillow build can decode (a build may lack WebP or AVIF)."""
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _read_file(src: str | os.PathLike, name: str) -> bytes:
    """The file's bytes, at most MAX_INPUT_BYTES; directories, FIFOs and devices are refused unopened.

    A path Python cannot pass to the OS (a NUL byte, a lone surrogate) is an ImageError like any other.
    """
    try:
        _check_regular(os.stat(src).st_mode, name)  # before opening: opening a FIFO would block
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            _check_regular(st.st_mode, name)  # the path may have been swapped since the stat
            if st.st_size > MAX_INPUT_BYTES:
                raise ImageError(
                    f"{name}: {st.st_size:,} bytes exceeds the {MAX_INPUT_BYTES:,}-byte input limit"
                )
            data = f.read(MAX_INPUT_BYTES + 1)  # a file growing while we read still stops here
    except ImageError:
        raise
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from e
    except ValueError as e:  # embedded NUL, or a str the file system encoding cannot represent
        raise ImageError(f"{name}: not a usable path ({e})") from e
    if len(data) > MAX_INPUT_BYTES:
        raise ImageError(f"{name}: more than {MAX_INPUT_BYTES:,} bytes (the input limit)")
    return data


def _check_regular(mode: int, name: str) -> None:
    if stat.S_ISDIR(mode):
        raise ImageError(f"{name}: is a directory, not an image")
    if not stat.S_ISREG(mode):
        raise ImageError(f"{name}: not a regular file")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _array_to_rgb(np.asarray(img), name)
    return img.convert("RGB")


def _array_to_rgb(arr: np.ndarray, name: str) -> Image.Image:
    """uint8 HWC (or HW) arrays as-is; 16-bit, wider integer and float values are scaled to 8 bits."""
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or 0 in arr.shape:
        raise ImageError(f"{name}: expected an HxWx3 RGB array (or HxW grey), got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise ImageError(f"{name}: pixel type {arr.dtype} is not a number type (expected uint8)")
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr, name)
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.ndim == 3 else "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """Scale to uint8 block by block (temporaries stay ~1 MB, whatever the image size).

    uint16, and integers above 255, map 0..65535 to 0..255 by round(x / 257) in integer arithmetic;
    other integers are clipped to 0..255; floats are 0..1 (times 255) or 0..255, rounded, in float32.
    """
    if arr.dtype.kind == "f":
        if not all(np.isfinite(block).all() for block in _row_blocks(arr)):
            raise ImageError(f"{name}: pixel values include NaN or infinity")
        scale = np.float32(255.0 if arr.max(initial=0.0) <= 1.0 else 1.0)
    wide = arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255)
    out = np.empty(arr.shape, np.uint8)
    start = 0
    for block in _row_blocks(arr):
        if arr.dtype.kind == "f":
            converted = (block.clip(0, 255 / scale).astype(np.float32) * scale).round()  # no overflow
        elif wide:
            converted = (block.clip(0, 65535).astype(np.uint32) + 128) // 257  # == round(x / 257): no ties
        else:
            converted = block.clip(0, 255)
        out[start : start + len(block)] = converted
        start += len(block)
    return out


def _row_blocks(arr: np.ndarray, elements: int = 1 << 18) -> Iterator[np.ndarray]:
    row = max(1, arr[0].size)
    step = max(1, elements // row)
    for start in range(0, arr.shape[0], step):
        yield arr[start : start + step]


def resize_crop(img: Image.Image, spec: PreprocessSpec, name: str = "image") -> Image.Image:
    """Pillow's resize of the spec's mode and filter to ``spec.scale_size``, then the center crop.

    ``name`` is accepted for callers that pass it; nothing here can fail for a decoded image.
    """
    plan = resize_plan(img.width, img.height, spec)
    resized = img.resize((plan.out_w, plan.out_h), RESAMPLING[spec.interpolation])
    return resized.crop((plan.left, plan.top, plan.left + spec.size, plan.top + spec.size))


def normalize(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x / 255 - mean) / std, in exactly the order the CUDA kernel uses."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def decode(src: ImageInput, spec: PreprocessSpec) -> Image.Image:
    """``load_image`` then ``fit_aspect``: the 8-bit RGB image every preprocessing path resizes."""
    return fit_aspect(load_image(src, spec.max_pixels))


def preprocess(src: ImageInput, spec: PreprocessSpec) -> np.ndarray:
    """One input -> float32 CHW model input. Raises ImageError for unusable images.

    The memory reservation spans decode, resize and normalization: every large buffer is freed
    (and returned to the OS) before another thread may use the budget.
    """
    with DECODE_BUDGET.session() as reservation:
        return _preprocess(src, spec, reservation)


def _preprocess(src: ImageInput, spec: PreprocessSpec, reservation: Reservation) -> np.ndarray:
    img = fit_aspect(_load(src, spec.max_pixels, reservation))
    return normalize(np.asarray(resize_crop(img, spec)), spec)
