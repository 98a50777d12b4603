"""Attention fusion for ONNX Runtime's CPU kernels, on the graph ``torch.onnx`` writes for open_clip.

``nn.MultiheadAttention`` exports as ~80 small nodes (sequence-first transposes, dynamic reshapes,
scaled matmuls) that no attention fusion of ONNX Runtime recognizes. ``fuse_attention``

1. replaces each block's attention subgraph by one ``Attention`` node (packed QKV weight, no mask) and
   the output projection. A subgraph is recognized by structure: the non-constant nodes of one
   ``resblocks.N/attn`` scope, one activation in and one out, one Softmax, an [E, 3E] QKV weight and an
   [E, E] output Gemm. Anything else is left as exported (and reported);
2. computes the last block for the class token only. The detector reads the CLS token after block
   L*, so that block needs keys and values of every token but the query, output projection and MLP of
   one: the ``MultiHeadAttention`` there takes a one-token query, and the residual stream entering the
   block's tail is sliced to the CLS token. Applied only when everything between that attention and
   the CLS ``Gather`` is token-wise (elementwise ops, LayerNorm on the last axis, weight MatMuls);
   exact, and it saves ~10/12 of one block's compute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_export import weights_by_name

CONTRIB = "com.microsoft"
# Ops that act on each token alone (elementwise, or along the last axis) when their other operands are
# weights of rank <= 1 (MatMul: a 2-D weight): the part of the last block that only the CLS token needs.
TOKENWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Sigmoid", "Relu", "Cast", "Identity"}
    | {"LayerNormalization", "MatMul"}
)
_ATTN_SCOPE = re.compile(r"^(.*/resblocks\.\d+/attn)/")


class _NoMatch(ValueError):
    """The subgraph does not have the structure this rewrite needs; the message says what differs."""


@dataclass(frozen=True)
class _Attention:
    """One recognized attention subgraph: x [B, S, E] -> y [B, S, E] and its weights (MatMul layout)."""

    scope: str
    nodes: list[onnx.NodeProto]
    x: str
    y: str
    qkv_w: np.ndarray  # [E, 3E]: x @ qkv_w = [q | k | v]
    qkv_b: np.ndarray  # [3E]
    out_w: np.ndarray  # [E, E]
    out_b: np.ndarray  # [E]


class _Index:
    """Lookups over a graph: weights (following the exporter's Identity aliases), constants, consumers."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.weights = weights_by_name(graph)
        self.constants = {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t)
            for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self.names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}

    def is_static(self, name: str) -> bool:
        return name in self.weights or name in self.constants

    def static(self, name: str) -> np.ndarray | None:
        """The value of a weight or Constant output, None for an activation."""
        if name in self.weights:
            return numpy_helper.to_array(self.weights[name])
        return self.constants.get(name)

    def fresh(self, name: str) -> str:
        if name in self.names:
            raise _NoMatch(f"tensor name {name!r} already exists")
        self.names.add(name)
        return name


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> tuple[int, bool, list[str]]:
    """Rewrite ``model`` in place: (attention blocks fused, last block CLS-only, what was not applied)."""
    index = _Index(model.graph)
    scopes: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if (m := _ATTN_SCOPE.match(node.name)) and node.op_type != "Constant":
            scopes.setdefault(m.group(1), []).append(node)
    matches, skipped = [], []
    for scope, nodes in scopes.items():
        try:
            matches.append(_match(scope, nodes, index, num_heads))
        except _NoMatch as e:
            skipped.append(f"{scope}: {e}")
    if not matches:
        return 0, False, skipped or ["no attention subgraphs (resblocks.N/attn scopes) in the graph"]
    replace: dict[int, list[onnx.NodeProto]] = {}
    for m in matches[:-1]:
        replace[id(m.nodes[0])] = _fused_attention(m, index, num_heads)
    last, sliced = matches[-1], {}
    try:
        tail, outside = _tokenwise_tail(last.y, index)
        if outside != [_layernorm_input(last.x, index)]:
            raise _NoMatch(
                f"the block tail reads {outside}, not the residual stream its attention normalizes"
            )
        replace[id(last.nodes[0])] = _cls_attention(last, index, num_heads)
        for x in outside:
            sliced[x] = _slice_cls(x, index)
    except _NoMatch as e:
        skipped.append(f"CLS-only last block: {e}")
        tail, outside = [], []
        replace[id(last.nodes[0])] = _fused_attention(last, index, num_heads)
    dropped = {id(n) for m in matches for n in m.nodes}
    tail_ids = {id(n) for n in tail}
    rebuilt: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if id(node) in tail_ids:
            for i, name in enumerate(node.input):
                if name in sliced:
                    node.input[i] = sliced[name][-1].output[0]
        if id(node) in replace:
            rebuilt.extend(replace[id(node)])
        if id(node) not in dropped:
            rebuilt.append(node)
        # A sliced residual is computed right after its producer (or at the start for a graph input).
        for nodes in (v for k, v in sliced.items() if k in node.output):
            rebuilt.extend(nodes)
    for x, nodes in sliced.items():
        if x in {i.name for i in model.graph.input}:
            rebuilt[:0] = nodes
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    if not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    _prune(model.graph)
    return len(matches), bool(tail), skipped


