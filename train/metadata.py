"""The checkpoint's metadata as a typed record: written in one place, read in one place, versioned.

``checkpoint.safetensors`` carries this record as JSON under the ``i2p`` metadata key. Format 1 (before
this module) stored the preprocessing spec twice (top level and inside ``backbone``); format 2 stores
it once, at the top level. Both are read; anything else is refused with a message naming the file and
the field, so a malformed checkpoint is one clear error, never a traceback.

The fields an exported manifest shares (layers, threshold, preprocessing, operating points) follow
``i2p.runtime.schema``, checked whenever a ``CheckpointMeta`` is made: training refuses to write a
checkpoint whose artifact the runtime would refuse, with the message the runtime would give.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from i2p.runtime import schema
from i2p.runtime.preprocess import PreprocessSpec
from i2p.runtime.schema import OodSpec, OperatingPoint, SchemaError

FORMAT = "i2p-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class CheckpointError(ValueError):
    """A checkpoint is unreadable, truncated, from a newer version, or its base weights do not match."""


@dataclass(frozen=True)
class BackboneInfo:
    """What a checkpoint records about its frozen base, so export can find and verify it again."""

    model: str  # model name: open_clip, timm, or an i2p config in train/model_configs
    pretrained: str  # file path, library tag, or "none"
    sha256: str  # of the weights file; of the state dict for random init
    num_layers: int
    width: int
    family: str = "open_clip"  # i2p.train.backbones family (checkpoints before families: open_clip)
    pool: str = "cls"  # how the layer feature is read: "cls" token or "mean" of patch tokens

    def __post_init__(self) -> None:
        try:
            schema.pool(self.pool)
        except SchemaError as e:
            raise CheckpointError(f"checkpoint metadata backbone {e}") from e


@dataclass(frozen=True)
class ResumeInfo:
    """The small, non-tensor part of a resumable training state (the optimizer moments are tensors)."""

    epoch: int
    scheduler: dict[str, Any]
    optimizer_steps: dict[str, float]


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything a checkpoint says besides its tensors."""

    backbone: BackboneInfo
    layer: int  # L*: blocks 1..layer are kept
    num_layers: int
    preprocess: PreprocessSpec
    baseline: bool = False
    threshold: float | None = None  # calibrated on validation; None until the first epoch ends
    config: dict[str, Any] = field(default_factory=dict)  # TrainConfig.to_dict()
    importance: dict[str, Any] | None = None  # ImportanceProfile.to_dict()
    metrics: dict[str, Any] | None = None
    parameters: dict[str, int] | None = None
    train_loss: float | None = None
    complete: bool = False
    wall_time_s: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    resume: ResumeInfo | None = None
    # Named thresholds calibrated on validation, and the one ``threshold`` is.
    operating_points: dict[str, OperatingPoint] | None = None
    operating_point: str = "balanced"
    # The out-of-distribution density's threshold (its tensors are ``ood.*``); None before it was fitted
    # (checkpoints written before the OOD score, and every epoch but the last).
    ood: OodSpec | None = None

    def __post_init__(self) -> None:
        """The manifest's rules for the fields it shares (JSON points become typed ones here)."""
        try:
            schema.layers(self.layer, self.num_layers)
            if self.threshold is not None:
                schema.probability(self.threshold, "threshold")
            object.__setattr__(self, "preprocess", schema.preprocess(self.preprocess))
            if self.operating_points is not None:
                object.__setattr__(self, "operating_points", schema.operating_points(self.operating_points))
                schema.point_name(self.operating_point, "operating_point")
            schema.default_point(self.threshold, self.operating_points, self.operating_point)
            if isinstance(self.ood, dict):
                object.__setattr__(self, "ood", OodSpec.from_dict(self.ood))
        except SchemaError as e:
            raise CheckpointError(f"checkpoint metadata {e}") from e

    def to_json(self) -> str:
        d = asdict(self)
        if self.operating_points is not None:  # unset calibration fields are left out, as in the manifest
            d["operating_points"] = {name: p.to_dict() for name, p in self.operating_points.items()}
        resume = d.pop("resume")
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **d, **(resume or {})})

    @classmethod
    def from_json(cls, raw: str, path: str | Path) -> CheckpointMeta:
        """Parse and check the stored JSON of ``path``; every problem is a CheckpointError naming it."""
        try:
            d = schema.parse_json(raw)
        except SchemaError as e:
            raise CheckpointError(f"{path}: unreadable i2p metadata, {e}") from None
        return _parse(d, _Fields(path))


