"""Train-time augmentation: the CNNDetection / UnivFD protocol, at the evaluation scale.

Blur, downscaling and JPEG re-encoding teach the detector not to rely on the high-frequency traces
that ordinary post-processing destroys (Wang et al., CVPR 2020); the random crop and flip are mild
geometric jitter. The degradations are ``i2p.evaluation.perturb``'s, the operations the robustness
sweeps evaluate under (``i2p eval --perturb``), applied in the order a sharing pipeline does: blur,
downscale, JPEG.
The crop is taken at the evaluation scale: the image is resized the spec's way (shorter side, or both
sides for ``squash``) to a random side between ``size`` and ``scale_size * 8/7`` (``scale_size`` =
``size / crop_pct``, the side deployment resizes to), with the spec's filter, so training and deployment
see objects at the same size. The last step is the runtime's ``normalize``, so the pixel arithmetic
matches deployment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from i2p.evaluation.perturb import MAX_CHAIN, MAX_SPEC_CHARS, blur, checked_value, downscale, jpeg
from i2p.runtime.preprocess import RESAMPLING, PreprocessSpec, fit_aspect, normalize, resized_size


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation.

    Defaults, by measurement (docs/evaluation.md, probes on cached ViT-B/16 features of sid-mini): blur
    and JPEG at p = 0.5 (the CNNDetection/UnivFD protocol). JPEG copies halved a layer-7 probe's AUC
    drop under JPEG 75 (0.023 -> 0.011) and helped across the sweep; downscaled copies did not help,
    not even under downscaling, so ``resize_prob`` is available but off.
    """

    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.0, 3.0)  # Gaussian sigma in pixels, uniform in the range
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 100)  # Pillow JPEG quality, uniform integer, both ends included
    flip: bool = True  # random horizontal flip with p = 0.5
    scale_jitter: float = 8 / 7  # resized to a random side in [size, round(spec.scale_size * this)]
    resize_prob: float = 0.0  # downscale by a factor uniform in resize_scale (then back up by the crop)
    resize_scale: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self) -> None:
        for name in ("blur_prob", "jpeg_prob", "resize_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.blur_sigma
        if not 0.0 <= lo <= hi:
            raise ValueError(
                f"AugmentConfig.blur_sigma must be (low, high) with 0 <= low <= high, got {self.blur_sigma}"
            )
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ValueError(
                f"AugmentConfig.jpeg_quality must be (low, high) with 1 <= low <= high <= 100, got {self.jpeg_quality}"
            )
        lo, hi = self.resize_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"AugmentConfig.resize_scale must be (low, high) with 0 < low <= high <= 1, got {self.resize_scale}"
            )
        if self.scale_jitter < 1.0:
            raise ValueError(f"AugmentConfig.scale_jitter must be >= 1, got {self.scale_jitter}")


def augment(
    img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator, spec: PreprocessSpec
) -> np.ndarray:
    """RGB PIL image -> augmented float32 CHW model input.

    Every random number is drawn up front in a fixed order, whichever branches are taken, so one
    ``rng`` state always gives the same augmentation and changing one probability does not reshuffle
    the others.
    """
    u_blur, sigma, u_jpeg = rng.random(), rng.uniform(*cfg.blur_sigma), rng.random()
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    short = int(rng.integers(spec.size, round(spec.scale_size * cfg.scale_jitter) + 1))
    u_left, u_top, u_flip = rng.random(3)
    u_resize, factor = rng.random(), rng.uniform(*cfg.resize_scale)  # drawn last: older runs keep theirs

    if u_blur < cfg.blur_prob:
        img = blur(img, sigma)
    if u_resize < cfg.resize_prob:
        img = downscale(img, factor)
    if u_jpeg < cfg.jpeg_prob:
        img = jpeg(img, quality)
    img = fit_aspect(img)  # the runtime's rule for elongated images, before any resize
    out_w, out_h = resized_size(img.width, img.height, short, spec.resize)
    img = img.resize((out_w, out_h), RESAMPLING[spec.interpolation])
    left = int(u_left * (out_w - spec.size + 1))
    top = int(u_top * (out_h - spec.size + 1))
    img = img.crop((left, top, left + spec.size, top + spec.size))
    if cfg.flip and u_flip < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return normalize(np.asarray(img), spec)


