"""Shortcut audit of labelled data: can the file's metadata alone tell real from fake?

A detector learns whatever separates its training classes. When reals are camera JPEGs and fakes are a
generator's PNGs, the container, the JPEG quality or the image size separate them as well as any
forensic trace, and a detector trained on that set may learn the shortcut instead (SAFE#7: real PNG
photos 57% correct). This module reads, from each file's header alone (no pixel is decoded, through the
runtime's own size and structure checks), the container format, JPEG quality (from the quantization
tables), chroma subsampling, progressive or baseline coding, width, height, aspect ratio, colour mode,
bit depth and EXIF/camera metadata; tabulates them per generator and class; and fits the simplest
classifier on them (a cross-validated logistic regression in numpy). When that classifier separates the
classes (``WARN_AUC``, docs/evaluation.md says why), the warning names the feature that does it.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import JpegImagePlugin

from i2p.runtime.preprocess import ImageError, PreprocessSpec, open_header

from .labels import Sample
from .metrics import roc_auc

WARN_AUC = 0.8  # metadata-only AUC at or above this warns (docs/evaluation.md, "Shortcut audit")
NOISE_SIGMAS = 3.0  # ... and only when it is this many null standard errors above chance
FOLDS = 5
MAX_FREQUENT = 12  # a numeric feature's most frequent exact values get their own column
DEFAULT_LIMIT = 5000  # images audited (a stratified random subset of larger sets)

# IJG's standard luminance quantization table (ITU T.81 Annex K), natural order as Pillow reports it.
_STD_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.float64,
)  # fmt: skip
_SAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # JpegImagePlugin.get_sampling
_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
_EXIF_MAKE, _EXIF_MODEL = 0x010F, 0x0110


def _ijg_tables() -> np.ndarray:
    """[100, 64]: the luminance table libjpeg writes at quality 1..100 (its quality scaling)."""
    q = np.arange(1, 101, dtype=np.float64)[:, None]
    scale = np.where(q < 50, np.floor(5000 / q), 200 - 2 * q)
    return np.clip(np.floor((_STD_LUMA * scale + 50) / 100), 1, 255)


_IJG = _ijg_tables()


def jpeg_quality(luma_table: Sequence[int]) -> int:
    """The IJG quality (1-100) whose scaled standard luminance table fits ``luma_table`` best.

    Exact for libjpeg/Pillow files; for a camera's own tables it is the nearest IJG quality (least
    absolute difference), which is what "quality" means for such files anyway.
    """
    table = np.asarray(list(luma_table), dtype=np.float64)
    if table.shape != (64,):
        raise ValueError(f"a JPEG quantization table has 64 entries, got {table.shape}")
    return int(np.argmin(np.abs(_IJG - table).sum(axis=1))) + 1


@dataclass(frozen=True)
class ImageMeta:
    """What a file's header says about how it was encoded (never its pixels)."""

    format: str
    jpeg_quality: int | None  # None: not a JPEG
    subsampling: str  # "4:4:4" | "4:2:2" | "4:2:0" | "other" | "none" (not a JPEG, or greyscale)
    progressive: bool  # progressive JPEG, or interlaced PNG/GIF
    width: int
    height: int
    mode: str
    bit_depth: int
    exif: bool
    camera: bool  # EXIF names a camera make or model

    @property
    def aspect(self) -> float:
        return round(self.width / self.height, 2)