def _match(scope: str, nodes: list[onnx.NodeProto], index: _Index, num_heads: int) -> _Attention:
    members = {id(n) for n in nodes}
    produced = {o for n in nodes for o in n.output}
    inputs = {i for n in nodes for i in n.input if i and i not in produced and not index.is_static(i)}
    outputs = [
        o
        for o in produced
        if o in index.outputs or any(id(c) not in members for c in index.consumers.get(o, []))
    ]
    if len(inputs) != 1 or len(outputs) != 1:
        raise _NoMatch(f"{len(inputs)} activation inputs and {len(outputs)} outputs (expected 1 and 1)")
    (x,), (y,) = inputs, outputs
    if sum(n.op_type == "Softmax" for n in nodes) != 1:
        raise _NoMatch("not exactly one Softmax")
    if not any(n.op_type == "Transpose" and n.input[0] == x for n in nodes):
        raise _NoMatch("the input is not transposed to sequence-first (a batch_first MHA is expected)")
    qkv_w = _one_weight(nodes, index, "MatMul", lambda s: len(s) == 2 and s[1] == 3 * s[0])
    width = qkv_w.shape[0]
    if width % num_heads:
        raise _NoMatch(f"width {width} is not a multiple of {num_heads} heads")
    qkv_b = _one_weight(nodes, index, "Add", lambda s: s == (3 * width,))
    out_w, out_b = _output_projection(nodes, index, width)
    return _Attention(scope, nodes, x, y, qkv_w, qkv_b, out_w, out_b)


def _one_weight(nodes: list[onnx.NodeProto], index: _Index, op_type: str, shape_ok: Any) -> np.ndarray:
    candidates = [
        index.static(i) for n in nodes if n.op_type == op_type for i in n.input if i in index.weights
    ]
    found = [value for value in candidates if shape_ok(value.shape)]
    if len(found) != 1:
        raise _NoMatch(f"{len(found)} {op_type} weights of the expected shape (expected 1)")
    return found[0]


