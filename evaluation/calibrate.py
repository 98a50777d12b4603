"""``i2p calibrate``: an operating point set at a false-positive rate on the deployment's own real images.

The threshold is chosen on reference reals from *your* traffic (uploads from before generators existed,
verified camera originals), scored by the artifact's own Detector: the backend, precision and
preprocessing of deployment, torch-free. Only numpy: the Clopper-Pearson bounds come from a
continued-fraction incomplete beta function here, not from scipy.

The rule, for n usable reals and a target FPR f: at most k = floor(f * n) reals may be called fake,
so the threshold sits just above the (k+1)-th highest real score (the Detector calls fake when
``p >= threshold``: tied reals at that score stay real). Refused below ``min_reals(f)``: the fewest reals
for which zero false positives would put the one-sided 95% upper bound of the FPR at or below f
(the "rule of three", n >= 3/f: 299 reals for 1%, 59 for 5%).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from i2p.base.files import write_bytes_atomic
from i2p.runtime import Detector
from i2p.runtime.detector import Prepared
from i2p.runtime.manifest import MANIFEST, ArtifactError, Manifest, read_manifest
from i2p.runtime.preprocess import MAX_INPUT_BYTES, describe
from i2p.runtime.schema import CALIBRATED, OodSpec, OperatingPoint, SchemaError, point_digest, point_name
from i2p.runtime.sources import iter_images

CONFIDENCE = 0.95


class CalibrationError(ValueError):
    """The images or the request cannot give a trustworthy operating point; the message says why."""


# -- statistics -------------------------------------------------------------------------------------


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0 (Numerical Recipes' continued fraction)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry otherwise
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Modified Lentz evaluation of the continued fraction of I_x(a, b)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):  # converges in O(sqrt(max(a, b))) steps
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def beta_quantile(q: float, a: float, b: float) -> float:
    """x with I_x(a, b) = q, by bisection (I_x is increasing in x): 200 halvings reach float resolution."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile level is in [0, 1], got {q}")
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided binomial interval of k successes in n trials (k false positives in n reals)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else beta_quantile(alpha / 2, k, n - k + 1)
    high = 1.0 if k == n else beta_quantile(1 - alpha / 2, k + 1, n - k)
    return low, high


def min_reals(target_fpr: float, confidence: float = CONFIDENCE) -> int:
    """The fewest reals for which 0 false positives bound the FPR at <= target (one-sided, ``confidence``).

    With 0 of n reals flagged the exact upper bound is 1 - (1 - confidence)^(1/n); it reaches the target
    at n = ln(1 - confidence) / ln(1 - target): 299 for 1%, 59 for 5%, 2995 for 0.1% at 95%.
    """
    n = math.ceil(math.log(1.0 - confidence) / math.log1p(-target_fpr) - 1e-9)
    while 1.0 - (1.0 - confidence) ** (1.0 / n) > target_fpr:  # guard the rounding of the log ratio
        n += 1
    return n


def fpr_threshold(real_scores: Sequence[float] | np.ndarray, target_fpr: float) -> float:
    """The lowest threshold (fake when ``p >= t``) that calls at most floor(target * n) of these reals fake.

    It is the next float64 above the (k+1)-th highest score, so reals tied at that score count as real
    and the result does not depend on their order. CalibrationError when that score is 1.0 (a saturated
    sigmoid): no probability threshold can then call those reals real.
    """
    scores = np.sort(np.asarray(real_scores, np.float64))[::-1]
    allowed = math.floor(target_fpr * len(scores) + 1e-9)
    cut = float(scores[allowed])
    if cut >= 1.0:
        raise CalibrationError(
            f"{allowed + 1} of the {len(scores)} reals score 1.0, the highest probability; no threshold can call "
            f"more than {allowed} of them real-looking. These reals are not like the ones the model was trained on"
        )
    return float(np.nextafter(cut, np.inf))


# -- files ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One calibration file: its path relative to its folder, the sha256 of the bytes scored, the score."""

    label: str  # "real" | "fake"
    relpath: str
    sha256: str
    probability: float
    ood: float | None = None  # the artifact's out-of-distribution score, where its network has one


def files_digest(items: Sequence[Scored]) -> str:
    """sha256 of the files used, independent of listing order.

    Encoding: one record per file, ``label \\0 relative-path \\0 sha256-hex \\n`` (label ``real`` or
    ``fake``, the path relative to --reals/--fakes as the file system's bytes, ``/``-separated),
    records sorted by their bytes, concatenated. No path holds ``\\0`` and the hex has a fixed length,
    so the encoding is unambiguous. It names the files and their content, so a changed set is visible.
    """
    records = sorted(
        item.label.encode() + b"\0" + os.fsencode(item.relpath) + b"\0" + item.sha256.encode() + b"\n"
        for item in items
    )
    return hashlib.sha256(b"".join(records)).hexdigest()