def read_meta(path: str | os.PathLike, max_pixels: int = PreprocessSpec.max_pixels) -> ImageMeta:
    """The header of one image, through the runtime's checks (size cap, decode-work bounds, allowlisted
    formats); ImageError names the file otherwise."""
    img = open_header(path, max_pixels)
    try:
        quality = subsampling = None
        if img.format == "JPEG":
            tables = getattr(img, "quantization", None) or {}
            quality = jpeg_quality(tables[0]) if 0 in tables else None
            subsampling = _SAMPLING.get(JpegImagePlugin.get_sampling(img), "other")
            if img.mode == "L":
                subsampling = "none"
        progressive = bool(
            img.info.get("progressive") or img.info.get("progression") or img.info.get("interlace")
        )
        bits = _png_bit_depth(img) or getattr(img, "bits", None) or _BITS.get(img.mode, 8)
        exif = img.getexif()
        return ImageMeta(
            format=str(img.format),
            jpeg_quality=quality,
            subsampling=subsampling or "none",
            progressive=progressive,
            width=img.width,
            height=img.height,
            mode=img.mode,
            bit_depth=int(bits),
            exif=len(exif) > 0 or "exif" in img.info,
            camera=bool(exif.get(_EXIF_MAKE) or exif.get(_EXIF_MODEL)),
        )
    except (OSError, ValueError, SyntaxError, KeyError, IndexError, TypeError) as e:
        raise ImageError(f"{os.fsdecode(path)}: unreadable header ({e})") from e
    finally:
        img.close()


def _png_bit_depth(img: Any) -> int | None:
    """A PNG's bit depth per channel from its IHDR (Pillow opens 16-bit RGB as mode RGB)."""
    if img.format != "PNG":
        return None
    data = img.fp.getbuffer() if hasattr(img.fp, "getbuffer") else b""
    return int(data[24]) if len(data) > 24 else None


# ---------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class Feature:
    name: str
    noun: str  # "a detector can learn the <noun>"
    numeric: bool
    value: Callable[[ImageMeta], Any]
    show: Callable[[Any], str]  # one value, in words


def _onoff(yes: str, no: str) -> Callable[[Any], str]:
    return lambda v: yes if v else no


FEATURES = (
    Feature("format", "format", False, lambda m: m.format, str),
    Feature("jpeg_quality", "JPEG quality", True, lambda m: m.jpeg_quality,
            lambda v: "not JPEG" if v is None else f"JPEG quality {v:g}"),
    Feature("subsampling", "chroma subsampling", False, lambda m: m.subsampling,
            lambda v: "no chroma subsampling" if v == "none" else f"{v} chroma"),
    Feature("progressive", "progressive coding", False, lambda m: m.progressive,
            _onoff("progressive/interlaced", "baseline")),
    Feature("width", "image width", True, lambda m: m.width, lambda v: f"{v:g} px wide"),
    Feature("height", "image height", True, lambda m: m.height, lambda v: f"{v:g} px high"),
    Feature("aspect", "aspect ratio", True, lambda m: m.aspect, lambda v: f"aspect {v:g}"),
    Feature("mode", "colour mode", False, lambda m: m.mode, lambda v: f"mode {v}"),
    Feature("bit_depth", "bit depth", False, lambda m: m.bit_depth, lambda v: f"{v}-bit"),
    Feature("exif", "EXIF metadata", False, lambda m: m.exif, _onoff("with EXIF", "without EXIF")),
    Feature("camera", "camera metadata", False, lambda m: m.camera,
            _onoff("with a camera make/model", "without camera make/model")),
)  # fmt: skip
_BY_NAME = {f.name: f for f in FEATURES}
# The detector sees pixels, never the EXIF block: these point at a different source, not at a trace.
_SOURCE_ONLY = ("exif", "camera")


# ---------------------------------------------------------------------------------------------- results


@dataclass
class AuditResult:
    """The audited images' metadata, the classifier's cross-validated AUCs, and the warnings."""

    samples: list[Sample]
    metas: list[ImageMeta]
    skipped: list[tuple[str, str]]  # (path, reason)
    classifier_auc: float  # all features together, cross-validated
    feature_auc: dict[str, float]  # each feature alone, cross-validated
    generator_auc: dict[str, float]  # all features, within each generator that has both classes
    warnings: list[str] = field(default_factory=list)
    listed: int = 0  # images in the data set (the audit may read a subset)

    def values(self, feature: str, generator: str | None = None, label: int | None = None) -> list[Any]:
        f = _BY_NAME[feature]
        return [
            f.value(m)
            for s, m in zip(self.samples, self.metas, strict=True)
            if (generator is None or s.generator == generator) and (label is None or s.label == label)
        ]

    def to_dict(self) -> dict[str, Any]:
        dist: dict[str, Any] = {}
        for g in sorted({s.generator for s in self.samples}):
            dist[g] = {
                ("real", "fake")[label]: {
                    f.name: _distribution(self.values(f.name, g, label), f) for f in FEATURES
                }
                for label in (0, 1)
                if self.values("format", g, label)
            }
        return {
            "listed": self.listed,
            "audited": len(self.samples),
            "warn_auc": WARN_AUC,
            "classifier_auc": _finite(self.classifier_auc),
            "feature_auc": {k: _finite(v) for k, v in self.feature_auc.items()},
            "generator_auc": {k: _finite(v) for k, v in self.generator_auc.items()},
            "warnings": self.warnings,
            "distributions": dist,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 4)


