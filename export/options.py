"""What ``i2p-export`` is asked to do: one dataclass, also the defaults its command-line options show."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from i2p.runtime.model_files import TARGETS

from .parity import DEFAULT_ATOL

ENGINE_CHOICES = ("auto", "yes", "no")
# Ops kept in float32 by default, chosen by measured parity: CLIP ViT-B/16 (real weights) at L*=8 with a
# head fit on sid-mini/train, 64 sid-mini/test images, ONNX Runtime CPU, max (mean) |Δlogit| vs PyTorch
# FP32 with logits of std 4.8: nothing kept 0.0152 (0.0059); LayerNormalization 0.0081 (0.0028);
# LayerNormalization + Softmax 0.0070 (0.0028). LayerNorm halves the error, Softmax adds little.
DEFAULT_KEEP_FP32: tuple[str, ...] = ("LayerNormalization",)


@dataclass(frozen=True)
class ExportOptions:
    ckpt: Path
    out: Path | None = None  # default: the checkpoint's path with suffix .i2p
    fp16: bool = False
    cpu: bool = True  # model.cpu.onnx: ONNX Runtime's fused CPU kernels (see cpu_optimize); --no-cpu skips it
    int8: bool = True  # model.int8.onnx, kept if its decisions on --calib-images pass (see quantize)
    backbone: Path | None = None  # where the base weights moved to (checked by sha256)
    opset: int = 17
    max_batch: int = 32
    engine: str = "auto"  # one of ENGINE_CHOICES
    calib_images: Path | None = None
    calib_limit: int = 256
    random_samples: int = 16
    triton: Path | None = None
    triton_backend: str = "auto"  # auto | tensorrt | onnxruntime | python (see triton.py)
    atol: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_ATOL))
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32
    force: bool = False
    seed: int = 0
    targets: tuple[str, ...] = TARGETS  # where the artifact runs: only the files these load are shipped

    @property
    def target(self) -> Path:
        return self.out if self.out is not None else self.ckpt.with_suffix(".i2p")


DEFAULTS = ExportOptions(ckpt=Path("checkpoint.safetensors"))
