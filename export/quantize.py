"""``model.int8.onnx``: the CPU model with INT8 weight matrices, kept where the detector's decisions survive.

ONNX Runtime's dynamic quantization stores each weight MatMul (and each fused ``Attention`` op's packed
QKV weight) as INT8, one scale per output column, and quantizes that op's input on the fly per call
(``DynamicQuantizeLinear`` + ``MatMulInteger`` / ``QAttention``): the matrix multiplications that are
nearly all of a ViT's CPU time run on integer kernels. Everything else stays FP32: LayerNorm, softmax,
GELU, the residual adds, activation x activation MatMuls (attention scores) and the head's last
projection (one logit, negligible compute, and the value the threshold reads).

CLIP's activations have outlier channels that one per-call scale cannot cover, so the FP32 graph is
first smoothed (``smooth.py``, SmoothQuant): per-channel factors from the calibration images move the
activations' range into the weights, exactly in FP32. On the real ViT-B/16 detector (144 images) this
took all-block INT8 from agreement 0.965 with 5 decisive flips to 1.0 with none.

Naive all-layer INT8 can wreck a ViT (FQ-ViT reports ViT-B at 23.6% with MinMax static quantization), so
the file is a candidate, not a given: ``add_int8_model`` keeps it only if it passes ``gate`` on the real
images of ``--calib-images``: decisions agree with the FP32 PyTorch model's on >= 99% of them, no image
flips farther from the threshold than the parity tolerance, and the mean logit error is small next to
the spread of the detector's logits (a broken model fails this even where few decisions flip). The
largest single logit error is reported but not gated: INT8 noise of ~1 logit on a score whose spread is
~6 kept the test AUC (docs/export.md). When all blocks quantized fail,
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

from i2p.runtime.model_files import INT8

from .ood_head import ood_nodes
from .parity import FAIL, NOT_RUN, PASS, Comparison
from .smooth import DEFAULT_ALPHA, smooth_file

INT8_ONNX = INT8.file
INT8_MODEL = INT8.entry  # integer contrib kernels: a CPU-only file
MIN_AGREEMENT = 0.99  # decision agreement with the FP32 PyTorch model on the calibration images
QUANTIZED_OPS = ("MatMul", "Attention")
# Sanity bound of the gate: mean |Δlogit| at most this fraction of the reference logits' standard
# deviation (or the INT8 logit tolerance, whichever is larger). Measured: 0.056 on the real ViT-B/16.
MAX_MEAN_ERROR = 0.1
MAX_FP32_BLOCKS = 0.5  # fraction of blocks the sensitivity fallback may keep in FP32
_BLOCK = re.compile(r"blocks\.(\d+)/")  # open_clip's resblocks.N/, timm's blocks.N/

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

    Weight MatMuls and fused Attention ops, except projections to a single output (the head's logit) and
    the OOD head's whitening (its score is a sum of squares that INT8 error would inflate).
    """
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    ood = set(ood_nodes(model))
    nodes: dict[str, int | None] = {}
    for n in model.graph.node:
        if n.op_type not in QUANTIZED_OPS or len(n.input) < 2 or n.input[1] not in weights:
            continue
        if weights[n.input[1]][-1] == 1 or n.name in ood:  # [E, 1]: the head; the OOD head stays FP32
            continue
        m = _BLOCK.search(n.name)
        nodes[n.name] = int(m.group(1)) if m else None
    return nodes


@dataclass(frozen=True)
class Calibration:
    """What the INT8 candidate is built and judged from: real preprocessed images and the reference logits."""

    images: np.ndarray  # float32 NCHW, the --calib-images set
    reference_logits: np.ndarray  # the FP32 PyTorch model's logits on them
    alpha: float = DEFAULT_ALPHA  # SmoothQuant migration strength (0.5 measured best of 0.3/0.5/0.7/0.85)
    min_agreement: float = MIN_AGREEMENT

    @property
    def max_mean_error(self) -> float:
        return MAX_MEAN_ERROR * float(np.std(self.reference_logits))