def _distribution(values: list[Any], f: Feature) -> dict[str, Any]:
    counts = Counter(values)
    out: dict[str, Any] = {"counts": {str(k): n for k, n in counts.most_common(20)}}
    nums = [v for v in values if v is not None]
    if f.numeric and nums:
        out |= {"min": min(nums), "median": float(np.median(nums)), "max": max(nums)}
    return out


# ---------------------------------------------------------------------------------------------- audit


def audit(
    samples: Sequence[Sample],
    limit: int = DEFAULT_LIMIT,
    seed: int = 0,
    workers: int = 4,
    max_pixels: int = PreprocessSpec.max_pixels,
    advice: str = "consider --align",
) -> AuditResult:
    """Read every header (at most ``limit`` images: a random subset, the same for a seed), fit the
    metadata-only classifier and phrase the warnings. Unreadable files are listed, never fatal."""
    listed = len(samples)
    if limit and len(samples) > limit:
        keep = np.sort(np.random.default_rng(seed).permutation(len(samples))[:limit])
        samples = [samples[i] for i in keep]

    def read(s: Sample) -> ImageMeta | str:
        try:
            return read_meta(s.path, max_pixels)
        except ImageError as e:
            return str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        read_back = list(pool.map(read, samples))
    kept = [(s, m) for s, m in zip(samples, read_back, strict=True) if isinstance(m, ImageMeta)]
    skipped = [(str(s.path), m) for s, m in zip(samples, read_back, strict=True) if isinstance(m, str)]
    good = [s for s, _ in kept]
    metas = [m for _, m in kept]
    y = np.array([s.label for s in good], dtype=np.int64)
    columns = {f.name: [f.value(m) for m in metas] for f in FEATURES}
    feature_auc = {name: cross_validated_auc({name: vals}, y, seed) for name, vals in columns.items()}
    by_generator: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(good):
        by_generator[s.generator].append(i)
    generator_auc = {}
    if len(by_generator) > 1:
        for g, idx in sorted(by_generator.items()):
            generator_auc[g] = cross_validated_auc(
                {k: [v[i] for i in idx] for k, v in columns.items()}, y[idx], seed
            )
    result = AuditResult(
        good, metas, skipped, cross_validated_auc(columns, y, seed), feature_auc, generator_auc, listed=listed
    )
    result.warnings = warnings_for(result, advice)
    return result


def warnings_for(result: AuditResult, advice: str = "consider --align") -> list[str]:
    """One line when the metadata separate the classes (naming the feature that separates them best),
    one per generator where they do within it; nothing on an aligned set."""
    y = np.array([s.label for s in result.samples])
    out = []
    if _separates(result.classifier_auc, y):
        name = max(result.feature_auc, key=lambda k: np.nan_to_num(result.feature_auc[k]))
        out.append(
            f"shortcut: the file metadata alone tell real from fake (AUC {result.classifier_auc:.2f}, "
            f"warning at {WARN_AUC}). {explain(result, name, None, advice)}"
        )
    for g, auc in result.generator_auc.items():
        yg = np.array([s.label for s in result.samples if s.generator == g])
        if _separates(auc, yg):
            out.append(f"shortcut in {g}: metadata-only AUC {auc:.2f}")
    return out


