"""SmoothQuant-style channel scaling of the CPU graph, so per-tensor INT8 activations keep their precision.

CLIP's residual stream carries a few outlier channels (|x| tens of times the rest). Dynamic INT8 gives
each MatMul input one scale per call, so those channels set the step and the ordinary channels are
left with a few levels: the detector's logits move by more than its decisions allow. Xiao et al. 2023
(SmoothQuant) move that range into the weights, which are quantized offline: with per-channel factors
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` the activation becomes ``X / s`` and the weight rows
``s * W``; the product is unchanged.

Where a LayerNorm (``LayerNormalization`` or ``SkipLayerNormalization`` output 0) is read only by weight
MatMuls / fused ``Attention`` (directly, or through a token ``Slice``), the division is folded into its
gamma and beta: no extra op. Every other weight MatMul input (the attention output before out_proj, the
QuickGELU output before the MLP's c_proj, a norm output that also feeds a residual add) gets an explicit
``Mul`` by ``1/s`` in front: one elementwise pass, where most of the INT8 error came from. Either way the
smoothed FP32 graph is the same function up to float rounding. ``max|X_j|`` comes from running the FP32
graph on the calibration images with those activations exposed as extra graph outputs.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

NORMS = ("LayerNormalization", "SkipLayerNormalization")
WEIGHTED = ("MatMul", "Attention")  # input 0 the activation, input 1 a [E, N] weight initializer
DEFAULT_ALPHA = 0.5  # share of the activation range moved into the weights (the paper's default)
_FLOOR = 1e-5  # no zero or denormal factors from a dead channel


@dataclass(frozen=True)
class Site:
    """One activation and the weight ops reading it; ``norm`` None: a ``Mul`` by ``1/s`` goes in front."""

    activation: str
    consumers: tuple[onnx.NodeProto, ...]
    norm: onnx.NodeProto | None = None  # a norm whose gamma and beta absorb ``1/s`` exactly

    @property
    def norm_inputs(self) -> tuple[int, ...]:
        """Positions of the norm's gamma and beta among its inputs (none for a Mul site)."""
        if self.norm is None:
            return ()
        return (1, 2) if self.norm.op_type == "LayerNormalization" else (2, 3)