def quantize_int8(src: Path, dst: Path, nodes: Sequence[str]) -> None:
    """Dynamic INT8 (symmetric per-column weights, per-call activation scales) of ``nodes`` only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # the quantizer logs every node it visits at INFO/WARNING
    try:
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=list(nodes),
            weight_type=QuantType.QInt8,
            per_channel=True,  # measured with smoothing: mean |Δlogit| 0.40 per tensor -> 0.34 per column
            # Shape inference cannot type the outputs of contrib ops (Attention, SkipLayerNormalization):
            # everything this graph computes between them is float32.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(logging.NOTSET)


def gate(c: Comparison, max_mean_error: float, min_agreement: float = MIN_AGREEMENT) -> Comparison:
    """The INT8 decision gate; the note names every condition applied and the ones that failed.

    PASS iff: decision agreement >= ``min_agreement``; no decisive flip (an image farther than the
    tolerance's probability band from the threshold changes side); finite outputs; mean |Δlogit| <=
    max(``max_mean_error``, the logit tolerance). The max |Δlogit| is in the record, not in the verdict.
    """
    if c.status == NOT_RUN or c.logit is None:
        return c
    failed = gate_failures(c, max_mean_error, min_agreement)
    applied = (
        f"INT8 gate: agreement >= {min_agreement:g}, 0 decisive flips (|Δprob| band "
        f"{c.tolerances.prob_atol:g}), mean |Δlogit| <= {_mean_limit(c, max_mean_error):.3g}; max |Δlogit| not gated"
    )
    verdict = f"failed: {'; '.join(failed)}" if failed else "passed"
    note = "; ".join(filter(None, [c.note, f"{applied}: {verdict}"]))
    limit = f"mean {_mean_limit(c, max_mean_error):.3g}, agree {min_agreement:g}"
    return dataclasses.replace(c, status=FAIL if failed else PASS, note=note, limit=limit, max_gated=False)


def gate_failures(c: Comparison, max_mean_error: float, min_agreement: float = MIN_AGREEMENT) -> list[str]:
    """The gate's conditions that ``c`` (a measured comparison) fails, one phrase each."""
    mean_limit = _mean_limit(c, max_mean_error)
    return [
        text
        for bad, text in (
            (
                c.agreement is None or c.agreement < min_agreement,
                f"agreement {_f(c.agreement)} < {min_agreement:g}",
            ),
            (c.decisive_flips > 0, f"{c.decisive_flips} decisive flips > 0"),
            (c.logit.nonfinite > 0, f"{c.logit.nonfinite} non-finite outputs"),
            (not c.logit.mean_abs <= mean_limit, f"mean |Δlogit| {c.logit.mean_abs:.3g} > {mean_limit:.3g}"),
        )
        if bad
    ]


def _mean_limit(c: Comparison, max_mean_error: float) -> float:
    return max(max_mean_error, c.tolerances.logit_atol)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def add_int8_model(src: Path, check: Check, calib: Calibration) -> Int8Decision:
    """Write ``model.int8.onnx`` beside ``src`` (the CPU FP32 model) and keep it only if it passes ``check``.

    ``src`` is smoothed with statistics of ``calib.images`` first (into a hidden file, removed after).
    A quantizer or runtime error drops the file with a note instead of failing the export: INT8 is an
    optional speed-up.
    """
    dst = src.with_name(INT8_ONNX)
    smoothed = src.with_name(f".{INT8_ONNX}.smoothed")
    try:
        sites = smooth_file(src, smoothed, calib.images, calib.alpha)
        nodes = quantizable_nodes(onnx.load(str(smoothed), load_external_data=False))
        decision = _search(smoothed, dst, nodes, check, calib)
        return dataclasses.replace(
            decision, note=f"{decision.note} [SmoothQuant alpha {calib.alpha:g} on {sites} inputs]"
        )
    except Exception as e:  # onnx, the quantizer and onnxruntime raise many types; all mean "not this time"
        dst.unlink(missing_ok=True)
        return Int8Decision(False, f"{INT8_ONNX}: not written ({type(e).__name__}: {e})", ())
    finally:
        smoothed.unlink(missing_ok=True)


def _search(
    src: Path, dst: Path, nodes: dict[str, int | None], check: Check, calib: Calibration
) -> Int8Decision:
    if not nodes:
        return Int8Decision(False, f"{INT8_ONNX}: not written (no weight MatMul/Attention to quantize)", ())

    def attempt(fp32: set[int], write_to: Path = dst) -> Comparison:
        quantize_int8(src, write_to, [n for n, b in nodes.items() if b not in fp32])
        return gate(check(write_to), calib.max_mean_error, calib.min_agreement)

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
        f"({'; '.join(gate_failures(last, calib.max_mean_error, calib.min_agreement))})",
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
        f"{INT8_ONNX}: dynamic INT8 weight MatMuls/Attention (per-column weights){kept}; "
        f"on {c.samples} calibration images agreement {c.agreement:.4f} with PyTorch FP32, "
        f"{c.decisive_flips} decisive flips, mean |Δlogit| {c.logit.mean_abs:.3g} "
        f"(max {c.logit.max_abs:.3g}, not gated)",
        (c,),
        fp32_blocks,
    )
