"""Training configuration: one dataclass, stored verbatim in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .augment import AugmentConfig, parse_align

ADAPTERS = ("subspace", "lora", "full")  # --adapter: what trains in blocks 1..L* (train/adapters.py)


@dataclass(frozen=True)
class TrainConfig:
    data: str  # image folder (UniversalFakeDetect, flat or real/fake layout) or CSV manifest
    out: str = "runs/i2p"  # run directory: checkpoint, metrics, importance profile
    val: str | None = None  # validation folder/CSV; else a stratified split of `data`
    val_fraction: float = 0.2
    model: str = "ViT-L-14"  # open_clip model name
    pretrained: str = "none"  # weights file, open_clip tag (downloads), or "none" (random init)
    layer: str = "auto"  # "auto" | "last" | block number 1..N
    layer_tolerance: float | None = None  # L* = shallowest layer within this of the best; None: the rule's
    calib_size: int = 512  # images per split used to score layers
    rank: int = 16  # directions per linear map; 0 = head only (critical-layer linear probe)
    sensitivity: str = "singular"  # "singular" | "fisher": how directions are ranked
    baseline: bool = False  # UnivFD recipe: frozen full tower, final embedding, linear head
    epochs: int = 5
    batch_size: int = 32  # global batch, split across DDP processes
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    seed: int = 0
    workers: int = 2
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    embed_base: bool = False  # copy the frozen base into the checkpoint
    max_steps_per_epoch: int = 0  # 0 = whole epoch; a cap for demos and tests
    feature_views: int = 1  # head-only runs: epoch e trains on cached augmented view e mod this (features.py)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    adapter: str = "subspace"  # "subspace" (I2P) | "lora" (same maps and rank) | "full" (blocks 1..L*)
    target_fpr: float | None = None  # threshold: None = balanced accuracy, else max TPR at this val FPR
    layer_rule: str = "robust"  # "robust" | "clean": which validation copies stage 1 scores layers on
    layer_degrade: tuple[str, ...] = ("jpeg:75", "resize:0.5", "blur:1")  # the degraded copies (robust)
    align: str | None = (
        None  # --align: one encoding pipeline for both classes, e.g. "jpeg:60-100,resize:0.5-1"
    )

    def __post_init__(self) -> None:
        if self.layer not in ("auto", "last") and not str(self.layer).isdigit():
            raise ValueError(f"--layer must be auto, last or a block number, got {self.layer!r}")
        if self.sensitivity not in ("singular", "fisher"):
            raise ValueError(f"--sensitivity must be singular or fisher, got {self.sensitivity!r}")
        if self.rank < 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("rank must be >= 0, epochs and batch size >= 1")
        if self.feature_views < 1:
            raise ValueError(f"--feature-views must be >= 1, got {self.feature_views}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"--adapter must be subspace, lora or full, got {self.adapter!r}")
        if self.target_fpr is not None and not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"--target-fpr must be in [0, 1), got {self.target_fpr}")
        if self.layer_rule not in ("robust", "clean"):
            raise ValueError(f"--layer-rule must be robust or clean, got {self.layer_rule!r}")
        object.__setattr__(self, "layer_degrade", tuple(self.layer_degrade))  # a JSON list when read back
        align = parse_align(self.align)  # ValueError naming the spec
        object.__setattr__(self, "align", align.text if align else None)  # one spelling per pipeline
        if self.baseline and self.rank:
            object.__setattr__(self, "rank", 0)  # the UnivFD baseline trains the linear head only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        aug = AugmentConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("augment", {}).items()}
        )
        return cls(**{**{k: v for k, v in d.items() if k in known}, "augment": aug})

    # Settings that change the model or the data; a resumed run must match them.
    IDENTITY = (
        "data",
        "val",
        "val_fraction",
        "model",
        "pretrained",
        "layer",
        "rank",
        "sensitivity",
        "baseline",
        "adapter",
        "seed",
        "align",
    )
