"""The checks a network file passes before ONNX Runtime or TensorRT loads it.

An artifact travels between machines, and its manifest and files can be rewritten together (the sha256
only proves they agree), so each model file is read as hostile (``onnx_graph`` reads the protobuf):

- **structure**, for every model file at ``Detector`` load: at most ``MAX_NODES`` nodes and
  ``MAX_INITIALIZERS`` initializers (ONNX Runtime took 77 s to load 100,000); no subgraphs (``Loop``,
  ``If``, ``Scan``: a ``Loop`` of 10^12 steps runs until killed), no model-local functions or training
  graphs; no tensor with external data (bytes from a side file the manifest does not hash);
- **contract**, for every model file at ``Detector`` load: the one input the runtime feeds (the
  manifest's name, float32, [batch, 3, S, S] with the manifest's fixed dims) and the logit output (the
  manifest's name and dtype, shape [batch] or [batch, 1]), and the ``ood`` output where the manifest
  declares one (same rules);
- **ops**, for the file a backend loads: every node is an op of ``ALLOWED_OPS``, the ops exported graphs
  (FP32, FP16, fused CPU, INT8) use plus plain tensor math other ViT backbones export to.
  ``UnsupportedGraphError`` is a load failure, so the Detector falls back to the next CPU model.
"""

from __future__ import annotations

import os
from collections import Counter

from .manifest import MANIFEST, ArtifactError, Manifest, verify_file
from .onnx_graph import OnnxFormatError, OnnxGraph, ValueInfo, read_graph
from .schema import OOD_OUTPUT

# Measured on exports of the tiny open_clip ViT (L* = 1 and 4): each block adds 166 nodes and 6
# initializers to model.onnx (174 nodes in FP16, 8 + 8 fused for the CPU), so even a 48-block ViT-bigG
# stays near 8,500 nodes. ONNX Runtime took 1.0 s to load 16,384 initializers, 77 s for 100,000.
MAX_NODES = 20_000
MAX_INITIALIZERS = 10_000
FED_DTYPE = "float32"  # what every backend feeds the image input
CONTROL_FLOW = ("Loop", "If", "Scan", "SequenceMap")