def _read(path: str) -> bytes:
    """A regular file's bytes, at most the runtime's input limit; OSError/ValueError name the problem.

    Opened non-blocking and checked before reading, so a FIFO or device named like an image cannot stall.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_INPUT_BYTES:
            raise ValueError(f"{st.st_size:,} bytes exceeds the {MAX_INPUT_BYTES:,}-byte input limit")
        data = f.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise ValueError(f"more than {MAX_INPUT_BYTES:,} bytes (the input limit)")
    return data


def _prepare(detector: Detector, path: str) -> tuple[Prepared, str]:
    """Decode as the Detector does, from the bytes that are hashed (no gap between hash and score)."""
    try:
        data = _read(path)
    except (OSError, ValueError) as e:
        return Prepared(path, None, f"{path}: cannot read ({getattr(e, 'strerror', None) or e})"), ""
    item = detector.prepare(data)
    error = item.error
    if error is not None:
        prefix = f"{describe(data)}: "
        error = f"{path}: {error[len(prefix) :] if error.startswith(prefix) else error}"
    return replace(item, source=path, error=error), hashlib.sha256(data).hexdigest()


def image_files(folder: str | os.PathLike) -> list[str]:
    """Every image file under ``folder``, recursively (symlinked folders not followed), sorted bytewise."""
    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise CalibrationError(f"{root}: not a directory of images")
    return sorted(iter_images([root], recursive=True), key=os.fsencode)


def score_folder(
    detector: Detector, folder: str | os.PathLike, label: str, workers: int
) -> tuple[list[Scored], list[str]]:
    """Every image file under ``folder``: the scored ones, and one error per file that failed."""
    root = os.fspath(folder)
    paths = image_files(root)
    scored, errors = [], []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="i2p-calibrate") as pool:
        for chunk in _chunks(paths, detector.batch_size * 4):
            prepared = list(pool.map(lambda p: _prepare(detector, p), chunk))
            predictions = detector.predict_prepared([p for p, _ in prepared])
            for (_, digest), path, pred in zip(prepared, chunk, predictions, strict=True):
                if pred.ok:
                    rel = Path(path).relative_to(root).as_posix()
                    scored.append(Scored(label, rel, digest, float(pred.probability), pred.ood))
                else:
                    errors.append(pred.error or f"{path}: no score")
    return scored, errors


def _chunks(items: list[str], step: int) -> Iterator[list[str]]:
    for start in range(0, len(items), step):
        yield items[start : start + step]


# -- the point and the manifest -----------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` measured and wrote; ``to_dict`` is the ``--json`` output."""

    artifact: str
    name: str
    point: OperatingPoint
    default: bool  # the point is now the artifact's default
    false_positives: int
    backend: str
    precision: str
    before: dict[str, float] = field(default_factory=dict)  # point name -> FPR on these reals
    errors: list[str] = field(default_factory=list)  # unreadable files, excluded
    ood: OodSpec | None = None  # with ood=True: the artifact's new OOD threshold, taken on these reals
    ood_flagged_before: float | None = None  # the share of these reals the old OOD threshold flagged

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "name": self.name,
            "point": self.point.to_dict(),
            "default": self.default,
            "false_positives": self.false_positives,
            "backend": self.backend,
            "precision": self.precision,
            "fpr_before": self.before,
            "excluded": self.errors,
            "ood": self.ood.to_dict() if self.ood is not None else None,
            "ood_flagged_before": self.ood_flagged_before,
        }


def calibrate(
    artifact: str | os.PathLike,
    reals: str | os.PathLike,
    target_fpr: float,
    name: str,
    fakes: str | os.PathLike | None = None,
    make_default: bool = False,
    replace_point: bool = False,
    workers: int = 2,
    ood: bool = False,
    **detector_options: Any,
) -> Calibration:
    """Score ``reals`` (and ``fakes``) with the artifact's Detector, add point ``name``, write the manifest.

    ``ood``: also take the artifact's OOD threshold on these reals (the same quantile as at training, of
    their OOD scores), so that ``uncertain`` means "unlike your traffic". It is the artifact's one
    threshold, for every operating point.
    """
    try:
        point_name(name, "--name")
    except SchemaError as e:
        raise CalibrationError(str(e)) from e
    if not (isinstance(target_fpr, float) and 0.0 < target_fpr < 1.0):
        raise CalibrationError(
            f"--target-fpr must be a fraction in (0, 1), e.g. 0.01 for 1%, got {target_fpr!r}"
        )
    manifest = read_manifest(artifact)
    if ood and manifest.ood is None:
        raise CalibrationError(
            f"{artifact}: this artifact has no OOD output to calibrate (exported before the OOD score, or "
            "from a checkpoint without its density); leave out --ood, or re-export from a current checkpoint"
        )
    if name in manifest.operating_points and not replace_point:
        raise CalibrationError(
            f"{artifact}: it already has an operating point {name!r}; choose another --name or pass --replace"
        )
    needed = min_reals(target_fpr)
    _check_count(len(image_files(reals)), needed, target_fpr, reals, [])  # before hours of scoring
    with Detector(artifact, **detector_options) as detector:
        real, errors = score_folder(detector, reals, "real", workers)
        _check_count(len(real), needed, target_fpr, reals, errors)
        fake, fake_errors = score_folder(detector, fakes, "fake", workers) if fakes is not None else ([], [])
        model_sha256 = _scored_model(detector)
        backend, precision = detector.backend.name, detector.backend.precision
    p_real = np.array([s.probability for s in real], np.float64)
    threshold = fpr_threshold(p_real, target_fpr)
    false_positives = int((p_real >= threshold).sum())
    p_fake = np.array([s.probability for s in fake], np.float64)
    point = OperatingPoint(
        threshold=threshold,
        rule=CALIBRATED,
        target_fpr=target_fpr,
        val_fpr=false_positives / len(real),
        val_tpr=float((p_fake >= threshold).mean()) if len(fake) else None,
        n_real=len(real),
        n_fake=len(fake) if fakes is not None else None,
        fpr_ci95=clopper_pearson(false_positives, len(real)),
        files_sha256=files_digest(real + fake),
        model_sha256=model_sha256,
    )
    point = replace(point, digest=point_digest(name, point))
    before = {n: float((p_real >= p.threshold).mean()) for n, p in manifest.operating_points.items()}
    new_ood, flagged_before = _ood_on_reals(manifest.ood, real) if ood else (None, None)
    write_point(artifact, manifest, name, point, make_default, new_ood)
    return Calibration(
        str(artifact),
        name,
        point,
        make_default or manifest.operating_point == name,
        false_positives,
        backend,
        precision,
        before,
        errors + fake_errors,
        new_ood,
        flagged_before,
    )


