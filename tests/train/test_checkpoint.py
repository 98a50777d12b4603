"""Checkpoints: typed metadata round trip, format versions, and every malformed file one clear error.

Each broken variant must be a ``CheckpointError`` naming the file (API) and, through ``i2p-export``,
``i2p eval`` and ``i2p-train --resume``, a one-line error with a non-zero exit and no traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from i2p.cli import main
from i2p.train.checkpoint import load_model, read_checkpoint, save_checkpoint
from i2p.train.config import TrainConfig
from i2p.train.metadata import FORMAT_VERSION, CheckpointError, CheckpointMeta
from tests.support.checkpoints import TINY, make_checkpoint
from tests.support.images import make_image_folder

Meta = dict
Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root, n_per_class=3, size=(72, 64))
    return root


@pytest.fixture(scope="module")
def good(tmp_path_factory, data_dir, checkpoint_l2) -> Path:
    """A tiny checkpoint that ``i2p-train --resume`` would continue (its config matches ``RESUME_ARGS``)."""
    config = TrainConfig(data=str(data_dir), model=TINY, pretrained="none", layer="2", rank=4).to_dict()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict()
    resume = {"complete": False, "epoch": 0, "scheduler": scheduler, "optimizer_steps": {}}
    return rewrite(  # the session's checkpoint_l2 (L* = 2, rank 4) is read, the copy written here
        checkpoint_l2,
        tmp_path_factory.mktemp("good") / "resumable.safetensors",
        meta=lambda m: m | {"config": config, **resume},
    )


def rewrite(
    src: Path,
    dst: Path,
    meta: Callable[[Meta], Meta | str] | None = None,
    tensors: Callable[[Tensors], Tensors] | None = None,
) -> Path:
    """Copy a checkpoint, changing its metadata JSON (a callable on the dict, or returning raw text) or tensors."""
    with safe_open(str(src), "pt") as f:
        raw = f.metadata()["i2p"]
    t = load_file(src)
    if meta is not None:
        new = meta(json.loads(raw))
        raw = new if isinstance(new, str) else json.dumps(new)
    if tensors is not None:
        t = tensors(t)
    save_file(t, dst, metadata={"i2p": raw})
    return dst


def _set(path: str, value):
    """Meta edit: set a dotted key (``backbone.model``)."""

    def edit(m: Meta) -> Meta:
        *parents, last = path.split(".")
        d = m
        for p in parents:
            d = d[p]
        d[last] = value
        return m

    return edit


def _drop(*keys: str):
    return lambda m: {k: v for k, v in m.items() if k not in keys}


def _reshape(key: str, shape: tuple[int, ...]):
    return lambda t: t | {key: torch.zeros(shape)}


def _poison(key: str, value: float):
    def edit(t: Tensors) -> Tensors:
        poisoned = t[key].clone()
        poisoned.view(-1)[0] = value
        return t | {key: poisoned}

    return edit


def _without(prefix: str):
    return lambda t: {k: v for k, v in t.items() if not k.startswith(prefix)}


BROKEN_META = {
    "bad JSON": (lambda m: '{"format": "i2p-checkpoint", ', "not valid JSON"),
    "nested too deeply": (lambda m: '{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    "an over-long integer": (
        lambda m: json.dumps(m)[:-1] + ', "layer": ' + "7" * 5000 + "}",
        "not valid JSON",
    ),
    "a list": (lambda m: json.dumps([m]), "JSON object"),
    "string version": (_set("format_version", "1"), "'format_version' must be int"),
    "bool version": (_set("format_version", True), "'format_version' must be int"),
    "unknown version": (_set("format_version", 0), "unknown checkpoint format version 0"),
    "newer version": (_set("format_version", 99), "newer than this i2p"),
    "missing backbone": (_drop("backbone"), "'backbone' is missing"),
    "string backbone": (_set("backbone", "i2p-tiny-vit"), "'backbone' must be dict"),
    "backbone without model": (
        lambda m: m | {"backbone": _drop("model")(m["backbone"])},
        "'model' is missing",
    ),
    "layer outside the backbone": (_set("layer", 9), "'layer' 9 does not fit"),
    "string threshold": (_set("threshold", "0.5"), "'threshold' must be"),
    "threshold above 1": (_set("threshold", 7), "probability in [0, 1]"),
    "bad preprocess": (_set("preprocess", {"size": 64, "crop": "random"}), "'preprocess'"),
    "unknown model name": (_set("backbone.model", "no-such-model"), "unknown model 'no-such-model'"),
    "a different model": (_set("backbone.model", "ViT-B-32"), "has 12 blocks of width 768"),
}
BROKEN_TENSORS = {
    "wrong head shape": (_reshape("head.fc.weight", (1, 32)), "head.fc.weight has shape (1, 32)"),
    "missing head": (_without("head."), "missing head.fc.weight"),
    "wrong delta shape": (
        _reshape("delta.0.mlp.c_fc.weight.U", (7, 4)),
        "delta.0.mlp.c_fc.weight.U has shape",
    ),
    "a missing delta": (_without("delta.1.attn.out_proj"), "missing delta.1.attn.out_proj.weight"),
    "wrong base shape": (_reshape("base.conv1.weight", (64, 3, 8, 8)), "base weights do not fit"),
    "missing base tensors": (
        _without("base.transformer.resblocks.0."),
        "base weights do not fit i2p-tiny-vit: 12 missing",
    ),
    "an extra base tensor": (lambda t: t | {"base.extra": torch.zeros(2)}, "1 unexpected ['extra']"),
    "NaN in the head": (_poison("head.fc.weight", float("nan")), "head.fc.weight has 1 of 64 values NaN"),
    "inf in a delta": (_poison("delta.0.attn.out_proj.weight.A", float("inf")), ".A has 1 of 16 values +inf"),
    "-inf in the base": (_poison("base.conv1.weight", float("-inf")), "base.conv1.weight has 1 of"),
    "an integer head": (
        lambda t: t | {"head.fc.bias": torch.zeros(1, dtype=torch.int32)},
        "head.fc.bias has dtype int32",
    ),
}
BROKEN = {
    **{k: (m, None, e) for k, (m, e) in BROKEN_META.items()},
    **{k: (None, t, e) for k, (t, e) in BROKEN_TENSORS.items()},
}


@pytest.fixture(params=sorted(BROKEN))
def broken(request, good, tmp_path) -> tuple[Path, str]:
    meta, tensors, expected = BROKEN[request.param]
    out = tmp_path / "run"
    out.mkdir()
    return rewrite(good, out / "checkpoint.safetensors", meta, tensors), expected


def test_each_broken_checkpoint_is_one_error_naming_the_file(broken):
    path, expected = broken
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def _no_traceback(res, path: Path, expected: str) -> None:
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output + repr(res.exception)
    assert "Traceback" not in res.output and str(path) in res.output and expected in res.output, res.output


def test_i2p_export_refuses_each_broken_checkpoint(broken):
    path, expected = broken
    res = CliRunner().invoke(main, ["export", "--ckpt", str(path), "--engine", "no"])
    _no_traceback(res, path, expected)
    assert not path.with_suffix(".i2p").exists()


def test_i2p_eval_refuses_each_broken_checkpoint(broken, data_dir):
    path, expected = broken
    res = CliRunner().invoke(main, ["eval", "--ckpt", str(path), "--data", str(data_dir), "--workers", "0"])
    _no_traceback(res, path, expected)


RESUME_ARGS = ["--model", TINY, "--pretrained", "none", "--layer", "2", "--rank", "4", "--workers", "0"]


def test_i2p_train_resume_refuses_each_broken_checkpoint(broken, data_dir):
    path, expected = broken
    args = ["train", "--data", str(data_dir), "--out", str(path.parent), "--resume", *RESUME_ARGS]
    _no_traceback(CliRunner().invoke(main, args), path, expected)


@pytest.mark.slow
def test_the_good_checkpoint_passes_the_same_paths(good, data_dir, tmp_path):
    """The tampering helper itself breaks nothing: the untouched copy loads, evaluates and resumes."""
    model, meta = load_model(good)
    assert meta.layer == model.layer == 2 and meta.resume is not None
    res = CliRunner().invoke(main, ["eval", "--ckpt", str(good), "--data", str(data_dir), "--workers", "0"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(good.read_bytes())
    args = ["train", "--data", str(data_dir), "--out", str(out), "--resume", "--epochs", "2", *RESUME_ARGS]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert read_checkpoint(out / "checkpoint.safetensors").meta.complete


@pytest.mark.parametrize(
    "shapes",
    [{"conv1.weight": (64, 3, 8, 8)}, {"transformer.resblocks.0.mlp.c_fc.weight": (10, 64)}],
)
def test_pretrained_weights_of_the_wrong_shape_are_a_clear_error(tmp_path, data_dir, shapes):
    from i2p.train.backbone import build_tower

    sd = {k: v.clone() for k, v in build_tower(TINY).state_dict().items()}
    sd |= {k: torch.zeros(s) for k, s in shapes.items()}
    weights = tmp_path / "weights.safetensors"
    save_file(sd, weights)
    args = ["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--model", TINY]
    res = CliRunner().invoke(main, [*args, "--pretrained", str(weights), "--workers", "0"])
    _no_traceback(res, weights, f"{next(iter(shapes))} {next(iter(shapes.values()))}")


def test_metadata_round_trip_and_the_preprocess_spec_is_stored_once(tmp_path):
    ckpt = make_checkpoint(tmp_path, layer=3, threshold=0.25)
    with safe_open(str(ckpt), "pt") as f:
        stored = json.loads(f.metadata()["i2p"])
    assert stored["format_version"] == FORMAT_VERSION == 2
    assert "preprocess" in stored and "preprocess" not in stored["backbone"]
    meta = read_checkpoint(ckpt).meta
    assert CheckpointMeta.from_json(meta.to_json(), ckpt) == meta
    assert (meta.layer, meta.threshold, meta.preprocess.size) == (3, 0.25, 64)


def test_a_rewritten_checkpoint_keeps_its_tensors(tmp_path):
    src = make_checkpoint(tmp_path)
    model, meta = load_model(src)
    dst = tmp_path / "again.safetensors"
    save_checkpoint(dst, model, meta, base=read_checkpoint(src).section("base."))
    a, b = load_file(src), load_file(dst)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert oct(dst.stat().st_mode & 0o777) == "0o644"


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="checkpoint.safetensors.*truncated or corrupt"):
        read_checkpoint(ckpt)
    res = CliRunner().invoke(main, ["export", "--ckpt", str(ckpt)])
    _no_traceback(res, ckpt, "truncated or corrupt")