def explain(result: AuditResult, feature: str, generator: str | None, advice: str) -> str:
    """'reals are 97% JPEG, fakes 100% PNG: a detector can learn the format; consider --align'."""
    f = _BY_NAME[feature]
    real, fake = (describe_values(result.values(feature, generator, label), f) for label in (0, 1))
    why = (
        f"a detector sees pixels, not {f.noun}, but it marks a different source: check where each class came from"
        if feature in _SOURCE_ONLY
        else f"a detector can learn the {f.noun}; {advice}"
    )
    return f"reals are {real}, fakes {fake}: {why}"


def describe_values(values: list[Any], f: Feature) -> str:
    """'97% JPEG', or for a spread-out number '300-800 px wide (median 512)'."""
    if not values:
        return "absent"
    top, n = Counter(values).most_common(1)[0]
    nums = [v for v in values if v is not None]
    if f.numeric and n / len(values) < 0.5 and nums:
        lo, hi, mid = min(nums), max(nums), float(np.median(nums))
        return f"{f.show(lo)} to {f.show(hi)} (median {mid:g})"
    return f"{100 * n / len(values):.0f}% {f.show(top)}"


def _separates(auc: float, y: np.ndarray) -> bool:
    """At or above WARN_AUC, and not what chance gives a set this small (NOISE_SIGMAS null errors)."""
    n1 = int(y.sum())
    n0 = len(y) - n1
    if math.isnan(auc) or not n0 or not n1:
        return False
    null_se = math.sqrt((n0 + n1 + 1) / (12 * n0 * n1))  # the AUC's standard error when it is 0.5
    return auc >= WARN_AUC and auc - 0.5 >= NOISE_SIGMAS * null_se


# ---------------------------------------------------------------------------------------------- classifier


def design(columns: dict[str, list[Any]], train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Feature encoder fitted on the ``train`` rows: one-hot categories (numeric features: their most
    frequent exact values) plus, for numbers, the standardized log value and a missing flag."""
    blocks: list[Callable[[np.ndarray], np.ndarray]] = []
    for name, values in columns.items():
        vals = np.array(values, dtype=object)
        seen = Counter(vals[train].tolist())
        levels = [v for v, _ in seen.most_common(MAX_FREQUENT if _BY_NAME[name].numeric else None)]
        blocks.append(lambda rows, vals=vals, levels=levels: np.array(
            [[v == lvl for lvl in levels] for v in vals[rows]], dtype=np.float64).reshape(len(rows), len(levels)))  # fmt: skip
        if _BY_NAME[name].numeric:
            logs = np.array([math.log(float(v)) if v is not None and v > 0 else np.nan for v in values])
            fit = logs[train][np.isfinite(logs[train])]
            mu, sd = (fit.mean(), fit.std() or 1.0) if len(fit) else (0.0, 1.0)
            std = np.where(np.isfinite(logs), (logs - mu) / sd, 0.0)
            blocks.append(lambda rows, std=std, logs=logs: np.stack([std[rows], ~np.isfinite(logs[rows])], 1))
    return lambda rows: np.concatenate([b(rows) for b in blocks], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 25) -> np.ndarray:
    """L2-regularized logistic regression by Newton's method; returns weights with the bias last."""
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = np.zeros(x.shape[1])
    reg = np.full(x.shape[1], l2 * len(x))
    reg[-1] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + reg * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def cross_validated_auc(columns: dict[str, list[Any]], y: np.ndarray, seed: int = 0) -> float:
    """Out-of-fold AUC of the logistic regression on ``columns`` (stratified folds); NaN if a class
    has fewer than 2 images."""
    y = np.asarray(y, dtype=np.float64)
    if min(int(y.sum()), int(len(y) - y.sum())) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == label))
        fold[idx] = np.arange(len(idx)) % FOLDS
    scores = np.empty(len(y))
    for k in range(min(FOLDS, len(y))):
        test, train = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        if not len(test):
            continue
        encode = design(columns, train)
        w = fit_logistic(encode(train), y[train])
        scores[test] = encode(test) @ w[:-1] + w[-1]
    return float(roc_auc(y, scores))
