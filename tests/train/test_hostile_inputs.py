"""Hostile training inputs: backbone weights (values, tensor kinds, architecture) and ``--resume`` state.

Each is one error naming the file and what is wrong, before any training step: never a RuntimeError from
deep inside torch, never a run that trains on NaN.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from i2p.cli import main
from i2p.train.backbone import BackboneError, build_tower, load_backbone
from i2p.train.checkpoint import read_checkpoint
from i2p.train.resume import resume_state
from tests.support.checkpoints import TINY, tiny_model
from tests.support.training import TINY as TINY_ARGS
from tests.support.training import training_folder
from tests.train.test_checkpoint import rewrite

# a visual tower tensor, and where the same position sits in a full open_clip CLIP state dict
KEY = "transformer.resblocks.1.attn.in_proj_weight"


@pytest.fixture(scope="module")
def tower_sd() -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in build_tower(TINY).state_dict().items()}


def save(sd: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def full_clip(visual: dict[str, torch.Tensor], text: dict[str, object] | None = None) -> dict[str, object]:
    """An open_clip full-model state dict: ``visual.*``, and text-tower tensors at the top level."""
    text = text if text is not None else {
        "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8),
        "token_embedding.weight": torch.zeros(2, 8),
        "logit_scale": torch.ones(()),
    }  # fmt: skip
    return {f"visual.{k}": v for k, v in visual.items()} | text


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(BackboneError) as e:
        load_backbone(TINY, str(path))
    message = str(e.value)
    assert str(path) in message and all(f in message for f in fragments), message
    return message


@pytest.mark.parametrize("value, kind", [(math.nan, "NaN"), (math.inf, "+inf"), (-math.inf, "-inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("layout", ["visual-only", "full CLIP"])
def test_non_finite_weights_name_the_file_and_the_tensor(tmp_path, tower_sd, value, kind, suffix, layout):
    sd = dict(tower_sd)
    sd[KEY] = sd[KEY].clone()
    sd[KEY][0, 3] = sd[KEY][5, 1] = value
    named = KEY if layout == "visual-only" else f"visual.{KEY}"
    path = save(sd if layout == "visual-only" else full_clip(sd), tmp_path / f"w{suffix}")
    refused(path, f"{named} has 2 of {sd[KEY].numel()} values {kind}")


def test_every_offending_tensor_is_counted_and_the_first_named(tmp_path, tower_sd):
    sd = {k: torch.full_like(v, math.nan) for k, v in tower_sd.items()}
    message = refused(save(sd, tmp_path / "all-nan.safetensors"), f"{len(sd)} tensor(s) cannot be weights")
    assert f"and {len(sd) - 5} more" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_text_tower_of_a_full_clip_file_is_never_read(tmp_path, tower_sd, suffix):
    """Decision: text-tower tensors are not loaded, so they are not checked: NaN there changes nothing."""
    text = {
        "transformer.resblocks.0.attn.in_proj_weight": torch.full((24, 8), math.nan),
        "token_embedding.weight": torch.full((2, 8), math.inf),
        "logit_scale": torch.tensor(-math.inf),
    }
    tower, _ = load_backbone(TINY, str(save(full_clip(tower_sd, text), tmp_path / f"full{suffix}")))
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in tower_sd.items())


def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.ones(64), 0.1, 0, torch.qint8)


# (replacement for ln_pre.weight, a fragment of the expected message); each can be pickled by torch.save
NOT_WEIGHTS_PT = {
    "sparse COO": (lambda: torch.ones(64).to_sparse(), "sparse_coo tensor; weights must be dense"),
    "sparse CSR": (lambda: torch.ones(1, 64).to_sparse_csr(), "sparse_csr tensor; weights must be dense"),
    "quantized": (_quantized, "quantized tensor (torch.qint8)"),
    "int64": (lambda: torch.ones(64, dtype=torch.int64), "dtype int64"),
    "bool": (lambda: torch.ones(64, dtype=torch.bool), "dtype bool"),
    "complex": (lambda: torch.ones(64, dtype=torch.complex64), "dtype complex64"),
    "meta device": (lambda: torch.empty(64, device="meta"), "device 'meta'"),
    "nested dict": (lambda: {"weight": torch.ones(64)}, "is a dict, not a tensor"),
    "a number": (lambda: 1.0, "is a float, not a tensor"),
}
NOT_WEIGHTS_SAFETENSORS = {
    "int32": (lambda: torch.ones(64, dtype=torch.int32), "dtype int32"),
    "bool": (lambda: torch.ones(64, dtype=torch.bool), "dtype bool"),
    "uint8": (lambda: torch.ones(64, dtype=torch.uint8), "dtype uint8"),
    "float8": (lambda: torch.ones(64).to(torch.float8_e4m3fn), "dtype float8_e4m3fn"),
}
NOT_WEIGHTS = {f"{k} (.pt)": (".pt", *v) for k, v in NOT_WEIGHTS_PT.items()} | {
    f"{k} (.safetensors)": (".safetensors", *v) for k, v in NOT_WEIGHTS_SAFETENSORS.items()
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about sparse and quantized tensors
@pytest.mark.parametrize("name", sorted(NOT_WEIGHTS))
def test_tensors_that_cannot_be_weights_name_the_file_and_the_key(tmp_path, tower_sd, name):
    suffix, make, expected = NOT_WEIGHTS[name]
    for layout in ("visual-only", "full CLIP"):
        sd = tower_sd | {"ln_pre.weight": make()}
        path = save(sd if layout == "visual-only" else full_clip(sd), tmp_path / f"{layout}{suffix}")
        key = "ln_pre.weight" if layout == "visual-only" else "visual.ln_pre.weight"
        refused(path, f"{key} ", expected)


def _extra_block(sd: dict) -> dict:
    """A 5-block tower's weights for the 4-block model: same width, one block more."""
    return sd | {
        k.replace(".3.", ".4."): v.clone() for k, v in sd.items() if k.startswith("transformer.resblocks.3.")
    }


