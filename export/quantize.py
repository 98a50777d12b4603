"""``model.int8.onnx``: the CPU model with INT8 weight matrices, kept only where the detector's decisions survive.

ONNX Runtime's dynamic quantization stores each weight MatMul (and each fused ``Attention`` op's packed
QKV weight) as INT8 and quantizes that op's input on the fly per call (``DynamicQuantizeLinear`` +
``MatMulInteger`` / ``QAttention``): the matrix multiplications that are nearly all of a ViT's CPU time
run on integer kernels, with no calibration statistics baked into the file. Everything else stays
FP32: LayerNorm, softmax, GELU, the residual adds, activation x activation MatMuls (attention scores)
and the head's last projection (one logit, negligible compute, and the value the threshold reads).

Naive all-layer INT8 can wreck a ViT (FQ-ViT reports ViT-B at 23.6% with MinMax static quantization), so
the file is a candidate, not a given: ``add_int8_model`` keeps it only if on the real images of
``--calib-images`` its decisions agree with the FP32 PyTorch model's on >= 99% of them and no image
flips farther from the threshold than the parity tolerance allows. When all blocks quantized fail,
each block's sensitivity is measured (that block alone in INT8) and the most sensitive blocks are
kept in FP32 one by one until the check passes or half the blocks are FP32; otherwise the file is
dropped. Either way the comparisons go into ``parity.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from i2p.runtime.backends.onnxruntime import CPU_FUSED_FORMAT
from i2p.runtime.manifest import ModelFile

from .parity import FAIL, PASS, Comparison

INT8_ONNX = "model.int8.onnx"
INT8_MODEL = ModelFile(INT8_ONNX, "int8", CPU_FUSED_FORMAT)  # integer contrib kernels: a CPU-only file
MIN_AGREEMENT = 0.99  # decision agreement with the FP32 PyTorch model on the calibration images
QUANTIZED_OPS = ("MatMul", "Attention")
MAX_FP32_BLOCKS = 0.5  # fraction of blocks the sensitivity fallback may keep in FP32
_BLOCK = re.compile(r"resblocks\.(\d+)/")

Check = Callable[[Path], Comparison]  # parity of a candidate file on the calibration images


@dataclass(frozen=True)
class Int8Decision:
    """Whether model.int8.onnx was kept, the comparisons that decided it, and what stayed FP32."""

    kept: bool
    note: str  # one line for the export summary
    comparisons: tuple[Comparison, ...]  # the final candidate's (kept) or every attempt's (dropped)
    fp32_blocks: tuple[int, ...] = ()  # transformer blocks kept in FP32 by the sensitivity fallback


def quantizable_nodes(model: onnx.ModelProto) -> dict[str, int | None]:
    """Node name -> transformer block (None outside blocks) of every op dynamic INT8 quantizes here.

    Weight MatMuls and fused Attention ops, except projections to a single output (the head's logit).
    """
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    nodes: dict[str, int | None] = {}
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS or len(n.input) < 2 or n.input[1] not in weights:
            continue
        if weights[n.input[1]][-1] == 1:  # [E, 1]: the head
            continue
        m = _BLOCK.search(n.name)
        nodes[n.name] = int(m.group(1)) if m else None
    return nodes


def quantize_int8(src: Path, dst: Path, nodes: Sequence[str]) -> None:
    """Dynamic INT8 (symmetric per-tensor weights, per-call activation scales) of ``nodes`` only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # the quantizer logs every node it visits at INFO/WARNING
    try:
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=list(nodes),
            weight_type=QuantType.QInt8,
            # Shape inference cannot type the outputs of contrib ops (Attention, SkipLayerNormalization):
            # everything this graph computes between them is float32.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)


def gate(c: Comparison, min_agreement: float = MIN_AGREEMENT) -> Comparison:
    """The parity check plus the agreement floor: FAIL below ``min_agreement`` whatever the errors."""
    if c.status == PASS and c.agreement is not None and c.agreement < min_agreement:
        note = f"decision agreement {c.agreement:.4f} < {min_agreement:g}"
        return dataclasses.replace(c, status=FAIL, note="; ".join(filter(None, [c.note, note])))
    return c


def add_int8_model(src: Path, check: Check, min_agreement: float = MIN_AGREEMENT) -> Int8Decision:
    """Write ``model.int8.onnx`` beside ``src`` (the CPU FP32 model) and keep it only if it passes ``check``.

    A quantizer or runtime error drops the file with a note instead of failing the export: INT8 is an
    optional speed-up.
    """
    dst = src.with_name(INT8_ONNX)
    try:
        nodes = quantizable_nodes(onnx.load(str(src), load_external_data=False))
        return _search(src, dst, nodes, check, min_agreement)
    except Exception as e:  # onnx, the quantizer and onnxruntime raise many types; all mean "not this time"
        dst.unlink(missing_ok=True)
        return Int8Decision(False, f"{INT8_ONNX}: not written ({type(e).__name__}: {e})", ())


def _search(
    src: Path, dst: Path, nodes: dict[str, int | None], check: Check, min_agreement: float
) -> Int8Decision:
    if not nodes:
        return Int8Decision(False, f"{INT8_ONNX}: not written (no weight MatMul/Attention to quantize)", ())

    def attempt(fp32: set[int], write_to: Path = dst) -> Comparison:
        quantize_int8(src, write_to, [n for n, b in nodes.items() if b not in fp32])
        return gate(check(write_to), min_agreement)

    first = attempt(set())
    if first.status == PASS:
        return _kept(first, ())
    blocks = sorted({b for b in nodes.values() if b is not None})
    tried = [first]
    probe = dst.with_name(f".{INT8_ONNX}.probe")
    try:  # sensitivity: logit error with one block alone in INT8
        alone = {b: attempt(set(blocks) - {b}, probe) for b in blocks}
    finally:
        probe.unlink(missing_ok=True)
    order = sorted(blocks, key=lambda b: -_damage(alone[b]))
    fp32: list[int] = []
    for b in order[: max(1, int(len(blocks) * MAX_FP32_BLOCKS))]:
        fp32.append(b)
        tried.append(attempt(set(fp32)))
        if tried[-1].status == PASS:
            return _kept(tried[-1], tuple(sorted(fp32)))
    dst.unlink(missing_ok=True)
    last = tried[-1]
    return Int8Decision(
        False,
        f"{INT8_ONNX}: dropped, decisions differ from PyTorch FP32 even with blocks {sorted(fp32)} in FP32 "
        f"(agreement {last.agreement:.4f}, {last.decisive_flips} decisive flips, max |Δlogit| "
        f"{last.logit.max_abs:.3g}; limits >= {min_agreement:g}, 0, {last.tolerances.logit_atol:g})",
        tuple(tried),
        tuple(sorted(fp32)),
    )


def _damage(c: Comparison) -> float:
    """How much one INT8 block moves the outputs: decision flips first, then the mean logit error."""
    mean = c.logit.mean_abs if c.logit is not None else np.inf
    return c.flips * 1e6 + c.decisive_flips * 1e9 + mean


def _kept(c: Comparison, fp32_blocks: tuple[int, ...]) -> Int8Decision:
    kept = f", blocks {list(fp32_blocks)} kept in FP32 (most sensitive)" if fp32_blocks else ""
    return Int8Decision(
        True,
        f"{INT8_ONNX}: dynamic INT8 weight MatMuls/Attention{kept}; on {c.samples} calibration images "
        f"agreement {c.agreement:.4f} with PyTorch FP32, max |Δlogit| {c.logit.max_abs:.3g}",
        (c,),
        fp32_blocks,
    )
