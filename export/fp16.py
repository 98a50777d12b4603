"""FP16 ONNX: weights and arithmetic in half precision, inputs and outputs still float32.

``model.fp16.onnx`` takes the same float32 ``image`` and returns the same float32 ``logit`` and
``probability`` as ``model.onnx`` (``keep_io_types=True``: Cast nodes at the graph boundary), so callers
never handle half floats. Ops named in ``keep_fp32`` run in float32 between Cast nodes.

The conversion uses ONNX Runtime's maintained copy of onnxconverter-common's ``convert_float_to_float16``
(same function, same arguments). onnxconverter-common 1.15/1.16 itself produces invalid graphs for this
network: Cast nodes keep ``to=FLOAT`` with FLOAT16 outputs (onnxconverter-common#320), and blocking
LayerNormalization crashes ``remove_unnecessary_cast_node``. ONNX Runtime's copy only leaves the input
Cast after its consumers (onnxconverter-common#208), which ``_toposort`` repairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx

from .network import ExportError
from .options import DEFAULT_KEEP_FP32

FP16_MAX = 65504.0  # largest finite float16
FP16_WARN = 0.99 * FP16_MAX


def check_fp16_range(name: str, value: float) -> str | None:
    """ExportError if the largest merged |weight| is not representable in FP16; a warning near the edge."""
    if value > FP16_MAX:
        raise ExportError(
            f"the largest |weight| after merging the deltas is {value:.6g} ({name}), beyond float16's "
            f"{FP16_MAX:g}: an FP16 model would overflow. Export without --fp16, or retrain with a smaller "
            "delta rank or learning rate"
        )
    if value > FP16_WARN:
        return (
            f"the largest |weight| after merging is {value:.6g} ({name}), within 1% of float16's {FP16_MAX:g}; "
            "activations may overflow in FP16 (the parity check below measures it)"
        )
    return None


def convert_fp16(src: Path, dst: Path, keep_fp32: Sequence[str] = DEFAULT_KEEP_FP32) -> None:
    """Write the FP16 copy of ``src`` to ``dst``, float32 I/O, ``keep_fp32`` op types in float32."""
    from onnxruntime.transformers import float16

    from .ood_head import ood_nodes

    model = onnx.load(str(src))
    converted = float16.convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *keep_fp32],
        node_block_list=ood_nodes(model),  # the OOD head's squared distances stay FP32 (ood_head.py)
        min_positive_val=5.96e-08,  # smallest float16 subnormal: tiny weights stay tiny, not zero
        max_finite_val=FP16_MAX,  # not the converter's 1e4 default clip, which would change weights
    )
    _toposort(converted.graph)
    onnx.save(converted, str(dst))
    try:
        onnx.checker.check_model(str(dst), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{dst}: the FP16 conversion produced an invalid graph: {e}") from e


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"FP16 graph has unresolvable inputs at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
