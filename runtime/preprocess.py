"""Image decoding and preprocessing: the one code path that training's evaluation and the runtime share.

The arithmetic is Pillow's: resize the shorter side to ``size`` with bicubic (antialiased) resampling,
center-crop ``size``×``size``, scale to [0, 1], normalize by mean/std, lay out as CHW float32.
``i2p.runtime.resample`` re-implements the resize in integer numpy bit-for-bit, and the CUDA kernel in
``i2p.kernels`` does the same arithmetic on the GPU.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

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

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class ImageError(ValueError):
    """An input could not be turned into a model input; the message names the input and the problem."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What the manifest says about turning an image into the network's input."""

    size: int = 224
    resize: str = "shortest"  # resize the shorter side to `size`, keep the aspect ratio
    interpolation: str = "bicubic"  # Pillow's antialiased bicubic (a = -0.5)
    crop: str = "center"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = 64_000_000  # decompression-bomb guard, checked before any pixel is decoded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown preprocessing keys {sorted(unknown)}; this i2p version knows {sorted(known)}"
            )
        if d.get("resize", "shortest") != "shortest" or d.get("interpolation", "bicubic") != "bicubic":
            raise ValueError(
                f"unsupported preprocessing {d}: only shortest-side bicubic resize is implemented"
            )
        if d.get("crop", "center") != "center":
            raise ValueError(f"unsupported crop {d.get('crop')!r}: only 'center' is implemented")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class ResizePlan:
    """Resized size and crop offsets for one source size: shared by Pillow, numpy and CUDA paths."""

    src_w: int
    src_h: int
    out_w: int
    out_h: int
    left: int
    top: int
    size: int


def resize_plan(src_w: int, src_h: int, size: int) -> ResizePlan:
    """torchvision's Resize(size) + CenterCrop(size) geometry (shorter side -> size, floor the longer)."""
    if src_w <= src_h:
        out_w, out_h = size, max(1, int(size * src_h / src_w))
    else:
        out_w, out_h = max(1, int(size * src_w / src_h)), size
    left = int(round((out_w - size) / 2.0))
    top = int(round((out_h - size) / 2.0))
    return ResizePlan(src_w, src_h, out_w, out_h, left, top, size)


def describe(src: Any) -> str:
    """A short name for an input, for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    if isinstance(src, np.ndarray):
        return f"<array {src.shape} {src.dtype}>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.size} {src.mode}>"
    return f"<{type(src).__name__}>"


def load_image(src: ImageInput, max_pixels: int = PreprocessSpec.max_pixels) -> Image.Image:
    """Decode any supported input into an upright 8-bit RGB PIL image, or raise ImageError.

    Paths and bytes are checked against ``max_pixels`` from the header before decoding, so a
    decompression bomb costs nothing. Animated images yield their first frame.
    """
    name = describe(src)
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, name)
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, (str, os.PathLike, bytes)):
        img = _open(src, name, max_pixels)
    else:
        raise TypeError(f"cannot read {name}: expected a path, bytes, a PIL image or a uint8 HxWx3 array")
    try:
        if img.width * img.height > max_pixels:
            raise ImageError(f"{name}: {img.width}x{img.height} exceeds the {max_pixels:,}-pixel limit")
        if getattr(img, "is_animated", False):
            img.seek(0)
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img, name)
    except ImageError:
        raise
    except (*DECODE_ERRORS, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from e


def _open(src: str | os.PathLike | bytes, name: str, max_pixels: int) -> Image.Image:
    if isinstance(src, bytes):
        fp: Any = io.BytesIO(src)
    else:
        fp = io.BytesIO(_read_file(Path(src), name))
    if fp.getbuffer().nbytes == 0:
        raise ImageError(f"{name}: empty file")
    try:
        img = Image.open(fp, formats=_allowed_formats())
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image (not one of {', '.join(_allowed_formats())})") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: exceeds the {max_pixels:,}-pixel limit ({e})") from e
    except DECODE_ERRORS as e:
        raise ImageError(f"{name}: not a readable image ({e})") from e
    if img.width * img.height > max_pixels:
        raise ImageError(f"{name}: {img.width}x{img.height} exceeds the {max_pixels:,}-pixel limit")
    return img


@functools.cache
def _allowed_formats() -> tuple[str, ...]:
    """FORMATS that this Pillow build can decode (a build may lack WebP or AVIF)."""
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _read_file(path: Path, name: str) -> bytes:
    """The file's bytes; directories, FIFOs and devices are refused before opening (a FIFO would block)."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ImageError(f"{name}: is a directory, not an image")
        if not stat.S_ISREG(mode):
            raise ImageError(f"{name}: not a regular file")
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{name}: cannot read file ({e.strerror or e})") from e


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _array_to_rgb(np.asarray(img), name)
    return img.convert("RGB")


def _array_to_rgb(arr: np.ndarray, name: str) -> Image.Image:
    """uint8 HWC (or HW) arrays as-is; 16-bit and float grey values are scaled to 8 bits."""
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or 0 in arr.shape:
        raise ImageError(f"{name}: expected an HxWx3 RGB array (or HxW grey), got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise ImageError(f"{name}: pixel type {arr.dtype} is not a number type (expected uint8)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError(f"{name}: pixel values include NaN or infinity")
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        arr = (arr.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = (arr.astype(np.float64) * (255.0 if arr.max(initial=0.0) <= 1.0 else 1.0)).round()
        arr = arr.clip(0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = arr.clip(0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def checked_resize_plan(width: int, height: int, spec: PreprocessSpec, name: str = "image") -> ResizePlan:
    """``resize_plan``, refusing images whose resized intermediate would exceed ``max_pixels``.

    A 1-pixel-high strip within the pixel limit would otherwise grow to ``size`` times its width
    before the crop. Every preprocessing path (Pillow, numpy, CUDA) applies the same refusal.
    """
    plan = resize_plan(width, height, spec.size)
    if plan.out_w * plan.out_h > spec.max_pixels:
        raise ImageError(
            f"{name}: a {width}x{height} image is too elongated: resizing it to {plan.out_w}x{plan.out_h} "
            f"exceeds the {spec.max_pixels:,}-pixel limit"
        )
    return plan


def resize_crop(img: Image.Image, spec: PreprocessSpec, name: str = "image") -> Image.Image:
    """Pillow's bicubic resize of the shorter side to ``spec.size``, then the center crop."""
    plan = checked_resize_plan(img.width, img.height, spec, name)
    resized = img.resize((plan.out_w, plan.out_h), Image.Resampling.BICUBIC)
    return resized.crop((plan.left, plan.top, plan.left + spec.size, plan.top + spec.size))


def normalize(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x / 255 - mean) / std, in exactly the order the CUDA kernel uses."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(src: ImageInput, spec: PreprocessSpec) -> np.ndarray:
    """One input -> float32 CHW model input. Raises ImageError for unusable images."""
    img = load_image(src, spec.max_pixels)
    return normalize(np.asarray(resize_crop(img, spec, describe(src))), spec)