MISFITS = {
    "one block more": (_extra_block, ["12 unexpected", "transformer.resblocks.4."]),
    "one block less": (
        lambda sd: {k: v for k, v in sd.items() if not k.startswith("transformer.resblocks.3.")},
        ["missing", "transformer.resblocks.3.ln_1.weight"],
    ),
    "a stray tensor": (lambda sd: sd | {"head.weight": torch.zeros(2, 64)}, ["1 unexpected ['head.weight']"]),
    "another naming": (
        lambda sd: {k.replace("transformer.resblocks.", "blocks."): v for k, v in sd.items()},
        ["missing", "transformer.resblocks.0.ln_1.weight", "unexpected", "blocks.0.ln_1.weight"],
    ),
    "a wrong shape and a stray tensor": (
        lambda sd: sd | {"ln_pre.bias": torch.zeros(32), "extra": torch.zeros(1)},
        ["ln_pre.bias (32,) (model: (64,))", "1 unexpected ['extra']"],
    ),
}


@pytest.mark.parametrize("name", sorted(MISFITS))
def test_weights_of_another_architecture_name_the_missing_and_unexpected_keys(tmp_path, tower_sd, name):
    edit, fragments = MISFITS[name]
    refused(save(edit(dict(tower_sd)), tmp_path / "other.safetensors"), "do not fit i2p-tiny-vit", *fragments)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return training_folder(tmp_path_factory, n_per_class=6)


def _no_traceback(res, *fragments: str) -> None:
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output + repr(res.exception)
    assert "Traceback" not in res.output and all(f in res.output for f in fragments), res.output


@pytest.mark.parametrize("poison", ["nan", "sparse"])
def test_i2p_train_refuses_bad_pretrained_weights_before_stage_1(tmp_path, tower_sd, data_dir, poison):
    sd = dict(tower_sd)
    sd[KEY] = torch.full_like(sd[KEY], math.nan) if poison == "nan" else sd[KEY].to_sparse()
    weights = save(full_clip(sd), tmp_path / "weights.pt")
    args = ["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--model", TINY]
    res = CliRunner().invoke(main, [*args, "--pretrained", str(weights), "--workers", "0"])
    _no_traceback(res, str(weights), f"visual.{KEY}")
    assert not (tmp_path / "run").exists()


# ---- --resume: the stored optimizer state must fit the parameters it is restored onto -----------------

