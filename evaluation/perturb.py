"""Deterministic image degradations for robustness sweeps: what a deployed detector's inputs go through.

Each operation is a plain Pillow call a reader can check (JPEG re-encoding, bicubic downscaling,
Gaussian blur) and has no randomness, so one condition applied to real and generated images alike
gives the same pixels every run. Training augmentation (``i2p.train.augment``) calls the same
``jpeg``/``blur``/``downscale`` functions with random strengths, so "trained on" and "evaluated
under" mean the same operation.

A condition is written ``kind:value`` (``jpeg:75``, ``resize:0.5``, ``blur:1``, ``scale:1.1``), ``social``
(long side to at most 1080 px, then JPEG 80 with 4:2:0 chroma subsampling: what photo-sharing sites do on
upload), ``png`` (a lossless PNG re-save), ``noexif`` (the file read as if its EXIF were stripped: no
orientation is applied), or a chain of them joined by ``+`` (``resize:0.5+jpeg:90``), applied left to right.
``SHORTCUTS`` are the re-encodings that should not change a verdict (``i2p eval --shortcuts``).
``parse_sweep("jpeg:95,75,50")`` expands one ``--perturb`` option into one condition per value.

Specs come from the command line: values are plain ASCII decimals checked against each kind's range
before use (no ``inf``, ``nan``, ``1e309``, other scripts' digits), a chain has at most ``MAX_CHAIN``
steps, a sweep (and all options together) at most ``MAX_CONDITIONS`` conditions, and every error is a
ValueError that names the spec.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageFilter

from i2p.runtime.preprocess import ImageInput, load_image, open_header

SOCIAL_LONG_SIDE = 1080
SOCIAL_QUALITY = 80


def jpeg(img: Image.Image, quality: int, subsampling: str = "4:2:0") -> Image.Image:
    """Re-encode as baseline JPEG at ``quality`` (1-100) with the given chroma subsampling, decode to RGB."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(quality), subsampling=subsampling)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def downscale(img: Image.Image, factor: float) -> Image.Image:
    """Bicubic (antialiased) resize of both sides by ``factor`` in (0, 1], at least 1 pixel each."""
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"resize factor must be in (0, 1], got {factor}")
    if factor == 1.0:
        return img
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, Image.Resampling.BICUBIC)


def blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation ``sigma`` pixels (Pillow's ``radius`` is the std dev)."""
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    return img if sigma == 0 else img.filter(ImageFilter.GaussianBlur(radius=sigma))


def rescale(img: Image.Image, factor: float) -> Image.Image:
    """Bicubic resize of both sides by ``factor`` (up or down), at least 1 pixel each."""
    if not factor > 0.0:
        raise ValueError(f"scale factor must be > 0, got {factor}")
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)


