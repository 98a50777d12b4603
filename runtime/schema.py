"""The fields a checkpoint and an artifact's manifest share, and the one rule for each.

Training writes these fields into the checkpoint, export copies them into the manifest, the runtime
reads them back: each is checked by the one validator here, so what training writes, export copies
and the runtime loads are the same set (a checkpoint with 33 operating points is refused when it is
written, not by the Detector after export). Dataclasses inside the code, dicts only at the JSON
boundary. Torch-free: train and export import it through the runtime.

Every error is a ``SchemaError`` whose message names the field; the reader adds the file
(``ArtifactError`` for a manifest, ``CheckpointError`` for a checkpoint), so one broken rule reads
the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .preprocess import PreprocessSpec

MAX_LAYERS = 1000
MAX_POINTS = 32
MAX_NAME = 64
POINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # "balanced", "fpr_1pct", "fpr_0.5pct"


class SchemaError(ValueError):
    """A shared field breaks its rule; the message names the field (the caller names the file)."""


def probability(value: Any, field: str) -> float:
    """A number in [0, 1] (not NaN, not a bool): every threshold and rate is one."""
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or not 0 <= value <= 1:
        raise SchemaError(f"field {field!r} must be a probability in [0, 1], got {value!r:.80}")
    return float(value)


def integer(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SchemaError(f"field {field!r} must be an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def layers(layer: Any, num_layers: Any) -> tuple[int, int]:
    """(L*, N): the blocks kept and the blocks of the full backbone, 1 <= L* <= N <= MAX_LAYERS."""
    layer = integer(layer, "layer", 1, MAX_LAYERS)
    return layer, integer(num_layers, "num_layers", layer, MAX_LAYERS)


def preprocess(value: Any) -> PreprocessSpec:
    """The preprocessing spec (size, mean, std, ...): PreprocessSpec's own checks, named as the field."""
    if isinstance(value, PreprocessSpec):
        return value
    try:
        return PreprocessSpec.from_dict(value)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"field 'preprocess': {e}") from e


POOLS = ("cls", "mean")  # the layer feature: class token, or mean of the patch tokens (registers excluded)


def pool(value: Any) -> str:
    """How the network reads its layer feature (one of ``POOLS``); artifacts without the field mean "cls"."""
    if value not in POOLS:
        raise SchemaError(f"field 'pool' must be one of {list(POOLS)}, got {value!r:.80}")
    return value