def smoothing_sites(model: onnx.ModelProto) -> list[Site]:
    """Where factors go: norms that absorb ``1/s``, then every other weight MatMul input (an explicit Mul).

    A MatMul with a single output column (the head's logit) is left alone: it stays FP32.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    uses = Counter(i for n in g.node for i in n.input)
    outputs = {o.name for o in g.output}
    consts = _constants(g)
    sites, covered = [], set()
    for n in g.node:
        if n.op_type not in NORMS:
            continue
        site = Site(n.output[0], (), n)
        if any(i >= len(n.input) or n.input[i] not in inits for i in site.norm_inputs):
            continue
        consumers = _weight_consumers(n.output[0], readers, inits, uses, outputs, consts)
        if consumers:
            sites.append(Site(n.output[0], tuple(consumers), n))
            covered.update(c.name for c in consumers)
    explicit: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        weight = n.op_type == "MatMul" and _is_weight_op(n, inits, uses)
        if weight and n.name not in covered and inits[n.input[1]].dims[-1] > 1:
            explicit[n.input[0]].append(n)
    return sites + [Site(t, tuple(c)) for t, c in explicit.items()]


def _is_weight_op(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto], uses: Counter[str]) -> bool:
    """A MatMul/Attention whose input 1 is a 2-D weight initializer read by it alone."""
    return (
        n.op_type in WEIGHTED
        and len(n.input) > 1
        and n.input[1] in inits
        and uses[n.input[1]] == 1
        and len(inits[n.input[1]].dims) == 2
    )


def _weight_consumers(
    tensor: str,
    readers: dict[str, list[onnx.NodeProto]],
    inits: dict[str, onnx.TensorProto],
    uses: Counter[str],
    outputs: set[str],
    consts: dict[str, np.ndarray],
) -> list[onnx.NodeProto] | None:
    """The weight ops reading ``tensor`` (through token slices), or None if anything else reads it."""
    if tensor in outputs or not readers[tensor]:
        return None
    found: list[onnx.NodeProto] = []
    for r in readers[tensor]:
        if r.op_type == "Slice" and r.input[0] == tensor and _keeps_channels(r, consts):
            below = _weight_consumers(r.output[0], readers, inits, uses, outputs, consts)
            if below is None:
                return None
            found += below
        elif r.input[0] == tensor and _is_weight_op(r, inits, uses):
            found.append(r)
        else:
            return None
    return found


def _keeps_channels(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> bool:
    """A Slice over the token or batch axis of a rank-3 activation only (constant axes, none of them 2/-1)."""
    if node.input[1] not in consts or (len(node.input) > 3 and node.input[3] not in consts):
        return False
    axes = consts[node.input[3]] if len(node.input) > 3 else np.arange(consts[node.input[1]].size)
    return bool(axes.size) and all(a in (0, 1, -2, -3) for a in axes.ravel().tolist())


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Small integer constants (Slice starts/axes) from initializers and Constant nodes."""
    out = {
        t.name: numpy_helper.to_array(t)
        for t in graph.initializer
        if len(t.dims) <= 1 and t.data_type == TensorProto.INT64
    }
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def channel_maxima(
    model: onnx.ModelProto, tensors: Iterable[str], images: np.ndarray, batch: int = 16
) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each of ``tensors`` over ``images``, from ONNX Runtime on the CPU."""
    import onnxruntime as ort

    names = list(dict.fromkeys(tensors))
    outputs = len(model.graph.output)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names)
    try:  # exposed in place and removed again: a copy of a ViT-L graph costs 600 MB
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    finally:
        del model.graph.output[outputs:]
    feed = session.get_inputs()[0].name
    maxima: dict[str, np.ndarray] = {}
    for i in range(0, len(images), batch):
        outs = session.run(names, {feed: np.ascontiguousarray(images[i : i + batch], np.float32)})
        for name, out in zip(names, outs, strict=True):
            m = np.abs(out.reshape(-1, out.shape[-1])).max(axis=0)
            maxima[name] = np.maximum(maxima[name], m) if name in maxima else m
    return maxima


def smooth(model: onnx.ModelProto, images: np.ndarray, alpha: float = DEFAULT_ALPHA) -> int:
    """Apply the factors in place (statistics from ``images``); returns how many activations were smoothed."""
    sites = smoothing_sites(model)
    if not sites:
        return 0
    maxima = channel_maxima(model, (s.activation for s in sites), images)
    inits = {t.name: t for t in model.graph.initializer}
    uses = Counter(i for n in model.graph.node for i in n.input)
    for site in sites:
        weights = {c.input[1]: numpy_helper.to_array(inits[c.input[1]]) for c in site.consumers}
        w_max = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        s = factors(maxima[site.activation], w_max, alpha)
        for name, w in weights.items():
            _replace(inits[name], w * s[:, None])
        for i in site.norm_inputs:
            own = (
                _own_copy(model.graph, inits, site.norm, i)
                if uses[site.norm.input[i]] > 1
                else inits[site.norm.input[i]]
            )
            _replace(own, numpy_helper.to_array(own) / s)
        if site.norm is None:
            _divide_before(model.graph, site, s)
    return len(sites)


def _own_copy(
    graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], norm: onnx.NodeProto, index: int
) -> onnx.TensorProto:
    """A private copy of ``norm``'s input ``index`` (ONNX Runtime merges identical initializers)."""
    name = f"{norm.input[index]}/smooth/{norm.name or norm.output[0]}"
    graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[norm.input[index]]), name))
    norm.input[index] = name
    return graph.initializer[-1]


def _divide_before(graph: onnx.GraphProto, site: Site, s: np.ndarray) -> None:
    """A ``Mul`` by ``1/s`` between ``site.activation`` and its weight ops (placed before the first one)."""
    inverse, scaled = f"{site.activation}/smooth/inverse", f"{site.activation}/smooth/output"
    graph.initializer.append(numpy_helper.from_array((1 / s).astype(np.float32), inverse))
    for c in site.consumers:
        c.input[0] = scaled
    first = min(i for i, n in enumerate(graph.node) if n in site.consumers)
    mul = onnx.helper.make_node("Mul", [site.activation, inverse], [scaled], name=f"{site.activation}/smooth")
    graph.node.insert(first, mul)


def factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel factors ``max|X|^alpha / max|W|^(1-alpha)`` (float32, never zero)."""
    x, w = np.maximum(x_max, _FLOOR).astype(np.float64), np.maximum(w_max, _FLOOR).astype(np.float64)
    return np.maximum(x**alpha / w ** (1 - alpha), _FLOOR).astype(np.float32)


def smooth_file(src: Path, dst: Path, images: np.ndarray, alpha: float = DEFAULT_ALPHA) -> int:
    """``src`` smoothed into ``dst`` (one self-contained file); returns how many activations were smoothed."""
    model = onnx.load(str(src))
    count = smooth(model, images, alpha)
    onnx.save(model, str(dst))
    return count


def _replace(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    tensor.CopyFrom(numpy_helper.from_array(values.astype(dtype), tensor.name))
