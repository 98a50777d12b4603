"""One rule per shared field: what training would write, the manifest would refuse, and the other way round.

Each variant breaks one field a checkpoint shares with the artifact's manifest. Training (which makes a
``CheckpointMeta`` before it saves) must refuse it with the very message the runtime gives for the same
field in ``manifest.json``: before ``i2p.runtime.schema``, e.g. a checkpoint with 33 operating points
trained and exported, and then the artifact failed to load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from i2p.runtime import ArtifactError, Detector
from i2p.runtime.detect_cli import detect
from i2p.runtime.manifest import Manifest, read_manifest
from i2p.runtime.schema import OperatingPoint
from i2p.train.checkpoint import read_checkpoint
from i2p.train.metadata import CheckpointError, CheckpointMeta

V1 = Path(__file__).parents[1] / "fixtures" / "v1"
META = read_checkpoint(V1 / "checkpoint.safetensors").meta
MANIFEST = json.loads((V1 / "artifact" / "manifest.json").read_text())
POINTS = {name: p.to_dict() for name, p in (META.operating_points or {}).items()}
OTHER = 0.75  # the fixture's three points share one threshold


def _points(**edits: Any) -> dict[str, Any]:
    """The fixture's points with ``edits`` applied (None removes a point)."""
    points = {**POINTS, **edits}
    return {k: v for k, v in points.items() if v is not None}


def _point(**fields: Any) -> dict[str, Any]:
    return {**POINTS["fpr_5pct"], **fields}