def _output_projection(
    nodes: list[onnx.NodeProto], index: _Index, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The output projection Gemm's weight in MatMul layout ([in, out]) and bias."""
    gemms = [n for n in nodes if n.op_type == "Gemm"]
    if len(gemms) != 1 or len(gemms[0].input) != 3 or not all(i in index.weights for i in gemms[0].input[1:]):
        raise _NoMatch("no single Gemm output projection with weight and bias")
    gemm = gemms[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise _NoMatch("the output projection Gemm transposes or scales its operands")
    w, b = index.static(gemm.input[1]), index.static(gemm.input[2])
    if w.shape != (width, width) or b.shape != (width,):
        raise _NoMatch(f"the output projection is {w.shape} + {b.shape}, not [E, E] + [E]")
    return (w.T if attrs.get("transB", 0) else w), b


def _tokenwise_tail(y: str, index: _Index) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes between ``y`` and the CLS Gather(s), all token-wise, and the activations they read from outside."""
    tail: list[onnx.NodeProto] = []
    seen: set[int] = set()
    frontier, inside, gathers = [y], {y}, 0
    while frontier:
        name = frontier.pop()
        if name in index.outputs:
            raise _NoMatch(f"{name} is a graph output")
        for node in index.consumers.get(name, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if _is_cls_gather(node, index):
                gathers += 1
                continue
            if node.op_type not in TOKENWISE:
                raise _NoMatch(
                    f"{node.op_type} node {node.name!r} after the last attention is not token-wise"
                )
            tail.append(node)
            inside.update(node.output)
            frontier.extend(node.output)
    if not gathers:
        raise _NoMatch("the last block's output is not read through a CLS-token Gather")
    outside: list[str] = []
    for node in tail:
        if node.op_type == "MatMul" and not index.is_static(node.input[1]):
            raise _NoMatch(f"MatMul {node.name!r} multiplies two activations")
        for pos, name in enumerate(node.input):
            if not name or name in inside:
                continue
            if not index.is_static(name):
                if name not in outside:
                    outside.append(name)
            elif not _tokenwise_operand(node, pos, value := index.static(name)):
                raise _NoMatch(
                    f"{node.op_type} {node.name!r} mixes tokens (operand {name} of shape {value.shape})"
                )
    return tail, outside


def _layernorm_input(x: str, index: _Index) -> str | None:
    """The tensor that LayerNormalization (then Cast/Identity) turned into ``x``: a block's residual stream."""
    node = index.producer.get(x)
    while node is not None and node.op_type in ("Cast", "Identity"):
        node = index.producer.get(node.input[0])
    return node.input[0] if node is not None and node.op_type == "LayerNormalization" else None


def _is_cls_gather(node: onnx.NodeProto, index: _Index) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    indices = index.static(node.input[1]) if node.op_type == "Gather" else None
    return indices is not None and attrs.get("axis") == 1 and indices.shape == () and int(indices) == 0


def _tokenwise_operand(node: onnx.NodeProto, pos: int, value: np.ndarray) -> bool:
    if node.op_type == "MatMul":
        return pos == 1 and value.ndim == 2
    if node.op_type == "LayerNormalization":
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        return pos > 0 and axis == -1 and value.ndim == 1
    return value.ndim <= 1


def _weight(index: _Index, name: str, value: np.ndarray) -> str:
    name = index.fresh(name)
    index.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
    return name


def _linear(index: _Index, prefix: str, x: str, w: np.ndarray, b: np.ndarray) -> list[onnx.NodeProto]:
    """x @ w + b as MatMul + Add (ONNX Runtime fuses the Add into its neighbours)."""
    mm, out = index.fresh(f"{prefix}/MatMul_output"), index.fresh(f"{prefix}/output")
    return [
        helper.make_node("MatMul", [x, _weight(index, f"{prefix}/weight", w)], [mm], f"{prefix}/MatMul"),
        helper.make_node("Add", [mm, _weight(index, f"{prefix}/bias", b)], [out], f"{prefix}/Add"),
    ]


def _projection(m: _Attention, index: _Index, attn: str) -> list[onnx.NodeProto]:
    """The output projection writing the subgraph's original output name, so consumers stay as they are."""
    mm = index.fresh(f"{m.scope}/fused/out_proj/MatMul_output")
    w = _weight(index, f"{m.scope}/fused/out_proj/weight", m.out_w)
    b = _weight(index, f"{m.scope}/fused/out_proj/bias", m.out_b)
    return [
        helper.make_node("MatMul", [attn, w], [mm], f"{m.scope}/fused/out_proj/MatMul"),
        helper.make_node("Add", [mm, b], [m.y], f"{m.scope}/fused/out_proj/Add"),
    ]


def _fused_attention(m: _Attention, index: _Index, num_heads: int) -> list[onnx.NodeProto]:
    attn = index.fresh(f"{m.scope}/fused/Attention_output")
    w = _weight(index, f"{m.scope}/fused/qkv/weight", m.qkv_w)
    b = _weight(index, f"{m.scope}/fused/qkv/bias", m.qkv_b)
    node = helper.make_node(
        "Attention", [m.x, w, b], [attn], f"{m.scope}/fused/Attention", domain=CONTRIB, num_heads=num_heads
    )
    return [node, *_projection(m, index, attn)]


def _cls_attention(m: _Attention, index: _Index, num_heads: int) -> list[onnx.NodeProto]:
    """Keys and values of every token, the query of the CLS token only: output [B, 1, E]."""
    width = m.out_w.shape[0]
    (cls_slice,) = _slice_cls(m.x, index)
    q, k, v = (
        _linear(
            index,
            f"{m.scope}/fused/{name}",
            x,
            m.qkv_w[:, i * width : (i + 1) * width],
            m.qkv_b[i * width : (i + 1) * width],
        )
        for i, (name, x) in enumerate([("q", cls_slice.output[0]), ("k", m.x), ("v", m.x)])
    )
    attn = index.fresh(f"{m.scope}/fused/MultiHeadAttention_output")
    node = helper.make_node(
        "MultiHeadAttention",
        [q[-1].output[0], k[-1].output[0], v[-1].output[0]],
        [attn],
        f"{m.scope}/fused/MultiHeadAttention",
        domain=CONTRIB,
        num_heads=num_heads,
    )
    return [cls_slice, *q, *k, *v, node, *_projection(m, index, attn)]


def _slice_cls(x: str, index: _Index) -> list[onnx.NodeProto]:
    """x[:, 0:1] (keeps the token axis, so every later op sees [B, 1, E])."""
    out = index.fresh(f"{x}/cls")
    bounds = [_weight_int(index, f"{x}/cls/{n}", v) for n, v in (("starts", 0), ("ends", 1), ("axes", 1))]
    return [helper.make_node("Slice", [x, *bounds], [out], f"{x}/cls/Slice")]


def _weight_int(index: _Index, name: str, value: int) -> str:
    name = index.fresh(name)
    index.graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
    return name


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and initializers nothing reads any more (walking back from the graph outputs)."""
    producer = {o: n for n in graph.node for o in n.output}
    needed: set[str] = set()
    keep: set[int] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if (node := producer.get(name)) is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    del graph.node[:]
    graph.node.extend(nodes)
    # In place: extending a repeated field copies its messages, and the initializers are the weights.
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name not in needed]):
        del graph.initializer[i]