class _Fields:
    """Typed field access that names the checkpoint and the field in every error."""

    def __init__(self, path: str | Path):
        self.path = path

    def error(self, name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: checkpoint metadata field {name!r} {problem}")

    def get(self, d: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        if name not in d or (optional and d[name] is None):
            if optional:
                return None
            raise self.error(name, "is missing")
        value = d[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a checkpoint saying "layer": true is malformed all the same
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(name, f"must be {names}, not {type(value).__name__} {value!r:.60}")
        return value

    def number(self, d: dict[str, Any], name: str, optional: bool = False) -> float | None:
        value = self.get(d, name, (int, float), optional)
        if value is not None and not math.isfinite(value):
            raise self.error(name, f"must be a finite number, not {value}")
        return value


def _parse(d: Any, f: _Fields) -> CheckpointMeta:
    if not isinstance(d, dict):
        raise CheckpointError(f"{f.path}: the i2p metadata must be a JSON object, not {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{f.path}: not an i2p checkpoint (format={d.get('format')!r})")
    version = f.get(d, "format_version", int)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{f.path}: checkpoint format {version} is newer than this i2p ({FORMAT_VERSION}); upgrade"
        )
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{f.path}: unknown checkpoint format version {version}")
    b = f.get(d, "backbone", dict)
    backbone = BackboneInfo(
        model=f.get(b, "model", str),
        pretrained=f.get(b, "pretrained", str),
        sha256=f.get(b, "sha256", str),
        num_layers=f.get(b, "num_layers", int),
        width=f.get(b, "width", int),
        family=f.get(b, "family", str, optional=True) or "open_clip",
        pool=f.get(b, "pool", str, optional=True) or "cls",
    )
    num_layers = f.get(d, "num_layers", int)
    layer = f.get(d, "layer", int)
    if num_layers != backbone.num_layers or not 1 <= layer <= num_layers:
        raise f.error("layer", f"{layer} does not fit a backbone of {backbone.num_layers} blocks")
    fields = dict(
        backbone=backbone,
        layer=layer,
        num_layers=num_layers,
        preprocess=_preprocess(d, b, f),
        baseline=f.get(d, "baseline", bool, optional=True) or False,
        threshold=f.number(d, "threshold", optional=True),
        config=f.get(d, "config", dict, optional=True) or {},
        importance=f.get(d, "importance", dict, optional=True),
        metrics=f.get(d, "metrics", dict, optional=True),
        parameters=f.get(d, "parameters", dict, optional=True),
        train_loss=f.number(d, "train_loss", optional=True),
        complete=f.get(d, "complete", bool, optional=True) or False,
        wall_time_s=f.number(d, "wall_time_s", optional=True) or 0.0,
        versions=f.get(d, "versions", dict, optional=True) or {},
        resume=_resume(d, f),
        operating_points=f.get(d, "operating_points", dict, optional=True),
        operating_point=f.get(d, "operating_point", str, optional=True) or "balanced",
        ood=f.get(d, "ood", dict, optional=True),
    )
    try:
        return CheckpointMeta(**fields)
    except CheckpointError as e:  # a shared field's rule (CheckpointMeta checks it): name the file
        raise CheckpointError(f"{f.path}: {e}") from e


def _preprocess(d: dict[str, Any], backbone: dict[str, Any], f: _Fields) -> PreprocessSpec:
    """Format 2: top level only. Format 1 wrote it at the top level and inside ``backbone``."""
    raw = d.get("preprocess") if d.get("preprocess") is not None else backbone.get("preprocess")
    if not isinstance(raw, dict):
        raise f.error("preprocess", "is missing" if raw is None else f"must be an object, not {raw!r:.60}")
    try:
        return PreprocessSpec.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise f.error("preprocess", f"is not a preprocessing spec: {e}") from e


def _resume(d: dict[str, Any], f: _Fields) -> ResumeInfo | None:
    if "epoch" not in d:
        return None
    steps = f.get(d, "optimizer_steps", dict)
    for key, value in steps.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise f.error("optimizer_steps", f"must map to numbers, not {key!r}: {value!r:.60}")
    return ResumeInfo(f.get(d, "epoch", int), f.get(d, "scheduler", dict), steps)
