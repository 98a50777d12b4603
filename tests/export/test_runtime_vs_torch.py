"""The deployed runtime scores images exactly as training's evaluation path does (same preprocessing code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from i2p.export.pipeline import ExportOptions, run_export
from i2p.runtime import Detector
from i2p.synthetic import make_image_folder
from i2p.train.checkpoint import load_model
from i2p.train.checkpoint_scoring import eval_loader, predict
from i2p.train.config import TrainConfig
from i2p.train.data import discover
from i2p.train.distributed import Placement


@pytest.mark.slow
def test_detector_matches_the_pytorch_detector_on_images(tmp_path, checkpoint_l3):
    ckpt = checkpoint_l3
    make_image_folder(tmp_path / "images", n_per_class=5, size=(97, 71), formats=("png", "jpg"))
    samples = discover(tmp_path / "images")
    model, meta = load_model(ckpt)
    loader = eval_loader(samples, meta.preprocess, TrainConfig(data="", batch_size=4, workers=0))
    torch_probs, idx = predict(model, loader, Placement(torch.device("cpu")))

    result = run_export(ExportOptions(ckpt=ckpt, out=tmp_path / "det.i2p"), echo=lambda _: None)
    det = Detector(result.artifact, backend="onnxruntime", precision="fp32")
    runtime_probs = np.array([p.probability for p in det.predict([samples[i].path for i in idx])])

    assert len(runtime_probs) == len(samples) == 20
    assert np.abs(runtime_probs - torch_probs).max() < 1e-4
    assert torch_probs.std() > 1e-3  # the images really get different scores