# ---------------------------------------------------------------------------------------------- --align

ALIGN_KINDS = ("jpeg", "resize")  # JPEG quality (integer), downscale factor: perturb.py's kinds and ranges
ALIGN_STREAM = 1  # the alignment's random stream: (seed, epoch, index, ALIGN_STREAM); the label never enters


@dataclass(frozen=True)
class AlignSpec:
    """``i2p-train --align``: one encoding pipeline, drawn from one distribution, for reals and fakes alike.

    Written ``jpeg:60-100,resize:0.5-1.0``: steps applied left to right, each a kind and a range
    (``LOW-HIGH``, both ends included, or one value). Every training image, real or fake, is re-encoded
    through the pipeline before augmentation, with strengths drawn from ``(seed, epoch, index)``, so the
    container, the JPEG quality and the scale of the training images no longer carry the label (DDA,
    NeurIPS'25; AlignedForensics). Validation images are not aligned: they measure what deployment sees.
    """

    steps: tuple[tuple[str, float, float], ...]  # (kind, low, high)

    @property
    def text(self) -> str:
        return ",".join(f"{k}:{_num(lo)}" + (f"-{_num(hi)}" if hi != lo else "") for k, lo, hi in self.steps)

    def draw(self, rng: np.random.Generator) -> tuple[float, ...]:
        """One strength per step, drawn in a fixed order: integer qualities, uniform factors."""
        return tuple(
            float(rng.integers(int(lo), int(hi) + 1)) if kind == "jpeg" else float(rng.uniform(lo, hi))
            for kind, lo, hi in self.steps
        )

    def apply(self, img: Image.Image, strengths: tuple[float, ...]) -> Image.Image:
        for (kind, _, _), value in zip(self.steps, strengths, strict=True):
            img = jpeg(img, int(value)) if kind == "jpeg" else downscale(img, value)
        return img


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def parse_align(text: str | None) -> AlignSpec | None:
    """``"jpeg:60-100,resize:0.5-1.0"`` -> AlignSpec; None or ``""`` -> None. Values are plain decimals
    in ``i2p eval --perturb``'s ranges (quality 1..100, factor in (0, 1]), low <= high, each kind once,
    at most ``MAX_CHAIN`` steps; every error is a ValueError naming the spec."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"--align must be text, got {type(text).__name__}")
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(f"--align {text[:60]!r}...: {len(text):,} characters (at most {MAX_SPEC_CHARS:,})")
    spec = text.strip()
    if not spec:
        return None
    parts = spec.split(",", MAX_CHAIN)
    if len(parts) > MAX_CHAIN:
        raise ValueError(f"--align {spec!r:.80}: at most {MAX_CHAIN} steps")
    steps = []
    for part in parts:
        kind, sep, values = part.strip().partition(":")
        kind = kind.strip().lower()
        if kind not in ALIGN_KINDS or not sep:
            raise ValueError(
                f"--align {spec!r:.80}: {part.strip()!r:.40} is not KIND:LOW-HIGH with KIND one of "
                f"{', '.join(ALIGN_KINDS)} (e.g. jpeg:60-100,resize:0.5-1.0)"
            )
        if any(kind == k for k, _, _ in steps):
            raise ValueError(f"--align {spec!r:.80}: {kind} appears twice")
        low, dash, high = values.strip().partition("-")
        lo = checked_value(kind, low.strip(), spec, "--align")
        hi = checked_value(kind, high.strip(), spec, "--align") if dash else lo
        if lo > hi:
            raise ValueError(f"--align {spec!r:.80}: {kind} range {_num(lo)}-{_num(hi)} runs backwards")
        steps.append((kind, lo, hi))
    return AlignSpec(tuple(steps))
