"""``i2p backbones``: every family listed with its sizes, pooling, weights sources and preprocessing status."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from i2p.cli import main


@pytest.mark.slow  # builds nine full-size towers on the meta device (~12 s)
def test_the_default_list_covers_every_family_with_real_sizes():
    result = CliRunner().invoke(main, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["model"]: r for r in json.loads(result.output)}
    assert {r["family"] for r in rows.values()} == {"open_clip", "timm", "open_clip_timm"}
    dinov2 = rows["vit_small_patch14_dinov2"]
    assert (dinov2["layers"], dinov2["width"], dinov2["input_size"], dinov2["pool"]) == (12, 384, 518, "cls")
    assert (
        21 < dinov2["params_m"] < 23
        and "lvd142m" in dinov2["weights"]
        and dinov2["preprocessing"] == "shortest, bicubic"
    )
    assert rows["ViT-L-14"]["layers"] == 24 and 300 < rows["ViT-L-14"]["params_m"] < 310
    assert rows["ViT-B-16-SigLIP2"]["pool"] == "mean"
    assert rows["ViT-B-16-SigLIP2"]["preprocessing"] == "squash, bicubic"
    assert rows["PE-Core-B-16"]["preprocessing"] == "squash, bilinear"
    assert rows["eva02_base_patch14_224"]["preprocessing"] == "shortest, bicubic, crop_pct 0.9"


def test_named_models_are_described_and_an_unknown_one_is_one_error():
    result = CliRunner().invoke(main, ["backbones", "i2p-tiny-dinov2-reg", "i2p-tiny-siglip2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[2].split()[:7] == ["i2p-tiny-dinov2-reg", "timm", "3", "64", "56", "0.2", "cls"]
    assert lines[3].split()[:7] == ["i2p-tiny-siglip2", "open_clip_timm", "3", "64", "64", "0.3", "mean"]
    result = CliRunner().invoke(main, ["backbones", "no_such_net"])
    assert result.exit_code == 1 and "unknown model 'no_such_net'" in result.output
    assert "Traceback" not in result.output
