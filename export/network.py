"""The deployed network: the trained detector with its deltas merged, truncated at L*, head folded in.

``DeployedDetector`` is the model that gets exported: the backbone library's own blocks (no adapter ops,
no low-rank branches), float32 NCHW image in, ``(logit [N], probability [N])`` out. Like timm's
``exportable`` layers it reuses the training modules as they are rather than forking the ViT code; it
only drops what deployment does not need and fixes the output signature.
"""

from __future__ import annotations

import torch
from torch import nn

from i2p.train import backbones, subspace
from i2p.train.model import I2PModel


class ExportError(RuntimeError):
    """The export cannot produce a correct artifact; the message says which step and why."""


class DeployedDetector(nn.Module):
    """float32 [N, 3, S, S] -> (logit [N], probability [N]): embeddings, L* blocks, LayerNorm + Linear.

    With an ``ood`` head (``ood_head.OodHead``) a third output, ood [N], reads the same LayerNorm output.
    """

    def __init__(
        self, tower: nn.Module, head: nn.Sequential, layer: int, num_layers: int, ood: nn.Module | None = None
    ):
        super().__init__()
        self.tower, self.head, self.ood = tower, head, ood
        self.layer, self.num_layers = layer, num_layers
        self.family = backbones.for_tower(tower)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.blocks(self.tower)

    @property
    def image_size(self) -> int:
        return self.family.image_size(self.tower)

    @property
    def pool(self) -> str:
        return self.family.pool(self.tower)

    @property
    def maps_per_block(self) -> int:
        """Weight-bearing linear maps of one block: what the exported graph must hold per block."""
        return len(subspace.linear_maps(self.blocks[0]))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feature = self.tower(
            image
        )  # the truncated tower ends in the layer feature (I2PModel.forward_features)
        norm, fc = self.head
        normed = norm(feature)
        z = fc(normed)  # [N, 1]
        # The probability is computed from z, not from the logit output: a graph output that another node
        # also reads is a case FP16 converters get wrong (onnxconverter-common keep_io_types).
        outputs = (z.squeeze(-1), torch.sigmoid(z).squeeze(-1))
        return outputs if self.ood is None else (*outputs, self.ood(normed))


def deploy(model: I2PModel, ood: nn.Module | None = None) -> DeployedDetector:
    """Merge ``model``'s deltas into its base weights (in place) and wrap it for export, in eval mode.

    ``model`` is consumed: after this call its blocks hold the merged weights. Compute any output of
    the unmerged model first (see ``check_merge``).
    """
    model.merge()
    net = DeployedDetector(model.tower, model.head.folded(), model.layer, model.num_layers, ood)
    return net.eval().requires_grad_(False)


def largest_weight(net: nn.Module) -> tuple[str, float]:
    """(name, value) of the largest |w| over every parameter and buffer: what FP16 must represent."""
    name, value = "", 0.0
    for n, t in [*net.named_parameters(), *net.named_buffers()]:
        if t.is_floating_point() and t.numel():
            m = float(t.detach().abs().max())
            if m > value:
                name, value = n, m
    return name, value


@torch.no_grad()
def check_merge(net: DeployedDetector, images: torch.Tensor, reference: torch.Tensor, atol: float) -> float:
    """Max |logit(merged) - logit(unmerged)| on ``images``; ExportError above ``atol``."""
    logits = net(images)[0]
    err = float((logits - reference).abs().max())
    if not err <= atol:
        raise ExportError(
            f"merging the subspace deltas changed the logits by up to {err:.3g} (tolerance {atol:g}); "
            "the checkpoint's deltas do not fold into the base weights exactly"
        )
    return err
