"""The OOD density (i2p.train.density): Ledoit-Wolf, the whitened score, and its place in the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.covariance import LedoitWolf

from i2p.runtime.schema import OodSpec, SchemaError
from i2p.train import density
from i2p.train.checkpoint import load_model, read_checkpoint, save_checkpoint
from i2p.train.metadata import CheckpointError
from i2p.train.train_cli import train as train_cmd
from tests.support.checkpoints import make_checkpoint
from tests.support.training import TINY


def _features(n: int = 300, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    mixing = rng.normal(size=(d, d))
    x = rng.normal(size=(n, d)) @ mixing + 3.0 * labels[:, None]
    return torch.from_numpy(x).float(), torch.from_numpy(labels)


@pytest.mark.parametrize("n, d", [(300, 12), (20, 40), (500, 3)])
def test_ledoit_wolf_matches_sklearn(n, d):
    x = np.random.default_rng(n).normal(size=(n, d)) * np.linspace(0.1, 5, d)
    x -= x.mean(0)
    cov, a = density.ledoit_wolf(x)
    ref = LedoitWolf(assume_centered=True).fit(x)
    assert a == pytest.approx(ref.shrinkage_, rel=1e-6)
    np.testing.assert_allclose(cov, ref.covariance_, rtol=1e-6, atol=1e-9)


def test_score_is_the_min_class_mahalanobis_distance_per_dimension():
    x, y = _features()
    fitted = density.fit(x, y)
    xd, yd = x.double().numpy(), y.numpy()
    means = np.stack([xd[yd == c].mean(0) for c in (0, 1)])
    centred = xd - means[yd]
    cov, _ = density.ledoit_wolf(centred)
    prec = np.linalg.inv(cov)
    probe = torch.randn(50, x.shape[1]) * 4
    p = probe.double().numpy()
    want = np.min([np.einsum("nd,de,ne->n", p - m, prec, p - m) for m in means], axis=0) / x.shape[1]
    np.testing.assert_allclose(fitted.score(probe).numpy(), want, rtol=1e-4)
    # far from the data scores far higher than the training data itself
    assert fitted.score(x).mean() < 2 < fitted.score(x + 100).min()


def test_calibrate_takes_the_validation_quantile():
    x, y = _features()
    fitted = density.fit(x, y)
    val, _ = _features(seed=1)
    spec = density.calibrate(fitted, val)
    scores = fitted.score(val).numpy()
    assert spec.threshold == pytest.approx(float(np.quantile(scores, 0.95)))
    assert (scores > spec.threshold).mean() == pytest.approx(0.05, abs=0.01)
    assert spec.n_val == len(val) and spec.n_fit == len(x) and 0 <= spec.shrinkage <= 1


@pytest.mark.parametrize(
    "bad",
    [
        {"threshold": -1.0},
        {"threshold": float("nan")},
        {"threshold": True},
        {"threshold": 1.0, "quantile": 0},
        {"threshold": 1.0, "feature": "raw"},
        {"threshold": 1.0, "extra": 1},
        {"quantile": 0.9},
    ],
)
def test_ood_spec_refuses_bad_fields(bad):
    with pytest.raises(SchemaError, match="ood"):
        OodSpec.from_dict(bad)


def test_checkpoint_round_trip_and_old_checkpoints(tmp_path):
    old = make_checkpoint(tmp_path / "old")
    assert read_checkpoint(old).meta.ood is None and density.stored(read_checkpoint(old)) is None
    path = make_checkpoint(tmp_path / "new", ood=True)
    ckpt = read_checkpoint(path)
    stored = density.stored(ckpt)
    assert ckpt.meta.ood is not None and ckpt.meta.ood.threshold > 0
    assert stored.whiten.shape == (64, 64) and stored.centers.shape == (2, 64)
    load_model(path)  # the model loads beside the density's tensors


def test_malformed_density_is_a_checkpoint_error(tmp_path):
    path = make_checkpoint(tmp_path / "new", ood=True)
    ckpt = read_checkpoint(path)
    model, _ = load_model(path)
    cases = {
        "no metadata": (ckpt.meta.__class__(**{**ckpt.meta.__dict__, "ood": None}), density.PREFIX),
        "wrong shape": (ckpt.meta, "short"),
    }
    for name, (meta, how) in cases.items():
        tensors = {k: v for k, v in ckpt.section(density.PREFIX).items()}
        tensors = {f"{density.PREFIX}{k}": v for k, v in tensors.items()}
        if how == "short":
            tensors[f"{density.PREFIX}whiten"] = tensors[f"{density.PREFIX}whiten"][:10]
        bad = tmp_path / f"{name}.safetensors"
        if meta.ood is None:
            with pytest.raises(ValueError, match="go together"):
                save_checkpoint(bad, model, meta, base=ckpt.section("base."), ood=tensors)
            continue
        save_checkpoint(bad, model, meta, base=ckpt.section("base."), ood=tensors)
        with pytest.raises(CheckpointError, match="OOD density is malformed"):
            density.stored(read_checkpoint(bad))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--rank", "0", "--layer", "2"], ["--rank", "2", "--layer", "2"]])
def test_training_fits_and_stores_the_density(tmp_path, data_dir, extra):
    """Head-only (cached features) and full runs both end with a density whose threshold is the val 95%."""
    out = tmp_path / "run"
    args = ["--data", str(data_dir), "--out", str(out), "--epochs", "1", *extra, *TINY]
    res = CliRunner().invoke(train_cmd, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "OOD density:" in res.output
    ckpt = read_checkpoint(out / "checkpoint.safetensors")
    stored = density.stored(ckpt)
    assert stored is not None and ckpt.meta.ood.quantile == 0.95 and ckpt.meta.ood.n_val > 0
