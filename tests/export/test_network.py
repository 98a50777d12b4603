"""Export internals on the tiny ViT: merging, the ONNX graph, dynamic batch, FP16 conversion, weight range."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto

from i2p.export.fp16 import FP16_MAX, check_fp16_range, convert_fp16
from i2p.export.network import ExportError, check_merge, deploy, largest_weight
from i2p.export.onnx_export import (
    LINEAR_MAPS_PER_BLOCK,
    check_graph,
    export_onnx,
    mha_fastpath_disabled,
    summarize_graph,
)
from i2p.export.ort_run import run_onnx
from i2p.train.backbone import build_tower
from i2p.train.checkpoint import load_model, read_checkpoint

LAYER = 3  # of checkpoint_l3 (tests/conftest.py), rank 4


@pytest.fixture(scope="module")
def images():
    return torch.randn(17, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported(checkpoint_l3, images, tmp_path_factory):
    """(unmerged logits on ``images``, merged network, model.onnx traced at batch 2)."""
    model, _ = load_model(checkpoint_l3)
    with torch.no_grad():
        unmerged = model(images)
    net = deploy(model)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(net, path, trace_batch=2)
    return unmerged, net, path


def test_merged_equals_unmerged(exported, images):
    unmerged, net, _ = exported
    with torch.no_grad():
        logits, probabilities = net(images)
    assert unmerged.abs().max() > 0.1  # a head that outputs ~0 would make the comparison vacuous
    torch.testing.assert_close(logits, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(probabilities, torch.sigmoid(unmerged))
    assert check_merge(net, images, unmerged, atol=1e-5) <= 1e-5


def test_check_merge_rejects_a_network_that_differs(exported, images):
    unmerged, net, _ = exported
    with pytest.raises(ExportError, match="changed the logits"):
        check_merge(net, images, unmerged + 1e-3, atol=1e-5)


def test_merge_removes_the_subspace_branches(checkpoint_l3):
    model, _ = load_model(checkpoint_l3)
    assert any(".delta." in n for n, _ in model.named_parameters())
    net = deploy(model)
    assert not any(".delta." in n for n, _ in net.state_dict().items())
    assert len(net.blocks) == LAYER


def test_onnx_matches_the_independent_open_clip_reference(checkpoint_l3, exported, images):
    """Merged weights computed here from the checkpoint tensors, run through open_clip's own
    forward_intermediates (CLS token at block L*), then the head: the exported ONNX must agree."""
    _, _, path = exported
    read = read_checkpoint(checkpoint_l3)
    meta, tensors = read.meta, read.tensors
    state = read.section("base.")
    for key in [k for k in tensors if k.startswith("delta.") and k.endswith(".A")]:
        name = key[len("delta.") : -len(".A")]  # e.g. "0.attn.in_proj_weight"
        u, a, v = (tensors[f"delta.{name}.{x}"] for x in "UAV")
        state[f"transformer.resblocks.{name}"] = state[f"transformer.resblocks.{name}"] + u @ a @ v.T
    tower = build_tower(meta.backbone.model).eval()  # all N blocks, the unused ones random
    tower.load_state_dict(state, strict=False)
    with torch.no_grad():
        out = tower.forward_intermediates(
            images, indices=[meta.layer - 1], output_extra_tokens=True, intermediates_only=True
        )
        cls = out["image_intermediates_prefix"][0][:, 0]
        x = F.layer_norm(cls, cls.shape[-1:], tensors["head.norm.weight"], tensors["head.norm.bias"])
        expected = (x @ tensors["head.fc.weight"].T + tensors["head.fc.bias"]).squeeze(-1)
    result = run_onnx(path, images.numpy(), batch=32)
    np.testing.assert_allclose(result.logits, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_dynamic_batch_on_an_export_traced_at_batch_2(exported, images, batch):
    unmerged, _, path = exported
    result = run_onnx(path, images[:batch].numpy(), batch=batch)
    assert result.logits.shape == result.probabilities.shape == (batch,)
    np.testing.assert_allclose(result.logits, unmerged[:batch].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.probabilities, torch.sigmoid(unmerged[:batch]).numpy(), atol=1e-5)


def test_graph_holds_l_star_plain_blocks(exported):
    _, _, path = exported
    summary = check_graph(path, LAYER)
    assert summary.blocks == LAYER
    assert summary.linear_maps == LINEAR_MAPS_PER_BLOCK * LAYER + 1  # + the head's Linear
    assert summary.ops["LayerNormalization"] == 2 * LAYER + 2  # ln_pre, 2 per block, head
    assert summary.ops["Softmax"] == LAYER
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["logit", "probability"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with pytest.raises(ExportError, match="transformer blocks instead of L\\*=4"):
        check_graph(path, LAYER + 1)


def test_check_graph_rejects_an_adapter_branch(exported, tmp_path):
    """A LoRA-style branch left beside a weight (x @ B, an extra weight MatMul) fails the check."""
    _, net, path = exported
    model = onnx.load(str(path))
    graph = model.graph
    first = next(n for n in graph.node if n.op_type == "MatMul" and "resblocks.0/mlp" in n.name)
    width = net.blocks[0].mlp.c_fc.in_features
    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((width, 4), np.float32), "adapter.B"))
    graph.node.append(onnx.helper.make_node("MatMul", [first.input[0], "adapter.B"], ["adapter.out"]))
    onnx.save(model, str(tmp_path / "adapted.onnx"))
    assert summarize_graph(model).linear_maps == LINEAR_MAPS_PER_BLOCK * LAYER + 2
    with pytest.raises(ExportError, match="weight MatMul/Gemm nodes instead of"):
        check_graph(tmp_path / "adapted.onnx", LAYER)


def test_mha_fastpath_is_restored_even_after_an_error():
    before = torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError), mha_fastpath_disabled():
        assert torch.backends.mha.get_fastpath_enabled() is False
        raise RuntimeError("boom")
    assert torch.backends.mha.get_fastpath_enabled() is before


@pytest.mark.parametrize("keep", [("LayerNormalization",), ()])
def test_fp16_model_keeps_float32_io_and_runs(exported, images, tmp_path, keep):
    unmerged, _, path = exported
    dst = tmp_path / "model.fp16.onnx"
    convert_fp16(path, dst, keep)
    model = onnx.load(str(dst))
    io = [*model.graph.input, *model.graph.output]
    assert {t.type.tensor_type.elem_type for t in io} == {TensorProto.FLOAT}
    weights = [t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    fp16 = [t for t in weights if t.data_type == TensorProto.FLOAT16]
    assert sum(np.prod(t.dims) for t in fp16) > 0.9 * sum(np.prod(t.dims) for t in weights)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}
    norm_dtypes = {dtype[n.output[0]] for n in inferred.node if n.op_type == "LayerNormalization"}
    assert norm_dtypes == {TensorProto.FLOAT if keep else TensorProto.FLOAT16}
    result = run_onnx(dst, images.numpy(), batch=32, disabled_optimizers=["NchwcTransformer"])
    assert result.logits.dtype == np.float32
    np.testing.assert_allclose(result.logits, unmerged.numpy(), atol=2e-2, rtol=0)


def test_largest_weight_and_the_fp16_range(exported):
    _, net, _ = exported
    name, value = largest_weight(net)
    assert value == max(float(t.abs().max()) for t in net.state_dict().values() if t.is_floating_point())
    assert name in net.state_dict()
    assert check_fp16_range(name, value) is None
    assert "within 1%" in check_fp16_range("w", 0.995 * FP16_MAX)
    with pytest.raises(ExportError, match="beyond float16's 65504"):
        check_fp16_range("blocks.0.attn.in_proj_weight", 70000.0)
