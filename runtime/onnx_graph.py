"""What an ONNX file declares, read straight from its protobuf bytes, before ONNX Runtime sees it.

The lean runtime has no ``onnx`` package (numpy, Pillow, onnxruntime, click), and a hostile file must be
judged before ONNX Runtime spends time on it, so this is a small protobuf wire-format reader of the few
fields the checks need (``model_check``): the graph's inputs and outputs (name, element type, dims),
each node's op and domain, how many initializers there are, and the things the runtime refuses outright:
subgraphs (control flow), model-local functions, training graphs, and tensors whose bytes live in
another file (``data_location = EXTERNAL``). Weight bytes are skipped by their length, never copied, and
the walk stops past its caps on nodes and initializers, so reading costs little whatever the file holds.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

# TensorProto.DataType numbers -> numpy names (those a detector's I/O can have; the rest by number).
ELEM_TYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class OnnxFormatError(ValueError):
    """The bytes are not a readable ONNX model (truncated, not protobuf, an unsupported layout)."""


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output: element type (numpy name, or ``"type N"``) and dims (int, name or None)."""

    name: str
    dtype: str | None  # None: not a tensor (sequence, map, optional ...)
    dims: tuple[int | str | None, ...] | None  # None: no shape declared


@dataclass
class OnnxGraph:
    """The parts of a model the runtime checks; counts stop growing once they pass the reader's limit."""

    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[ValueInfo] = field(default_factory=list)
    ops: list[tuple[str, str]] = field(default_factory=list)  # (domain, op_type) per node, "" = ai.onnx
    initializers: set[str] = field(default_factory=set)  # their names (graph inputs may repeat them)
    initializer_count: int = 0
    subgraphs: list[str] = field(default_factory=list)  # "op 'name'" of each node with a graph attribute
    external: list[str] = field(default_factory=list)  # names of tensors with data in another file
    functions: int = 0  # model-local FunctionProtos
    training: bool = False  # a TrainingInfoProto (graphs run by training runtimes)
    over_limit: str | None = None  # "nodes" or "initializers" when the walk stopped early