RESUME_ARGS = [*TINY_ARGS, "--layer", "2", "--rank", "2", "--max-steps-per-epoch", "2", "--no-augment"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    """A real one-epoch run's checkpoint, marked unfinished, so that ``--epochs 2 --resume`` continues it."""
    out = tmp_path_factory.mktemp("trained")
    args = ["train", "--data", str(data_dir), "--out", str(out), "--epochs", "1", *RESUME_ARGS]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    ckpt = out / "checkpoint.safetensors"
    assert read_checkpoint(ckpt).section("resume.optim."), "the run stored no optimizer state"
    return rewrite(ckpt, out / "unfinished.safetensors", meta=lambda m: m | {"complete": False})


def foreign_state(
    rank: int = 2, adapter: str = "subspace"
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The optimizer state (tensors, step counts) of one real AdamW step on another tiny model."""
    model = tiny_model(layer=2, rank=rank)
    if adapter == "full":
        model.tune_blocks()
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    scheduler.step()
    tensors, info = resume_state(optimizer, scheduler, 0)
    return {f"resume.{k}": v for k, v in tensors.items()}, info.optimizer_steps


def _grafted(rank: int = 2, adapter: str = "subspace"):
    tensors, steps = foreign_state(rank, adapter)
    return (
        lambda m: m | {"optimizer_steps": steps},
        lambda t: {k: v for k, v in t.items() if not k.startswith("resume.optim.")} | tensors,
    )


def _set_tensor(name: str, edit):
    def apply(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = f"resume.optim.{name}"
        return t | {key: edit(t[key].clone())}

    return None, apply


def _poison(value: float):
    def edit(x: torch.Tensor) -> torch.Tensor:
        x.view(-1)[0] = value
        return x

    return edit


def _steps(edit):
    return lambda m: m | {"optimizer_steps": edit(dict(m["optimizer_steps"]))}, None


BAD_RESUME = {
    "state of another rank": (*_grafted(rank=3), "has shape (3, 3), parameter 0 (2, 2)"),
    "state of another adapter": (
        *_grafted(rank=0, adapter="full"),
        "belong to no parameter of the 12 being trained",
    ),
    "state of a smaller model": (
        None,
        lambda t: {k: v for k, v in t.items() if not k.startswith("resume.optim.1.")},
        "parameter 1 has no stored exp_avg, exp_avg_sq",
    ),
    "a moment of the wrong shape": (
        *_set_tensor("0.exp_avg", lambda x: torch.zeros(4, 4)),
        "has shape (4, 4)",
    ),
    "a transposed moment": (
        *_set_tensor("2.exp_avg_sq", lambda x: x.reshape(-1, 1)),
        "optim.2.exp_avg_sq has",
    ),
    "NaN in a first moment": (*_set_tensor("0.exp_avg", _poison(math.nan)), "exp_avg has 1 of 4 values NaN"),
    "inf in a second moment": (*_set_tensor("3.exp_avg_sq", _poison(math.inf)), "values +inf"),
    "a negative second moment": (*_set_tensor("1.exp_avg_sq", _poison(-1.0)), "negative values"),
    "an integer moment": (*_set_tensor("0.exp_avg", lambda x: x.to(torch.int32)), "dtype int32"),
    "a missing moment": (
        None,
        lambda t: {k: v for k, v in t.items() if k != "resume.optim.4.exp_avg_sq"},
        "parameter 4 has no stored exp_avg_sq",
    ),
    "a missing step count": (
        *_steps(lambda s: {k: v for k, v in s.items() if k != "2"}),
        "parameter 2 has no stored step",
    ),
    "a NaN step count": (*_steps(lambda s: s | {"0": math.nan}), "step count nan"),
    "an infinite step count": (*_steps(lambda s: s | {"0": math.inf}), "step count inf"),
    "a negative step count": (*_steps(lambda s: s | {"0": -2.0}), "step count -2.0"),
    "a fractional step count": (*_steps(lambda s: s | {"0": 1.5}), "step count 1.5"),
    "a foreign key": (
        None,
        lambda t: t | {"resume.optim.x.exp_avg": torch.zeros(1)},
        "1 stored entries belong to no parameter of the 12 being trained (resume.optim.x.exp_avg)",
    ),
    "a schedule for two groups": (
        lambda m: m | {"scheduler": m["scheduler"] | {"base_lrs": [1e-3, 1e-3]}},
        None,
        "scheduler.base_lrs must be a list of 1",
    ),
    "a schedule without position": (
        lambda m: m | {"scheduler": {k: v for k, v in m["scheduler"].items() if k != "last_epoch"}},
        None,
        "scheduler.last_epoch is missing",
    ),
    "a schedule at step NaN": (
        lambda m: m | {"scheduler": m["scheduler"] | {"last_epoch": math.nan}},
        None,
        "scheduler.last_epoch is nan, not a finite int",
    ),
}


def _resume(data_dir: Path, out: Path):
    args = ["train", "--data", str(data_dir), "--out", str(out), "--resume", "--epochs", "2", *RESUME_ARGS]
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("name", sorted(BAD_RESUME))
def test_resume_refuses_optimizer_state_that_does_not_fit(trained, data_dir, tmp_path, name):
    meta, tensors, expected = BAD_RESUME[name]
    out = tmp_path / "run"
    out.mkdir()
    ckpt = rewrite(trained, out / "checkpoint.safetensors", meta, tensors)
    before = ckpt.read_bytes()
    res = _resume(data_dir, out)
    _no_traceback(res, str(ckpt), f"the run in {out} cannot be resumed", expected)
    assert ckpt.read_bytes() == before  # nothing trained, nothing written


def test_an_untouched_unfinished_run_resumes(trained, data_dir, tmp_path):
    """The checks refuse nothing real: the copy the variants start from resumes and finishes."""
    out = tmp_path / "run"
    out.mkdir()
    rewrite(trained, out / "checkpoint.safetensors")
    res = _resume(data_dir, out)
    assert res.exit_code == 0, res.output + repr(res.exception)
    meta = read_checkpoint(out / "checkpoint.safetensors").meta
    assert meta.complete and meta.resume.epoch == 1, res.output
