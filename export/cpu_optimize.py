"""``model.cpu.onnx``: the FP32 model rewritten for ONNX Runtime's fused CPU kernels.

ONNX Runtime has fused transformer kernels (``com.microsoft`` contrib ops) that neither its session
optimizer nor ``onnxruntime.transformers`` reaches on open_clip's graph: its attention exports as ~80
small nodes, and open_clip's LayerNorm -> Cast pairs hide the SkipLayerNormalization pattern.
``optimize_for_cpu``

1. fuses every block's attention into one node, the last block for the CLS token only
   (``attention_fusion``);
2. runs ONNX Runtime's basic (hardware-independent) graph cleanup, then the Python fusions of
   ``onnxruntime.transformers.optimizer`` (SkipLayerNormalization with bias, QuickGelu, BiasGelu).

The result needs ONNX Runtime's contrib ops: it is an extra file for the CPU path, never a TensorRT
input. Export keeps it only if it passes the same parity check as ``model.onnx``; the runtime uses
``model.onnx`` where it is absent.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from i2p.runtime.model_files import CPU

from .attention_fusion import fuse_attention
from .parity import PASS, Comparison

CPU_ONNX = CPU.file
CPU_MODEL = CPU.entry  # its manifest entry: never a TensorRT input
REPORTED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "QuickGelu",
    "BiasGelu",
    "Gelu",
    "FastGelu",
)


@dataclass(frozen=True)
class FusionReport:
    """What the rewrite did: fused op counts in the output, and what was left as exported (and why)."""

    ops: dict[str, int]
    attention_blocks: int  # attention subgraphs replaced by a fused op
    cls_only_last_block: bool
    skipped: tuple[str, ...] = ()  # "what: why" for each rewrite that did not apply

    def describe(self) -> str:
        fused = ", ".join(f"{name} {count}" for name, count in self.ops.items() if count)
        text = f"fused ops: {fused or 'none'}"
        text += "; last block computed for the CLS token only" if self.cls_only_last_block else ""
        if self.skipped:
            text += f"; not applied: {'; '.join(self.skipped[:2])}" + (
                " ..." if len(self.skipped) > 2 else ""
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "attention_blocks": self.attention_blocks,
            "cls_only_last_block": self.cls_only_last_block,
            "skipped": list(self.skipped),
        }


def optimize_for_cpu(src: Path, dst: Path, num_heads: int) -> FusionReport:
    """Write the CPU-fused copy of ``src`` (an FP32 ``model.onnx``) to ``dst``; say what fired.

    Each stage goes through a file and frees its graph before the next loads one: a ViT-L/14 graph is
    0.6 GB at L*=12, and holding several copies at once made this step the peak of the whole export.
    """
    with tempfile.TemporaryDirectory(prefix="i2p-cpu-") as tmp:
        fused, basic = Path(tmp) / "attention.onnx", Path(tmp) / "basic.onnx"
        blocks, cls_only, skipped = _fuse_file(src, fused, num_heads)
        _ort_basic_optimization(fused, basic)
        fused.unlink()
        optimized = _transformer_fusions(basic, num_heads)
    optimized.save_model_to_file(str(dst))
    counts = Counter(n.op_type for n in optimized.model.graph.node)
    return FusionReport({op: counts.get(op, 0) for op in REPORTED_OPS}, blocks, cls_only, tuple(skipped))


def _fuse_file(src: Path, dst: Path, num_heads: int) -> tuple[int, bool, list[str]]:
    model = onnx.load(str(src))
    result = fuse_attention(model, num_heads)
    onnx.save(model, str(dst))
    return result


def _ort_basic_optimization(src: Path, dst: Path) -> None:
    """ONNX Runtime's hardware-independent cleanup (constant folding, Cast/Identity removal), saved to ``dst``.

    It exposes the patterns the Python fusions look for. Weight prepacking is off: the session only
    writes the file, and prepacked copies of every weight would double its memory.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def _transformer_fusions(path: Path, num_heads: int) -> Any:  # onnxruntime.transformers OnnxModel
    """The Python fusions of ``onnxruntime.transformers`` (SkipLayerNormalization, QuickGelu, BiasGelu...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns about its own deprecated helpers on import
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("clip")
    options.enable_attention = False  # fuse_attention's job: the CLIP pattern (Hugging Face's) never matches
    # Symbolic shape inference keeps extra copies of the graph (3x the memory) and changes no fusion here;
    # parity checks what the fusions did.
    options.enable_shape_inference = False
    logging.disable(logging.WARNING)  # its modules log every fusion attempt, under top-level logger names
    try:
        return optimizer.optimize_model(
            str(path), model_type="clip", num_heads=num_heads, optimization_options=options, opt_level=0
        )
    finally:
        logging.disable(logging.NOTSET)


def add_cpu_model(
    fp32: Path, num_heads: int, check: Callable[[Path], list[Comparison]]
) -> tuple[list[Comparison], str]:
    """Write ``model.cpu.onnx`` beside ``fp32`` and keep it only if ``check`` (parity) passes.

    The file is an optional speed-up, so a rewrite that fails or does not match PyTorch removes it and
    says why instead of failing the export. Returns the comparisons to record (none when it was
    dropped) and a note for the export summary.
    """
    dst = fp32.with_name(CPU_ONNX)
    try:
        report = optimize_for_cpu(fp32, dst, num_heads)
        comparisons = check(dst)
    except Exception as e:  # onnx, onnxruntime and its optimizer raise many types; all mean "not this time"
        dst.unlink(missing_ok=True)
        return [], f"{CPU_ONNX}: not written ({type(e).__name__}: {e})"
    failed = [c for c in comparisons if c.status != PASS]
    if failed:
        dst.unlink()
        return [], f"{CPU_ONNX}: dropped, parity against PyTorch failed:\n{failed[0].report()}"
    return comparisons, f"{CPU_ONNX}: {report.describe()}"