# -- the wire format ------------------------------------------------------------------------------------


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxFormatError("a truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of the message in buf[start:end].

    Length-delimited fields give their byte range; varints their value; fixed-width ones are skipped.
    """
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise OnnxFormatError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise OnnxFormatError("a field runs past the end of its message (truncated file?)")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise OnnxFormatError("a truncated fixed-width field")
        else:  # 3/4: protobuf groups, never written by ONNX
            raise OnnxFormatError(f"wire type {wire} (protobuf groups) is not ONNX")


def _text(buf: memoryview, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxFormatError("a name that is not UTF-8") from None


# -- the messages ---------------------------------------------------------------------------------------


def read_graph(path: str | os.PathLike, max_nodes: int, max_initializers: int) -> OnnxGraph:
    """The summary of the ONNX model at ``path``; the walk stops (``over_limit``) past either cap."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OnnxFormatError("an empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return parse_model(buf, max_nodes, max_initializers)
            finally:
                buf.release()


def parse_model(buf: memoryview, max_nodes: int, max_initializers: int) -> OnnxGraph:
    """ModelProto: graph = 7, training_info = 20, functions = 25."""
    graph = OnnxGraph()
    seen_graph = False
    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if number == 7 and wire == 2:
            _graph(buf, a, b, graph, max_nodes, max_initializers)
            seen_graph = True
        elif number == 20:
            graph.training = True
        elif number == 25:
            graph.functions += 1
    if not seen_graph:
        raise OnnxFormatError("no graph in the model")
    return graph


def _graph(buf: memoryview, start: int, end: int, g: OnnxGraph, max_nodes: int, max_inits: int) -> None:
    """GraphProto: node = 1, initializer = 5, input = 11, output = 12, sparse_initializer = 15."""
    for number, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == 1:
            if len(g.ops) >= max_nodes:
                g.over_limit = "nodes"
                return
            g.ops.append(_node(buf, a, b, g))
        elif number in (5, 15):
            if g.initializer_count >= max_inits:
                g.over_limit = "initializers"
                return
            g.initializer_count += 1
            g.initializers.add(_tensor(buf, a, b, g) if number == 5 else _sparse_tensor(buf, a, b, g))
        elif number in (11, 12):
            (g.inputs if number == 11 else g.outputs).append(_value_info(buf, a, b))


def _node(buf: memoryview, start: int, end: int, g: OnnxGraph) -> tuple[str, str]:
    """NodeProto: name = 3, op_type = 4, attribute = 5, domain = 7."""
    name = op = domain = ""
    graph_attr = False
    for number, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == 3:
            name = _text(buf, a, b)
        elif number == 4:
            op = _text(buf, a, b)
        elif number == 7:
            domain = _text(buf, a, b)
        elif number == 5:
            graph_attr |= _attribute(buf, a, b, g)
    if graph_attr:
        g.subgraphs.append(f"{op} {name!r}")
    return ("" if domain == "ai.onnx" else domain), op


def _attribute(buf: memoryview, start: int, end: int, g: OnnxGraph) -> bool:
    """AttributeProto: t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor(s) = 22/23. True if it holds a graph."""
    holds_graph = False
    for number, wire, a, b in _fields(buf, start, end):
        if wire != 2:
            continue
        if number in (6, 11):
            holds_graph = True
        elif number in (5, 10):
            _tensor(buf, a, b, g)
        elif number in (22, 23):
            _sparse_tensor(buf, a, b, g)
    return holds_graph


def _tensor(buf: memoryview, start: int, end: int, g: OnnxGraph) -> str:
    """TensorProto: name = 8, external_data = 13, data_location = 14; its data fields are skipped."""
    name, external = "", False
    for number, wire, a, b in _fields(buf, start, end):
        if number == 8 and wire == 2:
            name = _text(buf, a, b)
        elif number == 13 or number == 14 and wire == 0 and a == EXTERNAL:
            external = True
    if external:
        g.external.append(name)
    return name


def _sparse_tensor(buf: memoryview, start: int, end: int, g: OnnxGraph) -> str:
    """SparseTensorProto: values = 1, indices = 2 (both TensorProto); named by its values."""
    name = ""
    for number, wire, a, b in _fields(buf, start, end):
        if number in (1, 2) and wire == 2:
            tensor = _tensor(buf, a, b, g)
            name = tensor if number == 1 else name
    return name


def _value_info(buf: memoryview, start: int, end: int) -> ValueInfo:
    """ValueInfoProto: name = 1, type = 2 (TypeProto: tensor_type = 1 -> elem_type = 1, shape = 2)."""
    name, dtype, dims = "", None, None
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == 2:
            name = _text(buf, a, b)
        elif number == 2 and wire == 2:
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if n2 == 1 and w2 == 2:  # TypeProto.Tensor; sequence, map, optional ... stay None
                    dtype, dims = _tensor_type(buf, a2, b2)
    return ValueInfo(name, dtype, dims)


def _tensor_type(buf: memoryview, start: int, end: int) -> tuple[str, tuple[int | str | None, ...] | None]:
    elem, dims = 0, None
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == 0:
            elem = a
        elif number == 2 and wire == 2:  # TensorShapeProto: dim = 1
            dims = tuple(_dim(buf, a2, b2) for n2, w2, a2, b2 in _fields(buf, a, b) if n2 == 1 and w2 == 2)
    return ELEM_TYPES.get(elem, f"type {elem}"), dims


def _dim(buf: memoryview, start: int, end: int) -> int | str | None:
    """Dimension: dim_value = 1 (int64), dim_param = 2 (a name); neither: unknown."""
    value: int | str | None = None
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == 0:
            value = a - (1 << 64) if a >= 1 << 63 else a
        elif number == 2 and wire == 2:
            value = _text(buf, a, b)
    return value