def _ood_on_reals(spec: OodSpec, real: Sequence[Scored]) -> tuple[OodSpec, float]:
    """The OOD spec with its threshold taken on these reals (its own quantile, as training takes it on the
    validation images), and the share of them the old threshold flagged."""
    scores = np.array([s.ood for s in real if s.ood is not None and math.isfinite(s.ood)], np.float64)
    if len(scores) < len(real):
        raise CalibrationError(
            f"{len(real) - len(scores)} of the {len(real)} reals have no OOD score from this artifact's "
            "network; its OOD output cannot be calibrated"
        )
    threshold = float(np.quantile(scores, spec.quantile))
    return replace(spec, threshold=threshold, n_val=len(scores)), float((scores > spec.threshold).mean())


def _check_count(n: int, needed: int, target_fpr: float, reals: str | os.PathLike, errors: list[str]) -> None:
    if n >= needed:
        return
    skipped = f" ({len(errors)} more could not be read)" if errors else ""
    raise CalibrationError(
        f"{reals}: {n} {'usable ' if errors else ''}real images{skipped} are too few for a {target_fpr:g} FPR target: it needs at least "
        f"{needed}, the fewest for which zero false positives would show the FPR is at most {target_fpr:g} "
        f"with 95% confidence (about 3/target). Add reals, or aim at a target of at least "
        f"{_reachable(n):.3g}"
    )


def _reachable(n: int) -> float:
    """The lowest target these n reals can support: 1 - 0.05^(1/n)."""
    return 1.0 - (1.0 - CONFIDENCE) ** (1.0 / max(n, 1))


def _scored_model(detector: Detector) -> str:
    """sha256 of the model file that scored the images (TensorRT builds its engine from the FP16 ONNX)."""
    path = getattr(detector.backend, "model_path", None)
    manifest = detector.manifest
    if path is not None:
        rel = Path(path).resolve().relative_to(detector.path.resolve()).as_posix()
    else:
        model = manifest.model("fp16") or manifest.model("fp32")
        if model is None:
            raise ArtifactError(f"{detector.path}: no ONNX model file to attribute the scores to")
        rel = model.path
    return manifest.files[rel]


def write_point(
    artifact: str | os.PathLike,
    manifest: Manifest,
    name: str,
    point: OperatingPoint,
    make_default: bool,
    ood: OodSpec | None = None,
) -> Manifest:
    """Add or replace ``name``, every other point unchanged; atomic, checked before and re-read after.

    The manifest's threshold follows its default point: making this point the default, or replacing the
    point that is the default, moves it. ``ood``: a new OOD spec (else the manifest's stays).
    """
    points = {**manifest.operating_points, name: point}
    default = name if make_default else manifest.operating_point
    threshold = points[default].threshold if default else manifest.threshold
    ood = ood or manifest.ood
    updated = replace(
        manifest, operating_points=points, operating_point=default, threshold=threshold, ood=ood
    )
    text = updated.to_json()
    Manifest.from_dict(json.loads(text))  # the manifest's own checks before anything is written
    path = Path(artifact) / MANIFEST
    write_bytes_atomic(path, text.encode())  # a new file renamed over the old: a planted link is replaced
    reread = read_manifest(artifact)
    if reread.operating_points != points or reread.threshold != threshold or reread.ood != ood:
        raise ArtifactError(f"{path}: the manifest read back differs from the one written; check the disk")
    return reread
