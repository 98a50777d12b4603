"""i2p-export end to end on tiny checkpoints: the artifact, manifest, parity.json, Triton, and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from i2p.base.files import sha256_file
from i2p.export.export_cli import export
from i2p.runtime.manifest import ArtifactError, read_manifest, verify_file
from tests.support.checkpoints import make_checkpoint
from tests.support.images import make_image_folder


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(export, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    else:
        assert result.exit_code != 0, result.output
    return result


def no_leftovers(folder: Path) -> None:
    """A staging directory never outlives the export."""
    assert not [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, checkpoint_l3):
    """One full export of the session's L* = 3 checkpoint: --fp16, real images for parity (one unreadable),
    a Triton repository."""
    root = tmp_path_factory.mktemp("export")
    ckpt = checkpoint_l3
    make_image_folder(root / "calib", n_per_class=2, size=(80, 64))
    (root / "calib" / "gen_a" / "0_real" / "broken.jpg").write_bytes(b"not an image")
    out = root / "det.i2p"
    result = run("--ckpt", ckpt, "--fp16", "--out", out, "--calib-images", root / "calib",
                 "--triton", root / "triton", "--max-batch", 8)  # fmt: skip
    return root, ckpt, out, result.output


def test_artifact_files_and_manifest(exported):
    root, ckpt, out, _ = exported
    m = read_manifest(out)
    # the default export adds the CPU models: fused FP32, and INT8 (its gate passed on --calib-images)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.cpu.onnx",
        "model.fp16.onnx",
        "model.int8.onnx",
        "model.onnx",
        "parity.json",
    ]
    assert set(m.files) == {
        "model.onnx",
        "model.fp16.onnx",
        "model.cpu.onnx",
        "model.int8.onnx",
        "parity.json",
    }
    for rel in m.files:
        verify_file(out, m, rel)
    assert (m.layer, m.num_layers, m.threshold, m.backbone) == (3, 4, 0.5, "i2p-tiny-vit")
    assert m.preprocess.size == 64
    assert [(t.name, t.dtype, t.shape) for t in m.inputs] == [("image", "float32", ("batch", 3, 64, 64))]
    assert [(t.name, t.dtype, t.shape) for t in m.outputs] == [
        ("logit", "float32", ("batch",)),
        ("probability", "float32", ("batch",)),
    ]
    assert [(f.path, f.precision) for f in m.models] == [
        ("model.onnx", "fp32"),
        ("model.fp16.onnx", "fp16"),
        ("model.cpu.onnx", "fp32"),
        ("model.int8.onnx", "int8"),
    ]
    assert m.extra["checkpoint"]["sha256"] == sha256_file(ckpt)
    assert m.extra["fp16"]["io_dtype"] == "float32"
    assert m.extra["compute_kept"] == "3/4 transformer blocks"
    assert {"torch", "onnx", "onnxruntime", "python"} <= set(m.tools)
    assert m.extra["parity"]["model.onnx"]["status"] == "pass"
    no_leftovers(root)


def test_tampered_file_is_caught_by_the_manifest(exported, tmp_path):
    _, _, out, _ = exported
    copy = tmp_path / "copy.i2p"
    shutil.copytree(out, copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        verify_file(copy, read_manifest(copy), "model.onnx")


def test_parity_json_covers_every_model_and_input_set(exported):
    _, _, out, output = exported
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is True
    seen = {(c["model"], c["inputs"]): c for c in parity["comparisons"]}
    assert set(seen) == {
        (f, s)
        for f in ("model.onnx", "model.fp16.onnx", "model.cpu.onnx")
        for s in ("random", "calib-images")
    } | {("model.int8.onnx", "calib-images")}  # the INT8 gate runs on real images only
    assert (
        seen[("model.onnx", "calib-images")]["samples"] == 8
    )  # 2 generators x 2 classes x 2, broken skipped
    fp32, fp16 = seen[("model.onnx", "random")], seen[("model.fp16.onnx", "random")]
    assert fp32["status"] == "pass" and fp32["logit"]["max_abs"] < 1e-4
    assert fp32["runner"].startswith("onnxruntime") and "CPUExecutionProvider" in fp32["runner"]
    # ONNX Runtime CPU runs the FP16 model here (with a workaround it records when it needs one).
    assert fp16["status"] == "pass" and 0 < fp16["logit"]["max_abs"] < 0.05
    assert fp16["agreement"] == 1.0
    assert "skipped 1 unreadable images" in output
    assert "compute kept: 3/4 transformer blocks" in output
    assert "merged == unmerged" in output and "TensorRT is not available here" in output


def test_triton_config_parses_with_tritons_protobuf(exported):
    root, _, out, _ = exported
    model_dir = (
        root / "triton" / "i2p_network"
    )  # the ensemble's network (tests/export/test_triton.py: the rest)
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("i2p_network", "onnxruntime_onnx", 8)
    assert config.HasField("dynamic_batching")
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("image", mc.TYPE_FP32, [3, 64, 64])
    assert [o.name for o in config.output] == ["logit"]
    for o in config.output:  # [batch] outputs: dims [1] reshaped to [] (Triton needs non-empty dims)
        assert o.data_type == mc.TYPE_FP32 and list(o.dims) == [1]
        assert o.HasField("reshape") and list(o.reshape.shape) == []
    assert sha256_file(model_dir / "1" / "model.onnx") == sha256_file(out / "model.fp16.onnx")


def test_json_output(tmp_path):
    ckpt = make_checkpoint(tmp_path, layer=1)
    result = CliRunner().invoke(export, ["--ckpt", str(ckpt), "--json", "--engine", "no", "--samples", "4"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["layer"] == 1 and data["num_layers"] == 4
    assert data["artifact"] == str(tmp_path / "checkpoint.i2p")
    assert set(data["files"]) == {"manifest.json", "model.onnx", "model.cpu.onnx", "parity.json"}
    assert data["parity"]["passed"] is True
    assert "loading" in result.stderr  # progress lines go to stderr


def test_failed_parity_leaves_no_artifact(tmp_path):
    ckpt = make_checkpoint(tmp_path, layer=2)
    out = tmp_path / "det.i2p"
    result = run("--ckpt", ckpt, "--fp16", "--out", out, "--samples", "4", "--atol", "fp16=1e-9", ok=False)
    assert "parity outside tolerances; no artifact written" in result.output
    assert "model.fp16.onnx [fp16] on 4 random inputs: FAIL" in result.output
    assert not out.exists()
    no_leftovers(tmp_path)


@pytest.mark.slow
def test_existing_outputs_are_replaced_only_with_force(tmp_path):
    ckpt = make_checkpoint(tmp_path, layer=1)
    out = tmp_path / "det.i2p"
    run("--ckpt", ckpt, "--out", out, "--samples", "2")
    first = sha256_file(out / "manifest.json")
    result = run("--ckpt", ckpt, "--out", out, "--samples", "2", ok=False)
    assert "already exists; pass --force" in result.output
    run("--ckpt", ckpt, "--out", out, "--samples", "3", "--force")
    assert sha256_file(out / "manifest.json") != first
    no_leftovers(tmp_path)
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    result = run("--ckpt", ckpt, "--out", precious, "--force", ok=False)
    assert "is not an output of i2p-export" in result.output
    assert (precious / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_baseline_checkpoint_exports(tmp_path):
    """UnivFD baseline: all N blocks, CLIP's ln_post + proj folded into the head's Linear."""
    ckpt = make_checkpoint(tmp_path, layer=4, baseline=True)
    run("--ckpt", ckpt, "--samples", "4")
    m = read_manifest(tmp_path / "checkpoint.i2p")
    assert (m.layer, m.num_layers) == (4, 4) and m.extra["baseline"] is True
    assert json.loads((tmp_path / "checkpoint.i2p" / "parity.json").read_text())["passed"]


def test_moved_or_wrong_backbone_is_a_clear_error(tmp_path):
    ckpt = make_checkpoint(tmp_path / "run", layer=2, weights_file=True)
    moved = tmp_path / "elsewhere.safetensors"
    (tmp_path / "run" / "backbone.safetensors").rename(moved)
    result = run("--ckpt", ckpt, "--samples", "2", ok=False)
    assert "pass --backbone PATH" in result.output
    other = (
        make_checkpoint(tmp_path / "other", layer=2, seed=1, weights_file=True).parent
        / "backbone.safetensors"
    )
    result = run("--ckpt", ckpt, "--backbone", other, "--samples", "2", ok=False)
    assert "differs from the checkpoint's backbone" in result.output
    assert not (tmp_path / "run" / "checkpoint.i2p").exists()
    run("--ckpt", ckpt, "--backbone", moved, "--samples", "2")
    assert read_manifest(tmp_path / "run" / "checkpoint.i2p").layer == 2


def test_engine_yes_without_tensorrt_fails_before_any_work(tmp_path):
    ckpt = make_checkpoint(tmp_path, layer=1)
    result = run("--ckpt", ckpt, "--engine", "yes", ok=False)
    assert "TensorRT" in result.output and "not available" in result.output
    assert "loading" not in result.output  # refused before the checkpoint was even read
    assert not (tmp_path / "checkpoint.i2p").exists()


def test_bad_tolerance_is_rejected(tmp_path):
    ckpt = make_checkpoint(tmp_path, layer=1)
    assert "expected fp32=VALUE or fp16=VALUE" in run("--ckpt", ckpt, "--atol", "bf16=1", ok=False).output
    assert "tolerances must be >= 0" in run("--ckpt", ckpt, "--atol", "fp32=-1", ok=False).output


def test_fp16_refuses_weights_beyond_the_fp16_range(tmp_path):
    ckpt = make_checkpoint(tmp_path, layer=1, delta_scale=1e6)  # merged weights far beyond 65504
    result = run("--ckpt", ckpt, "--fp16", "--samples", "2", ok=False)
    assert "beyond float16's 65504" in result.output
    assert not (tmp_path / "checkpoint.i2p").exists()


class FakeEngineBackend:
    """Stands in for the runtime's TensorRTBackend (no GPU here): writes an engine file where the runtime
    would, and computes real logits with ONNX Runtime on the staged FP16 model."""

    precision = "fp16"

    def __init__(self, artifact: Path, manifest, max_batch: int):
        import onnxruntime as ort

        self.engine_path = artifact / "engines" / "fake-gpu_sm87_trt10.3_fp16_0123456789ab.engine"
        self.engine_path.parent.mkdir()
        self.engine_path.write_bytes(b"serialized engine")
        model = verify_file(artifact, manifest, manifest.model("fp16").path)  # the manifest is already there
        self.session = ort.InferenceSession(
            str(model), providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
        )
        self.max_batch = max_batch

    def infer(self, batch):
        assert len(batch) <= self.max_batch
        return self.session.run(["logit"], {"image": batch})[0]

    def close(self):
        self.session = None


def test_engine_step_glue_with_a_fake_backend(tmp_path, monkeypatch):
    """Where TensorRT is present: the engine lands in engines/ (a cache, not in the manifest), its parity
    is recorded, and the Triton entry serves it as a TensorRT plan."""
    from i2p.export import engine as engine_step

    monkeypatch.setattr(engine_step, "available", lambda: True)
    monkeypatch.setattr(engine_step, "build", FakeEngineBackend)
    ckpt = make_checkpoint(tmp_path, layer=2)
    out = tmp_path / "det.i2p"
    run("--ckpt", ckpt, "--fp16", "--engine", "yes", "--out", out, "--samples", "5", "--max-batch", 4,
        "--triton", tmp_path / "triton")  # fmt: skip
    engine = "engines/fake-gpu_sm87_trt10.3_fp16_0123456789ab.engine"
    assert (out / engine).is_file()
    m = read_manifest(out)
    assert engine not in m.files
    assert set(m.files) == {"model.onnx", "model.fp16.onnx", "model.cpu.onnx", "parity.json"}
    verify_file(out, m, "parity.json")  # rewritten after the engine's comparison, hash updated
    parity = json.loads((out / "parity.json").read_text())
    (row,) = [c for c in parity["comparisons"] if c["model"] == engine]
    assert row["status"] == "pass" and row["samples"] == 5 and row["runner"].startswith("i2p.runtime")
    network = tmp_path / "triton" / "i2p_network"
    config = text_format.Parse((network / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.platform == "tensorrt_plan"
    assert (network / "1" / "model.plan").read_bytes() == b"serialized engine"


@pytest.mark.parametrize(
    ("targets", "files"),
    [
        ("cpu", {"model.int8.onnx"}),  # the CPU's first choice, its gate passed: one model file
        ("gpu", {"model.fp16.onnx"}),
        ("jetson,cpu", {"model.fp16.onnx", "model.int8.onnx"}),
        ("cpu,gpu,jetson,triton", {"model.onnx", "model.fp16.onnx", "model.cpu.onnx", "model.int8.onnx"}),
    ],
)
@pytest.mark.slow
def test_targets_ship_only_the_files_they_load(exported, tmp_path, targets, files):
    from i2p.runtime import Detector
    from i2p.runtime.model_files import TARGETS

    root, ckpt, _, _ = exported
    out = tmp_path / "t.i2p"
    result = run(
        "--ckpt", ckpt, "--fp16", "--out", out, "--calib-images", root / "calib", "--targets", targets
    )
    assert sorted(p.name for p in out.iterdir()) == sorted({"manifest.json", "parity.json", *files})
    m = read_manifest(out)
    assert {x.path for x in m.models} == files and set(m.files) == {"parity.json", *files}
    parity = json.loads((out / "parity.json").read_text())
    assert {c["model"] for c in parity["comparisons"]} <= files  # the record covers what is shipped
    if set(targets.split(",")) != set(TARGETS):
        assert "checked, then left out" in result.output
    if "cpu" in targets:  # and it runs where it was meant to
        with Detector(out, backend="onnxruntime") as det:
            assert det.backend.precision == "int8"


def test_targets_are_checked_before_anything_runs(exported, tmp_path):
    root, ckpt, _, _ = exported
    assert "give one or more of cpu, gpu" in run("--ckpt", ckpt, "--targets", "tpu", ok=False).output
    bad = run(
        "--ckpt", ckpt, "--out", tmp_path / "x.i2p", "--targets", "cpu", "--triton", tmp_path / "r", ok=False
    )
    assert "add triton to --targets" in bad.output and not (tmp_path / "x.i2p").exists()