# The ops of real exports (tests/fixtures/v1: model.onnx, model.fp16.onnx, model.cpu.onnx, model.int8.onnx;
# tests/export/test_cpu_optimize.py and test_quantize.py load fresh ones), then plain tensor math that
# other ViT backbones export to. No control flow, sequences, random numbers, strings or training ops.
ALLOWED_OPS: dict[str, frozenset[str]] = {
    "": frozenset(
        {
            # in the exported graphs
            *("Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "DynamicQuantizeLinear"),
            *("Equal", "Expand", "Gather", "Gemm", "Identity", "LayerNormalization", "MatMul"),
            *("MatMulInteger", "Mod", "Mul", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Sqrt"),
            *("Squeeze", "Transpose", "Unsqueeze", "Where"),
            # other exporters and backbones (GELU via Erf, RMS/Group norms, pooling, interpolated position
            # embeddings) and ONNX Runtime's quantizer
            *("Abs", "And", "ArgMax", "AveragePool", "BatchNormalization", "CastLike", "Ceil", "Clip"),
            *("ConvInteger", "Cos", "DequantizeLinear", "Einsum", "Erf", "Exp", "Flatten", "Floor"),
            *(
                "GatherElements",
                "Gelu",
                "GlobalAveragePool",
                "Greater",
                "GreaterOrEqual",
                "GroupNormalization",
            ),
            *("HardSigmoid", "HardSwish", "InstanceNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log"),
            *("LogSoftmax", "Max", "MaxPool", "Min", "Neg", "Not", "Or", "Pad", "Pow", "QuantizeLinear"),
            *("Range", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum"),
            *("Relu", "Resize", "Round", "Sign", "Sin", "Softplus", "Split", "Sub", "Sum", "Tanh", "Tile"),
        }
    ),
    "com.microsoft": frozenset(
        {
            # in the exported graphs
            *("MultiHeadAttention", "QuickGelu", "SkipLayerNormalization"),
            # what ONNX Runtime's CPU optimizer and quantizer emit on transformer graphs
            *("Attention", "BiasAdd", "BiasGelu", "BiasSoftmax", "DynamicQuantizeMatMul", "FastGelu"),
            *("FusedConv", "FusedGemm", "FusedMatMul", "Gelu", "MatMulIntegerToFloat", "QAttention", "QGemm"),
            *("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
        }
    ),
}


class UnsupportedGraphError(ArtifactError):
    """The file uses ops this runtime does not run; like a load failure, the next candidate file may do."""


def check_model_files(artifact: str | os.PathLike, manifest: Manifest) -> None:
    """Every model file of the manifest: sha256, structure and contract (ArtifactError naming file and field)."""
    for model in manifest.models:
        path = verify_file(artifact, manifest, model.path)
        check_contract(check_structure(path), path, manifest)


def check_loadable(path: str | os.PathLike) -> OnnxGraph:
    """What a backend checks before it hands ``path`` to ONNX Runtime or TensorRT: structure, then ops."""
    graph = check_structure(path)
    unknown = Counter(op for op in graph.ops if op[1] not in ALLOWED_OPS.get(op[0], ()))
    if unknown:
        listed = ", ".join(f"{op} ({domain or 'ai.onnx'}) x{n}" for (domain, op), n in unknown.most_common(8))
        raise UnsupportedGraphError(
            f"{path}: nodes with ops outside what this runtime runs: {listed}; "
            "a graph from i2p-export uses only the ops in i2p.runtime.model_check.ALLOWED_OPS"
        )
    return graph


def check_structure(path: str | os.PathLike) -> OnnxGraph:
    """Parse ``path`` within the caps, then refuse control flow, functions and external data."""
    try:
        graph = read_graph(path, MAX_NODES, MAX_INITIALIZERS)
    except OnnxFormatError as e:
        raise ArtifactError(
            f"{path}: ONNX Runtime cannot load this model (not ONNX: {e}); re-export it"
        ) from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from e
    cap = {"nodes": MAX_NODES, "initializers": MAX_INITIALIZERS}
    problem = None
    if graph.over_limit:
        problem = f"more than {cap[graph.over_limit]:,} {graph.over_limit}, the most this runtime loads"
    elif flow := [op for _, op in graph.ops if op in CONTROL_FLOW] or graph.subgraphs:
        problem = f"control flow or subgraphs ({', '.join(sorted(set(flow))[:4] or graph.subgraphs[:4])})"
    elif graph.functions or graph.training:
        problem = "model-local functions or training graphs"
    elif graph.external:
        problem = (
            f"tensors with external data ({', '.join(repr(n) for n in graph.external[:4])}): their bytes live "
            "in another file the manifest does not hash"
        )
    if problem:
        raise ArtifactError(f"{path}: the network has {problem}; refusing it before it is loaded")
    return graph


def check_contract(graph: OnnxGraph, path: str | os.PathLike, manifest: Manifest) -> None:
    """The graph takes what the runtime feeds and returns one logit per image, as the manifest says."""
    want_in, want_out = manifest.inputs[0], manifest.outputs[0]

    def refuse(field: str, problem: str) -> ArtifactError:
        return ArtifactError(
            f"{path}: {field} {problem}; the network does not match the artifact, re-export it"
        )

    fed = [i for i in graph.inputs if i.name not in graph.initializers]
    names = [i.name for i in fed]
    if want_in.name not in names:
        raise refuse("inputs:", f"the network has no input {want_in.name!r} (inputs: {names})")
    if len(fed) > 1:
        raise refuse("inputs:", f"the network takes {names}; the runtime feeds one, {want_in.name!r}")
    (image,) = fed
    where = f"input {image.name!r}"
    if image.dtype != FED_DTYPE:
        raise refuse(f"{where} dtype", f"is {image.dtype}; the runtime feeds {FED_DTYPE}")
    # a fixed dim must be the manifest's; the batch axis must stay dynamic (the runtime batches)
    wrong = image.dims is None or len(image.dims) != len(want_in.shape)
    wrong = wrong or any(
        got != want if isinstance(want, int) else isinstance(got, int)
        for got, want in zip(image.dims, want_in.shape, strict=True)
    )
    if wrong:
        raise refuse(
            f"{where} shape:",
            f"the network takes {image.name!r} as {_shape(image)}, but {MANIFEST} says {list(want_in.shape)}",
        )

    wanted = [(want_out, "logit")]
    wanted += [(o, "score") for o in manifest.outputs if o.name == OOD_OUTPUT and manifest.ood is not None]
    for want, what in wanted:
        out = next((o for o in graph.outputs if o.name == want.name), None)
        if out is None:
            raise refuse(
                "outputs:",
                f"the network has no output {want.name!r} (outputs: {[o.name for o in graph.outputs]})",
            )
        where = f"output {out.name!r}"
        if out.dtype != want.dtype:
            raise refuse(f"{where} dtype", f"is {out.dtype}; the manifest says {want.dtype}")
        dims = out.dims
        batch = image.dims[0]
        one_per_image = (
            dims is not None
            and (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1))
            and not isinstance(dims[0], int)
            and (not isinstance(dims[0], str) or not isinstance(batch, str) or dims[0] == batch)
        )
        if not one_per_image:
            raise refuse(
                f"{where} shape",
                f"is {_shape(out)}; the runtime needs one {what} per image, [batch] or [batch, 1]",
            )


def _shape(v: ValueInfo) -> str:
    return "undeclared" if v.dims is None else str(["?" if d is None else d for d in v.dims])
