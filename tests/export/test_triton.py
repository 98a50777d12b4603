"""The Triton repository i2p-export writes, checked without a server: configs, wiring, files, refusals.

tests/export/test_triton_server.py serves it on a real tritonserver.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from i2p.export.network import ExportError
from i2p.export.triton import TritonOptions, write_repository
from i2p.runtime.manifest import read_manifest
from i2p.runtime.serving import VERDICT
from tests.support.fake_artifact import make_artifact

MODELS = ("i2p", "i2p_preprocess", "i2p_network", "i2p_postprocess")


def config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def write(tmp_path: Path, backend: str, force: bool = False, **kw) -> tuple[Path, list[str]]:
    artifact = tmp_path / "fake.i2p"
    if not artifact.exists():
        make_artifact(artifact, size=32, threshold=0.4)
    return write_repository(
        tmp_path / "repo", artifact, read_manifest(artifact), TritonOptions(backend=backend, **kw), force
    )


def test_the_ensemble_wires_bytes_through_every_step_to_the_verdict(tmp_path):
    ensemble, _ = write(tmp_path, "python", max_batch=16)
    repo = ensemble.parent
    assert ensemble.name == "i2p" and sorted(p.name for p in repo.iterdir()) == sorted(MODELS)
    top = config(repo, "i2p")
    assert top.platform == "ensemble" and top.max_batch_size == 16
    assert [(i.name, i.data_type, list(i.dims)) for i in top.input] == [("image", mc.TYPE_STRING, [1])]
    assert [o.name for o in top.output] == list(VERDICT)
    assert top.parameters["threshold"].string_value == "0.4"
    assert top.parameters["network"].string_value == "python"
    # Every step reads tensors that exist by then and names inputs/outputs its model declares.
    available = {"image"}
    for step in top.ensemble_scheduling.step:
        model = config(repo, step.model_name)
        assert model.max_batch_size == 16 and model.HasField("dynamic_batching")
        assert set(step.input_map) == {i.name for i in model.input}
        assert set(step.input_map.values()) <= available
        assert set(step.output_map) <= {o.name for o in model.output}
        available |= set(step.output_map.values())
    assert set(VERDICT) <= available
    assert [s.model_name for s in top.ensemble_scheduling.step] == list(MODELS[1:])


def test_python_models_ship_the_package_sources_and_import_only_the_runtime(tmp_path):
    ensemble, _ = write(tmp_path, "python")
    for model in MODELS[1:]:
        source = (ensemble.parent / model / "1" / "model.py").read_text()
        tree = ast.parse(source)
        assert any(isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel" for n in tree.body)
        imported = {
            (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        assert imported <= {"__future__", "json", "pathlib", "numpy", "triton_python_backend_utils", "i2p"}
        assert "i2p.export" not in source and "i2p.train" not in source  # the server needs no torch
        assert config(ensemble.parent, model).backend == "python"
    pre = config(ensemble.parent, "i2p_preprocess")
    assert json.loads(pre.parameters["preprocess"].string_value)["size"] == 32
    assert pre.instance_group[0].count == TritonOptions().preprocess_instances


def test_python_network_carries_the_fp32_artifact_files(tmp_path):
    ensemble, _ = write(tmp_path, "python")
    files = ensemble.parent / "i2p_network" / "1" / "artifact"
    assert sorted(p.name for p in files.iterdir()) == ["manifest.json", "model.onnx"]  # no FP16 copy
    assert config(ensemble.parent, "i2p_network").parameters["artifact"].string_value == "artifact"


def test_onnxruntime_network_serves_the_fp16_onnx_with_batch_only_logits(tmp_path):
    ensemble, _ = write(tmp_path, "onnxruntime")
    network = config(ensemble.parent, "i2p_network")
    assert (network.platform, network.default_model_filename) == ("onnxruntime_onnx", "model.onnx")
    assert [(i.name, list(i.dims)) for i in network.input] == [("image", [3, 32, 32])]
    (logit,) = network.output
    assert list(logit.dims) == [1] and list(logit.reshape.shape) == []
    served = (ensemble.parent / "i2p_network" / "1" / "model.onnx").read_bytes()
    assert served == (tmp_path / "fake.i2p" / "model.fp16.onnx").read_bytes()
    assert config(ensemble.parent, "i2p").parameters["precision"].string_value == "fp16"


def test_tensorrt_network_uses_a_built_engine_or_says_where_to_put_one(tmp_path):
    ensemble, notes = write(tmp_path, "tensorrt")
    assert config(ensemble.parent, "i2p_network").platform == "tensorrt_plan"
    assert not (ensemble.parent / "i2p_network" / "1" / "model.plan").exists()
    assert any("model.plan" in n and "docs/serving.md" in n for n in notes)
    engines = tmp_path / "fake.i2p" / "engines"
    engines.mkdir()
    (engines / "gpu_sm87_trt10.3_fp16.engine").write_bytes(b"plan")
    ensemble, _ = write(tmp_path, "auto", force=True)
    assert (ensemble.parent / "i2p_network" / "1" / "model.plan").read_bytes() == b"plan"


def test_refuses_foreign_folders_and_replaces_its_own_only_with_force(tmp_path):
    write(tmp_path, "python")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        write(tmp_path, "python")
    write(tmp_path, "onnxruntime", force=True)
    assert config(tmp_path / "repo", "i2p_network").platform == "onnxruntime_onnx"
    (tmp_path / "repo" / "i2p_postprocess" / "config.pbtxt").unlink()  # no longer ours to replace
    with pytest.raises(ExportError, match="not an output of i2p-export"):
        write(tmp_path, "python", force=True)
    with pytest.raises(ExportError, match="--triton-backend must be one of"):
        write(tmp_path, "openvino", force=True)


@pytest.mark.slow
def test_export_cli_writes_the_python_backend_repository(tmp_path):
    from i2p.export.export_cli import export
    from tests.support.checkpoints import make_checkpoint

    ckpt = make_checkpoint(tmp_path, layer=1)
    args = ["--ckpt", ckpt, "--engine", "no", "--samples", "2", "--triton", tmp_path / "repo",
            "--triton-backend", "python", "--max-batch", 4]  # fmt: skip
    result = CliRunner().invoke(export, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "Triton ensemble: " in result.output and "network on python" in result.output
    assert config(tmp_path / "repo", "i2p").max_batch_size == 4
    artifact = tmp_path / "repo" / "i2p_network" / "1" / "artifact"
    assert read_manifest(artifact).threshold == read_manifest(tmp_path / "checkpoint.i2p").threshold
