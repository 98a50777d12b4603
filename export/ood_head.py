"""The OOD score as part of the exported graph: one MatMul, a Sub, a Mul + ReduceSum and a ReduceMin.

``OodHead`` reads the head's LayerNorm output (the tensor the logit's Linear reads too) and computes
``min_c ||x W^T - W mu_c||^2`` (``i2p.train.density``), so the deployed network returns ``ood`` [batch]
beside ``logit`` and ``probability`` for one [D, D] matrix product per image, not a second pass. Its nodes
live under the ``/ood/`` scope: the FP16 conversion keeps them in FP32 (a squared distance summed over
768 dimensions is what FP16 loses first), and INT8 quantization leaves its MatMul alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from i2p.runtime.schema import OOD_OUTPUT
from i2p.train.density import Density, head_features
from i2p.train.model import I2PModel

SCOPE = "ood"  # the DeployedDetector attribute: ONNX node names start with "/ood/"
# Limits on |Δood| / max(1, |ood|) against PyTorch FP32, per precision. Measured on the tiny random ViT
# (tests/export/test_ood_export.py): FP32 6.6e-7, FP16 (ood arithmetic kept FP32, the ViT in FP16) 1e-3,
# INT8 (ViT weights INT8, ood head FP32) 0.019: on record, not gated (the INT8 file has its decision gate).
OOD_RTOL = {"fp32": 1e-4, "fp16": 2e-2, "int8": None}


class OodHead(nn.Module):
    """Head-normalized features [N, D] -> ood [N]: the same arithmetic as ``Density.score``."""

    def __init__(self, density: Density):
        super().__init__()
        self.register_buffer("whiten_t", density.whiten.T.contiguous().float())
        self.register_buffer("centers", density.centers.float())

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        d = (normed @ self.whiten_t).unsqueeze(1) - self.centers
        return torch.amin((d * d).sum(-1), dim=-1)


def ood_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the graph's OOD-head nodes (their scope is ``/ood/``)."""
    return [n.name for n in model.graph.node if n.name.startswith(f"/{SCOPE}/")]


def has_ood(model: onnx.ModelProto) -> bool:
    return any(o.name == OOD_OUTPUT for o in model.graph.output)


@torch.no_grad()
def ood_reference(model: I2PModel, density: Density, images: np.ndarray, batch: int) -> np.ndarray:
    """The unmerged PyTorch model's ood on ``images``: what every exported file is compared with."""
    parts = []
    for i in range(0, len(images), batch):
        features = model.forward_features(torch.from_numpy(images[i : i + batch]))
        parts.append(density.score(head_features(model, features)))
    return torch.cat(parts).numpy()
