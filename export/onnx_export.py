"""FP32 ONNX export of the deployed network, and the structural checks on the graph it produces.

The legacy TorchScript exporter (``dynamo=False``) at opset 17 emits LayerNormalization as one op,
which TensorRT >= 8.6 keeps accurate in FP16. ``nn.MultiheadAttention``'s inference fast path traces to
``aten::_native_multi_head_attention``, which has no ONNX symbolic, so it is switched off while tracing.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

from i2p.runtime.schema import OOD_OUTPUT

from .network import DeployedDetector, ExportError

INPUT = "image"
OUTPUTS = ("logit", "probability")
LINEAR_MAPS_PER_BLOCK = 4  # attention in/out projections, MLP fc/proj (a plain ViT block)
PROTOBUF_LIMIT = 2**31 - 1  # one ONNX file without external data
_BLOCK = re.compile(r"blocks\.(\d+)/")  # open_clip's resblocks.N/, timm's blocks.N/


@contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """Trace MultiheadAttention through its decomposed path; restores the previous setting."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def export_onnx(net: DeployedDetector, path: Path, opset: int = 17, trace_batch: int = 2) -> None:
    """Write ``net`` as ONNX with a dynamic batch axis named "batch" and check it (full check)."""
    size = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])
    if size > PROTOBUF_LIMIT:
        raise ExportError(
            f"the truncated network holds {size / 2**30:.1f} GiB of weights, over ONNX's 2 GiB single-file "
            "limit; export a smaller L* or backbone"
        )
    image = torch.randn(trace_batch, 3, net.image_size, net.image_size)
    batch = {0: "batch"}
    outputs = [*OUTPUTS, *((OOD_OUTPUT,) if net.ood is not None else ())]
    with mha_fastpath_disabled(), torch.no_grad(), warnings.catch_warnings():
        # Expected: the legacy exporter's deprecation notice (dynamo=False is deliberate) and the tracer's
        # notes on MultiheadAttention's shape assertions (constant for a given model).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            net,
            (image,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=outputs,
            dynamic_axes={INPUT: batch, **{name: batch for name in outputs}},
            do_constant_folding=True,
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path}: the exported graph fails onnx.checker: {e}") from e


@dataclass(frozen=True)
class GraphSummary:
    """What the graph computes, counted from its nodes: blocks, weight-bearing linear maps, op types."""

    blocks: int
    linear_maps: int  # MatMul/Gemm nodes with a weight initializer operand
    ops: dict[str, int] = field(default_factory=dict)


def weights_by_name(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every weight by the names the graph reads it under: the exporter deduplicates equal
    initializers through Identity nodes, and such an alias is the weight."""
    weights = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Identity" and n.input[0] in weights:
            weights[n.output[0]] = weights[n.input[0]]
    return weights


def summarize_graph(model: onnx.ModelProto) -> GraphSummary:
    graph = model.graph
    weights = weights_by_name(graph)
    linear = sum(
        1 for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[:2])
    )
    blocks = {int(m.group(1)) for n in graph.node if (m := _BLOCK.search(n.name))}
    return GraphSummary(
        blocks=len(blocks),
        linear_maps=linear,
        ops=dict(Counter(n.op_type for n in graph.node)),
    )


def check_graph(
    path: Path, layer: int, maps_per_block: int = LINEAR_MAPS_PER_BLOCK, heads: int = 1
) -> GraphSummary:
    """The graph holds exactly ``layer`` ViT blocks, ``maps_per_block`` linear maps each plus the ``heads``
    (the logit's Linear, and the OOD head's whitening where there is one), no adapter ops.

    An adapter left in the graph (a low-rank branch beside a weight) shows up as extra weight MatMuls.
    """
    summary = summarize_graph(onnx.load(str(path), load_external_data=False))
    expected = maps_per_block * layer + heads
    problems = []
    if summary.blocks != layer:
        problems.append(f"{summary.blocks} transformer blocks instead of L*={layer}")
    if summary.linear_maps != expected:
        problems.append(f"{summary.linear_maps} weight MatMul/Gemm nodes instead of {expected}")
    if problems:
        raise ExportError(f"{path}: unexpected graph: " + "; ".join(problems))
    return summary