def point_name(value: Any, field: str) -> str:
    """1 to 64 letters, digits and ``_ . + -``: names end up in tables, CSV headers and file names."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not POINT_NAME.fullmatch(value):
        raise SchemaError(
            f"field {field!r}: {value!r:.80} is not an operating point name "
            f"(1 to {MAX_NAME} letters, digits, '_', '.', '+', '-', starting with a letter or digit)"
        )
    return value


CALIBRATED = "fpr_on_reals"  # the rule of ``i2p calibrate``: a point that must carry its digest
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class OperatingPoint:
    """A named threshold and how it was chosen, with what it gave on the validation set.

    Only ``threshold`` is required: artifacts written before the other fields existed still load. The
    last four are written by ``i2p calibrate`` (rule ``fpr_on_reals``) and omitted from JSON when unset.
    """

    threshold: float
    rule: str = ""  # "balanced_accuracy" | "max_tpr_at_fpr" | "fpr_on_reals"
    target_fpr: float | None = None
    val_fpr: float | None = None  # fraction of validation (calibration) reals called fake at the threshold
    val_tpr: float | None = None  # fraction of validation fakes caught
    n_real: int | None = None
    n_fake: int | None = None
    fpr_ci95: tuple[float, float] | None = None  # two-sided 95% Clopper-Pearson interval of val_fpr
    files_sha256: str | None = None  # the calibration files (i2p.evaluation.calibrate.files_digest)
    model_sha256: str | None = None  # the model file that scored them (backend and precision of deployment)
    digest: str | None = None  # sha256 of the point's canonical JSON (``point_digest``)

    def __post_init__(self) -> None:
        _point_fields(asdict(self), "operating point")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in _CALIBRATION:
            if d[key] is None:
                del d[key]
        if d.get("fpr_ci95") is not None:
            d["fpr_ci95"] = list(d["fpr_ci95"])
        return d

    @classmethod
    def from_dict(cls, d: Any, field: str = "operating point") -> OperatingPoint:
        if not isinstance(d, dict):
            raise SchemaError(f"field {field!r} must be an object, got {type(d).__name__}")
        if "threshold" not in d:
            raise SchemaError(f"field {field!r} must hold a 'threshold'")
        unknown = sorted(map(str, set(d) - set(cls.__dataclass_fields__)))
        if unknown:
            raise SchemaError(f"field {field!r}: unknown key(s) {unknown}")
        _point_fields(d, field)
        if d.get("fpr_ci95") is not None:
            d = {**d, "fpr_ci95": tuple(d["fpr_ci95"])}
        return cls(**d)


_RATES = ("target_fpr", "val_fpr", "val_tpr")
_COUNTS = ("n_real", "n_fake")
_CALIBRATION = ("fpr_ci95", "files_sha256", "model_sha256", "digest")


def _point_fields(d: dict[str, Any], field: str) -> None:
    probability(d["threshold"], f"{field}.threshold")
    if not isinstance(d.get("rule", ""), str) or len(d.get("rule", "")) > MAX_NAME:
        raise SchemaError(f"field '{field}.rule' must be a string of at most {MAX_NAME} characters")
    for key in _RATES:
        if d.get(key) is not None:
            probability(d[key], f"{field}.{key}")
    for key in _COUNTS:
        if d.get(key) is not None:
            integer(d[key], f"{field}.{key}", 0, 1 << 40)
    interval = d.get("fpr_ci95")
    if interval is not None:
        if not isinstance(interval, (list, tuple)) or len(interval) != 2:
            raise SchemaError(f"field '{field}.fpr_ci95' must be a [low, high] pair, got {interval!r:.80}")
        low, high = (probability(v, f"{field}.fpr_ci95") for v in interval)
        if low > high:
            raise SchemaError(f"field '{field}.fpr_ci95': low {low!r} is above high {high!r}")
    for key in ("files_sha256", "model_sha256", "digest"):
        if d.get(key) is not None and not (isinstance(d[key], str) and _SHA256.fullmatch(d[key])):
            raise SchemaError(f"field '{field}.{key}' must be a lowercase hex sha256, got {d[key]!r:.80}")


def point_digest(name: str, point: OperatingPoint) -> str:
    """sha256 of the point's canonical JSON, its name included and ``digest`` left out.

    Canonical: ``{"name": NAME, **fields}`` with unset calibration fields omitted, numbers as floats
    (rates) or integers (counts), ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True)``.
    It detects a point edited by hand or corrupted after ``i2p calibrate`` wrote it, not a forger:
    anyone can recompute it (nothing in the manifest is signed).
    """
    d = {k: v for k, v in point.to_dict().items() if k != "digest"}
    for key in ("threshold", *_RATES):
        if d.get(key) is not None:
            d[key] = float(d[key])
    if d.get("fpr_ci95") is not None:
        d["fpr_ci95"] = [float(v) for v in d["fpr_ci95"]]
    text = json.dumps({"name": name, **d}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_digest(name: str, point: OperatingPoint, field: str) -> None:
    """A calibrated point (rule ``fpr_on_reals``) must carry its digest, and any digest must match."""
    if point.digest is None and point.rule != CALIBRATED:
        return
    if point.digest is None:
        raise SchemaError(
            f"field {field!r}: a point of rule {CALIBRATED!r} must carry its 'digest'; it was removed or the "
            "point was written by hand. Re-run `i2p calibrate` to make it again"
        )
    if point_digest(name, point) != point.digest:
        raise SchemaError(
            f"field {field!r} was edited after it was calibrated (its fields no longer match its digest: "
            f"threshold {point.threshold!r}); re-run `i2p calibrate` rather than editing the manifest"
        )


def operating_points(value: Any, field: str = "operating_points") -> dict[str, OperatingPoint]:
    """name -> OperatingPoint; at most MAX_POINTS, names by ``point_name``. Accepts JSON or typed points."""
    if not isinstance(value, Mapping):
        raise SchemaError(f"field {field!r} must be an object, got {type(value).__name__}")
    if len(value) > MAX_POINTS:
        raise SchemaError(f"field {field!r} holds {len(value)} points; at most {MAX_POINTS} are allowed")
    points = {}
    for name, point in value.items():
        where = f"{field}.{point_name(name, field)}"
        points[name] = point if isinstance(point, OperatingPoint) else OperatingPoint.from_dict(point, where)
        check_digest(name, points[name], where)
    return points


def default_point(threshold: float | None, points: Mapping[str, OperatingPoint] | None, name: str) -> None:
    """Cross-field rule: the named default point exists, and ``threshold`` is that point's threshold.

    ``points=None``: a checkpoint from before operating points (its default name "balanced" names none).
    """
    if not name or points is None:
        return
    if name not in points:
        held = ", ".join(sorted(points)) or "none"
        raise SchemaError(
            f"field 'operating_point' names {name!r:.80}, which is not in field 'operating_points' (it holds: {held})"
        )
    if threshold is not None and threshold != points[name].threshold:
        raise SchemaError(
            f"field 'threshold' ({threshold!r}) disagrees with field 'operating_points.{name}.threshold' "
            f"({points[name].threshold!r}), the point that field 'operating_point' names"
        )


def parse_json(text: str | bytes) -> Any:
    """Untrusted JSON (a manifest, a checkpoint's metadata): every way it can be bad is one SchemaError.

    Besides malformed text, that is a key twice in one object, nesting deeper than the parser's stack
    (RecursionError) and an integer too long to convert (Python's 4,300-digit limit, a ValueError).
    """
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except SchemaError:
        raise
    except RecursionError:
        raise SchemaError("not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, an over-long integer
        raise SchemaError(f"not valid JSON ({str(e)[:200]})") from None


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads(object_pairs_hook=...)``: a key twice in one object (two points of one name) is refused."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise SchemaError(f"the key {twice!r:.80} appears twice in one object; which one holds is ambiguous")
    return d


OOD_OUTPUT = "ood"  # the network's optional second output: one out-of-distribution score per image
MAX_OOD = 1e30


@dataclass(frozen=True)
class OodSpec:
    """The out-of-distribution score a network returns beside its logit, and when it flags an image.

    ``ood`` is the squared Mahalanobis distance of the image's layer-L* feature (after the head's
    LayerNorm) to the nearest class mean of the training features, under one shared Ledoit-Wolf-shrunk
    covariance, divided by the feature width: about 1 for images like the training ones. ``threshold``
    is its ``quantile`` on the validation images; above it a verdict is ``uncertain``.
    """

    threshold: float
    quantile: float = 0.95
    n_fit: int = 0  # training images the density was fitted on
    n_val: int = 0  # validation images the threshold was taken from
    shrinkage: float = 0.0  # Ledoit-Wolf weight of the scaled identity in the covariance
    feature: str = "head_norm"  # the pooled layer-L* feature after the head's LayerNorm

    def __post_init__(self) -> None:
        t = self.threshold
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not math.isfinite(t)
            or not 0 <= t <= MAX_OOD
        ):
            raise SchemaError(f"field 'ood.threshold' must be a finite number >= 0, got {t!r:.80}")
        if not 0 < probability(self.quantile, "ood.quantile") <= 1:
            raise SchemaError(f"field 'ood.quantile' must be in (0, 1], got {self.quantile!r}")
        integer(self.n_fit, "ood.n_fit", 0, 1 << 40)
        integer(self.n_val, "ood.n_val", 0, 1 << 40)
        probability(self.shrinkage, "ood.shrinkage")
        if self.feature != "head_norm":
            raise SchemaError(f"field 'ood.feature' must be 'head_norm', got {self.feature!r:.80}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> OodSpec:
        """The JSON object (SchemaError naming the field for a wrong or unknown key)."""
        if not isinstance(d, dict):
            raise SchemaError(f"field 'ood' must be an object, got {type(d).__name__}")
        unknown = sorted(map(str, set(d) - set(cls.__dataclass_fields__)))
        if unknown:
            raise SchemaError(f"field 'ood': unknown key(s) {unknown}")
        if "threshold" not in d:
            raise SchemaError("field 'ood' must hold a 'threshold'")
        return cls(**d)
