"""TensorRT 8.5 has no ONNX LayerNormalization importer (8.6 added one): rewrite it into elementary ops."""

from __future__ import annotations

import numpy as np

from .api import EngineBuildError


def decompose_layernorm(model_bytes: bytes) -> bytes:
    """Rewrite ONNX LayerNormalization (last axis) into ReduceMean/Sub/Mul/Add/Sqrt/Div for TensorRT 8.5.

    TensorRT 8.5's ONNX parser has no LayerNormalization importer (8.6 added one). The new nodes are
    named ``<node>/LayerNorm/<step>`` so that ``build.keep_fp32`` finds them. Needs the ``onnx`` package.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise EngineBuildError(
            "TensorRT < 8.6 cannot parse ONNX LayerNormalization; pip install onnx so that i2p can "
            "rewrite it into elementary ops"
        ) from e
    model = onnx.load_from_string(model_bytes)
    if any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in model.opset_import):
        raise EngineBuildError(
            "LayerNormalization rewrite supports opset 17 (ReduceMean axes as an attribute)"
        )
    graph = model.graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "LayerNormalization":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            attrs.get("axis", -1) != -1
            or attrs.get("stash_type", 1) != 1
            or len([o for o in node.output if o]) != 1
        ):
            raise EngineBuildError(
                f"LayerNormalization {node.name!r}: only axis=-1 with one output can be rewritten"
            )
        x, scale, bias = (list(node.input) + [""])[:3]
        p = f"{node.name or node.output[0]}/LayerNorm"
        eps = numpy_helper.from_array(
            np.asarray(attrs.get("epsilon", 1e-5), helper.tensor_dtype_to_np_dtype(dtypes.get(scale, 1))),
            f"{p}/epsilon",
        )
        graph.initializer.append(eps)
        y = node.output[0]
        nodes += [
            helper.make_node("ReduceMean", [x], [f"{p}/mean"], f"{p}/mean", axes=[-1], keepdims=1),
            helper.make_node("Sub", [x, f"{p}/mean"], [f"{p}/centered"], f"{p}/centered"),
            helper.make_node("Mul", [f"{p}/centered", f"{p}/centered"], [f"{p}/squared"], f"{p}/squared"),
            helper.make_node("ReduceMean", [f"{p}/squared"], [f"{p}/var"], f"{p}/var", axes=[-1], keepdims=1),
            helper.make_node("Add", [f"{p}/var", eps.name], [f"{p}/var_eps"], f"{p}/var_eps"),
            helper.make_node("Sqrt", [f"{p}/var_eps"], [f"{p}/std"], f"{p}/std"),
            helper.make_node("Div", [f"{p}/centered", f"{p}/std"], [f"{p}/normed"], f"{p}/normed"),
            helper.make_node("Mul", [f"{p}/normed", scale], [f"{p}/scaled" if bias else y], f"{p}/scaled"),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [f"{p}/scaled", bias], [y], f"{p}/shifted"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()