def png(img: Image.Image) -> Image.Image:
    """A lossless PNG re-save, decoded again by the runtime: the container changes, no pixel does."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", compress_level=1)
    return load_image(buf.getvalue())


def load_without_exif(src: ImageInput) -> Image.Image:
    """``load_image`` of ``src`` with its EXIF block ignored, as if it had been stripped: the orientation
    tag (the only EXIF field decoding obeys) is not applied. Paths and bytes go through the same checks."""
    if not isinstance(src, (str, bytes, os.PathLike)):
        return load_image(src)
    img = open_header(src)
    img.getexif().clear()  # Pillow caches the parsed block: exif_transpose reads this empty one
    return load_image(img)


def social(img: Image.Image) -> Image.Image:
    """Long side down to at most 1080 px (bicubic), then JPEG quality 80, 4:2:0."""
    long_side = max(img.width, img.height)
    if long_side > SOCIAL_LONG_SIDE:
        img = downscale(img, SOCIAL_LONG_SIDE / long_side)
    return jpeg(img, SOCIAL_QUALITY)


@dataclass(frozen=True)
class Step:
    kind: str  # "jpeg" | "resize" | "blur" | "scale" | "social" | "png" | "noexif"
    value: float | None  # quality, factor or sigma; None for the kinds without a value

    @property
    def name(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{_fmt(self.value)}"

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.kind == "jpeg":
            return jpeg(img, int(self.value))
        if self.kind == "resize":
            return downscale(img, float(self.value))
        if self.kind == "blur":
            return blur(img, float(self.value))
        if self.kind == "scale":
            return rescale(img, float(self.value))
        if self.kind == "png":
            return png(img)
        if self.kind == "noexif":
            return img  # applied when the file is read (Condition.load)
        return social(img)


# What each kind takes: (range check, the range in words). Values are plain ASCII decimals (below).
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "jpeg": (lambda v: v == int(v) and 1 <= v <= 100, "an integer quality 1..100"),
    "resize": (lambda v: 0 < v <= 1, "a factor in (0, 1]"),
    "blur": (lambda v: 0 <= v <= 20, "a sigma 0..20"),
    "scale": (lambda v: 0.5 <= v <= 2, "a factor in [0.5, 2]"),
}
_NO_VALUE = ("social", "png", "noexif")
KINDS = (*_RANGES, *_NO_VALUE)
# i2p eval --shortcuts: changes of delivery that should leave a verdict alone
SHORTCUTS = ("png", "jpeg:95", "noexif", "scale:0.9", "scale:1.1")
# A plain decimal: ASCII digits with at most one point. float() would also take inf, nan, 1e309 (inf),
# "1_0", "+5" and other scripts' digits ("٩٥"), which are never meant as a strength.
_NUMBER = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?|\.[0-9]{1,6}")
MAX_SPEC_CHARS = 1000  # one --perturb value
MAX_CHAIN = 8  # steps in one chained condition
MAX_CONDITIONS = 64  # conditions in one sweep, and in all --perturb options together (each is a full pass)


@dataclass(frozen=True)
class Condition:
    """A chain of steps applied left to right; no steps is the clean condition."""

    steps: tuple[Step, ...] = ()

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.steps) or "clean"

    @property
    def strength(self) -> float | None:
        """The value of a one-step condition (for plots: metric vs strength); None otherwise."""
        return self.steps[0].value if len(self.steps) == 1 else None

    def __call__(self, img: Image.Image) -> Image.Image:
        for step in self.steps:
            img = step(img)
        return img

    def load(self, src: ImageInput) -> Image.Image:
        """``src`` decoded (without its EXIF for a ``noexif`` condition), then the steps applied."""
        strip = any(s.kind == "noexif" for s in self.steps)
        return self(load_without_exif(src) if strip else load_image(src))


CLEAN = Condition()


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _step(text: str, spec: str) -> Step:
    kind, sep, value = text.strip().partition(":")
    kind, value = kind.strip().lower(), value.strip()
    if kind not in KINDS:
        raise ValueError(
            f"--perturb {_quote(spec)}: unknown perturbation {_quote(text.strip())}; kinds are {', '.join(KINDS)}"
        )
    if kind in _NO_VALUE:
        if sep:
            raise ValueError(f"--perturb {_quote(spec)}: {kind!r} takes no value, got {_quote(text.strip())}")
        return Step(kind, None)
    return Step(kind, checked_value(kind, value, spec))


def checked_value(kind: str, value: str, spec: str, option: str = "--perturb") -> float:
    """``value`` as a number if it is a plain decimal in ``kind``'s range, else a ValueError naming
    ``option`` and ``spec`` (``--align`` parses its ranges with this too)."""
    if not value:
        raise ValueError(f"{option} {_quote(spec)}: {kind!r} needs a number after '{kind}:'")
    ok, words = _RANGES[kind]
    if not (value.isascii() and _NUMBER.fullmatch(value) and ok(float(value))):
        raise ValueError(f"{option} {_quote(spec)}: {kind} takes {words}, got {_quote(value)}")
    return float(value)


def _quote(spec: str) -> str:
    """The spec for an error message, shortened: a message stays one readable line."""
    return repr(spec if len(spec) <= 80 else spec[:77] + "...")


def _checked_text(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"--perturb must be text, got {type(text).__name__}")
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"--perturb {_quote(text)}: {len(text):,} characters (at most {MAX_SPEC_CHARS:,})")
    return text.strip()


def parse_condition(text: str) -> Condition:
    """``"resize:0.5+jpeg:90"`` -> one Condition; ``"clean"`` or ``""`` -> the clean condition.

    ValueError, naming the spec, for an unknown kind, a value that is not a plain decimal in the kind's
    range, or a chain of more than ``MAX_CHAIN`` steps.
    """
    text = _checked_text(text)
    if text.lower() in ("", "clean", "none"):
        return CLEAN
    parts = text.split("+", MAX_CHAIN)
    if len(parts) > MAX_CHAIN:
        raise ValueError(f"--perturb {_quote(text)}: a chain has at most {MAX_CHAIN} steps")
    return Condition(tuple(_step(part, text) for part in parts))


def parse_sweep(text: str) -> list[Condition]:
    """One ``--perturb`` value: ``"jpeg:95,75,50"`` -> three conditions; a ``+`` chain -> one condition.

    Every listed value must be valid (``"jpeg:95,"`` is an error, not one condition), at most
    ``MAX_CONDITIONS`` of them.
    """
    text = _checked_text(text)
    if "+" in text or "," not in text:
        return [parse_condition(text)]
    kind, _, values = text.partition(":")
    listed = values.split(",", MAX_CONDITIONS)
    if len(listed) > MAX_CONDITIONS:
        raise ValueError(f"--perturb {_quote(text)}: at most {MAX_CONDITIONS} values in one sweep")
    return [_condition_in(f"{kind}:{v}", text) for v in listed]


def _condition_in(part: str, spec: str) -> Condition:
    """One value of a sweep, its error naming the whole spec."""
    return Condition((_step(part, spec),))


def parse_sweeps(texts: Sequence[str], include_clean: bool = True) -> list[Condition]:
    """Every ``--perturb`` option, expanded, duplicates dropped, clean first (the reference)."""
    out = [CLEAN] if include_clean else []
    for text in texts:
        for c in parse_sweep(text):
            if c not in out:
                out.append(c)
        if len(out) > MAX_CONDITIONS:
            raise ValueError(f"--perturb: {len(out)} conditions in all; at most {MAX_CONDITIONS}")
    return out