# Top-level fields, the same JSON for the checkpoint and the manifest.
VARIANTS: dict[str, dict[str, Any]] = {
    "33 operating points": {"operating_points": _points(**{f"extra_{i}": _point() for i in range(30)})},
    "a point name with a space": {"operating_points": _points(**{"fpr 1pct": _point()})},
    "a point name with a newline": {"operating_points": _points(**{"fpr_1pct\n": _point()})},
    "a point name with a slash": {"operating_points": _points(**{"../x": _point()})},
    "an empty point name": {"operating_points": _points(**{"": _point()})},
    "a 65-character point name": {"operating_points": _points(**{"p" * 65: _point()})},
    "a point threshold NaN": {"operating_points": _points(fpr_5pct=_point(threshold=float("nan")))},
    "a point threshold 1.5": {"operating_points": _points(fpr_5pct=_point(threshold=1.5))},
    "a point threshold -0.1": {"operating_points": _points(fpr_5pct=_point(threshold=-0.1))},
    "a point threshold as text": {"operating_points": _points(fpr_5pct=_point(threshold="0.5"))},
    "a point without a threshold": {"operating_points": _points(fpr_5pct={"rule": "max_tpr_at_fpr"})},
    "a point's val_fpr 1.5": {"operating_points": _points(fpr_5pct=_point(val_fpr=1.5))},
    "a point's n_real -1": {"operating_points": _points(fpr_5pct=_point(n_real=-1))},
    "a point with an unknown key": {"operating_points": _points(fpr_5pct=_point(colour="red"))},
    "threshold NaN": {"threshold": float("nan")},
    "threshold 1.5": {"threshold": 1.5},
    "the default names a missing point": {"operating_point": "fpr_2pct"},
    "the default's point was removed": {"operating_points": _points(balanced=None)},
    "a default name with bad characters": {"operating_point": "bal anced"},
    "threshold disagrees with its named point": {"threshold": OTHER},
    "layer 0": {"layer": 0},
    "num_layers over the cap": {"num_layers": 1001},
    "preprocess size 0": {"preprocess": {**META.preprocess.to_dict(), "size": 0}},
    "preprocess mean above 1": {"preprocess": {**META.preprocess.to_dict(), "mean": [2.0, 0.5, 0.5]}},
    "preprocess std 0": {"preprocess": {**META.preprocess.to_dict(), "std": [0.2, 0.0, 0.2]}},
    "preprocess unknown key": {"preprocess": {**META.preprocess.to_dict(), "colour": "rgb"}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_training_refuses_what_the_manifest_refuses_with_the_same_message(variant: str) -> None:
    fields = VARIANTS[variant]
    with pytest.raises(ArtifactError) as at_load:
        Manifest.from_dict(json.loads(json.dumps({**MANIFEST, **fields})))
    with pytest.raises(CheckpointError) as at_training:  # what loop._end_epoch does before it saves
        dataclasses.replace(META, **fields)
    assert str(at_training.value) == f"checkpoint metadata {at_load.value}"


def test_the_message_names_the_field() -> None:
    cases = {
        "33 operating points": "field 'operating_points' holds 33 points; at most 32",
        "a point name with a space": "'fpr 1pct' is not an operating point name",
        "a point threshold NaN": "field 'operating_points.fpr_5pct.threshold' must be a probability in [0, 1]",
        "the default names a missing point": "field 'operating_point' names 'fpr_2pct', which is not in",
        "threshold disagrees with its named point": "disagrees with field 'operating_points.balanced.threshold'",
        "preprocess std 0": "field 'preprocess': std[G]",
        "layer 0": "field 'layer' must be an integer in [1, 1000]",
    }
    for variant, expected in cases.items():
        with pytest.raises(CheckpointError, match=None) as e:
            dataclasses.replace(META, **VARIANTS[variant])
        assert expected in str(e.value), (variant, str(e.value))


def test_a_checkpoint_file_with_a_broken_shared_field_names_the_file(tmp_path: Path) -> None:
    """The stored metadata, read back: the same rule, with the file's name in front."""
    raw = json.loads(META.to_json())
    for variant in (
        "33 operating points",
        "threshold disagrees with its named point",
        "a point threshold 1.5",
    ):
        data = {**raw, **VARIANTS[variant]}
        with pytest.raises(CheckpointError) as e:
            CheckpointMeta.from_json(json.dumps(data), tmp_path / "c.safetensors")
        assert str(e.value).startswith(f"{tmp_path / 'c.safetensors'}: checkpoint metadata field")


@pytest.mark.parametrize("where", ["operating_points", "top level"])
def test_a_name_twice_in_the_json_is_refused_by_both_readers(tmp_path: Path, where: str) -> None:
    """JSON keeps the last of two equal keys silently: two points named 'balanced' would be one."""
    points = json.dumps(POINTS["balanced"])
    text = json.dumps({**MANIFEST, "operating_points": {}})
    if where == "operating_points":
        dup = f'"operating_points": {{"balanced": {points}, "balanced": {points}}}'
        manifest_text = text.replace('"operating_points": {}', dup)
        ckpt_text = META.to_json().replace(
            '"operating_points": {', f'"operating_points": {{"balanced": {points}, ', 1
        )
    else:
        manifest_text = text.replace('"layer": 1,', '"layer": 1, "layer": 1,')
        ckpt_text = META.to_json().replace('"layer": 1,', '"layer": 1, "layer": 1,', 1)
    artifact = tmp_path / "a.i2p"
    shutil.copytree(V1 / "artifact", artifact)
    (artifact / "manifest.json").write_text(manifest_text)
    with pytest.raises(ArtifactError, match="appears twice in one object") as at_load:
        read_manifest(artifact)
    with pytest.raises(CheckpointError, match="appears twice in one object") as at_read:
        CheckpointMeta.from_json(ckpt_text, "c.safetensors")
    assert str(at_load.value).split("manifest, ")[1] in str(at_read.value)


@pytest.mark.parametrize(
    "variant",
    [
        "the default names a missing point",
        "the default's point was removed",
        "threshold disagrees with its named point",
        "a point name with a newline",
    ],
)
def test_cross_field_rules_refuse_the_artifact_through_the_api_and_i2p_detect(tmp_path: Path, variant: str):
    """Issue 22: contradicting manifest fields loaded (the default pointed nowhere, or at another threshold)."""
    artifact = tmp_path / "a.i2p"
    shutil.copytree(V1 / "artifact", artifact)
    (artifact / "manifest.json").write_text(json.dumps({**MANIFEST, **VARIANTS[variant]}))
    with pytest.raises(ArtifactError, match="manifest.json: field"):
        Detector(artifact, backend="onnxruntime")
    result = CliRunner().invoke(detect, [str(V1 / "images" / "img_0.png"), "--model", str(artifact)])
    assert result.exit_code == 1 and "Traceback" not in result.output  # a bad input file (README: exit codes)
    assert "field" in result.stderr and "manifest.json" in result.stderr


def test_the_code_holds_typed_operating_points_end_to_end() -> None:
    assert all(isinstance(p, OperatingPoint) for p in META.operating_points.values())
    manifest = read_manifest(V1 / "artifact")
    assert manifest.operating_points == META.operating_points
    assert manifest.point_threshold(META.operating_point) == META.threshold
