"""model.int8.onnx: dynamic INT8 of the weight MatMuls, kept only when the decision gate passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from i2p.export import quantize
from i2p.export.cpu_optimize import CPU_ONNX
from i2p.export.parity import DEFAULT_ATOL, FAIL, PASS, Comparison
from i2p.export.parity_inputs import CALIB
from i2p.export.pipeline import ExportOptions, ExportResult, run_export
from i2p.runtime import ArtifactError, Detector
from i2p.runtime.manifest import read_manifest
from tests.support.parity import compare_logits

V0_MODEL = Path(__file__).parents[1] / "fixtures" / "v0" / "artifact" / "model.onnx"


@pytest.fixture
def fp32(tmp_path: Path) -> Path:
    """A real exported FP32 detector (the v0 fixture's tiny ViT) in a scratch folder."""
    return Path(shutil.copy(V0_MODEL, tmp_path / "model.cpu.onnx"))


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logit"], {session.get_inputs()[0].name: x})[0]


def comparison(reference: np.ndarray, candidate: np.ndarray, threshold: float = 0.5, atol: float = 0.2):
    return compare_logits(
        reference,
        candidate,
        model=quantize.INT8_ONNX,
        precision="int8",
        inputs="calib-images",
        threshold=threshold,
        atol=atol,
    )


def test_quantizable_nodes_are_the_block_weight_matmuls_not_the_head(fp32):
    model = onnx.load(str(fp32))
    nodes = quantize.quantizable_nodes(model)
    assert nodes and all(b is not None for b in nodes.values())
    head = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and "head" in n.name]
    assert head and not set(head) & set(nodes)


def test_int8_file_holds_integer_kernels_and_stays_close(fp32, tmp_path):
    dst = tmp_path / quantize.INT8_ONNX
    quantize.quantize_int8(fp32, dst, list(quantize.quantizable_nodes(onnx.load(str(fp32)))))
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert {"LayerNormalization", "Softmax"} <= ops  # kept in FP32
    x = np.random.default_rng(0).standard_normal((6, 3, 64, 64), dtype=np.float32)
    ref, got = logits(fp32, x), logits(dst, x)
    assert not np.array_equal(ref, got)
    np.testing.assert_allclose(got, ref, atol=0.25)


def test_gate_fails_below_the_agreement_floor_even_within_tolerance():
    ref = np.linspace(-1, 1, 200).astype(np.float32)
    near = ref.copy()
    near[[99, 100]] = -near[[99, 100]]  # two flips right at the threshold: within the band
    c = comparison(ref, near)
    assert c.decisive_flips == 0 and c.flips == 2
    gated = quantize.gate(c, max_mean_error=0.1, min_agreement=0.995)
    assert gated.status == FAIL and "agreement 0.9900 < 0.995" in gated.note
    assert quantize.gate(c, max_mean_error=0.1, min_agreement=0.99).status == PASS


def test_gate_passes_large_single_errors_without_flips_and_says_which_conditions_applied():
    ref = np.concatenate([np.linspace(-8, -2, 50), np.linspace(2, 8, 50)]).astype(np.float32)
    noisy = ref + np.where(np.arange(100) % 10 == 0, 1.2, 0.0).astype(np.float32)  # 10 images off by 1.2
    c = comparison(ref, noisy, atol=0.25)
    assert c.status == FAIL and c.logit.max_abs > 0.25  # the plain parity check rejects it
    gated = quantize.gate(c, max_mean_error=0.1 * float(ref.std()))
    assert gated.status == PASS and "max |Δlogit| not gated" in gated.note and gated.note.endswith("passed")
    assert "agreement >= 0.99" in gated.note and "0 decisive flips" in gated.note
    # the table says so on the row itself: the large max is on record, the gate's own limit is shown
    assert c.row()["limit"] == "max 0.25" and "not gated" not in c.row()["max|Δlogit|"]
    assert gated.row()["max|Δlogit|"] == "1.2000 (not gated)" and gated.row()["limit"].startswith("mean ")
    assert "\n  info: INT8 gate" in gated.report() and "\n  note:" not in gated.report()


@pytest.mark.parametrize(
    ("shift", "failed"),
    [
        (np.r_[np.zeros(99), 6.0], "1 decisive flips"),  # one confident real image becomes fake
        (np.full(100, 0.9), "mean |Δlogit| 0.9 > 0.5"),  # no flip, but the scores drifted: broken
        (np.r_[np.zeros(99), np.nan], "1 non-finite outputs"),
    ],
)
def test_gate_drops_decisive_flips_drift_and_non_finite_outputs(shift, failed):
    ref = np.concatenate([np.linspace(-8, -3, 50), np.linspace(3, 8, 50)]).astype(np.float32)
    ref[-1] = -5.0  # a confident "real" image for the decisive flip
    gated = quantize.gate(comparison(ref, ref + shift.astype(np.float32), atol=0.25), max_mean_error=0.5)
    assert gated.status == FAIL and failed in gated.note


def calibration(x: np.ndarray, ref: np.ndarray) -> quantize.Calibration:
    return quantize.Calibration(images=x, reference_logits=ref)


def test_add_int8_model_keeps_a_passing_file(fp32):
    x = np.random.default_rng(1).standard_normal((8, 3, 64, 64), dtype=np.float32)
    ref = logits(fp32, x)
    decision = quantize.add_int8_model(
        fp32, lambda p: comparison(ref, logits(p, x), atol=0.5), calibration(x, ref)
    )
    assert decision.kept and decision.fp32_blocks == ()
    assert (fp32.parent / quantize.INT8_ONNX).is_file() and not list(fp32.parent.glob(".*"))
    assert "agreement 1.0000" in decision.note and "SmoothQuant alpha 0.5 on 3 inputs" in decision.note


def test_a_model_with_corrupted_weights_is_dropped(fp32, tmp_path):
    x = np.random.default_rng(1).standard_normal((16, 3, 64, 64), dtype=np.float32)
    ref = logits(fp32, x)
    model = onnx.load(str(fp32))
    rng = np.random.default_rng(2)
    weights = {n.input[1] for n in model.graph.node if n.name in quantize.quantizable_nodes(model)}
    for t in model.graph.initializer:  # what a bad conversion could do: block weights of the wrong scale
        if t.name in weights:
            w = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(rng.standard_normal(w.shape).astype(w.dtype) * 3, t.name))
    broken = tmp_path / "broken" / CPU_ONNX
    broken.parent.mkdir()
    onnx.save(model, str(broken))
    assert np.abs(logits(broken, x) - ref).mean() > 1  # the corruption matters
    decision = quantize.add_int8_model(
        broken, lambda p: comparison(ref, logits(p, x), atol=0.25), calibration(x, ref)
    )
    assert not decision.kept and not (broken.parent / quantize.INT8_ONNX).exists()
    assert all(c.status == FAIL for c in decision.comparisons)
    assert all(
        "failed:" in c.note and "mean |Δlogit|" in c.note.split("failed:")[1] for c in decision.comparisons
    )


def test_a_failing_candidate_tries_fp32_blocks_then_is_dropped_and_recorded(fp32):
    seen: list[Path] = []

    def never(path: Path) -> Comparison:
        seen.append(path)
        ref = np.zeros(4, np.float32)
        return comparison(ref, ref + 5.0)  # every decision flips, far from the threshold

    x = np.zeros((2, 3, 64, 64), np.float32)
    decision = quantize.add_int8_model(fp32, never, calibration(x, np.zeros(2, np.float32)))
    assert not decision.kept and not (fp32.parent / quantize.INT8_ONNX).exists()
    assert "dropped" in decision.note and decision.fp32_blocks
    blocks = {b for b in quantize.quantizable_nodes(onnx.load(str(fp32))).values()}
    # all in INT8, each block alone (sensitivity), then FP32 blocks added one at a time
    assert len(seen) == 1 + len(blocks) + len(decision.fp32_blocks)
    assert all(c.status == FAIL for c in decision.comparisons)
    assert not list(fp32.parent.glob(".*probe*"))


def test_errors_drop_the_file_with_a_note(fp32):
    def broken(path: Path) -> Comparison:
        raise RuntimeError("runner died")

    x = np.zeros((2, 3, 64, 64), np.float32)
    decision = quantize.add_int8_model(fp32, broken, calibration(x, np.zeros(2, np.float32)))
    assert not decision.kept and "runner died" in decision.note
    assert not (fp32.parent / quantize.INT8_ONNX).exists()


# -- i2p-export (defaults) and the Detector -----------------------------------------------------------------


# -- the default export: checkpoint_l2, calibration_images and export_l2 are in tests/conftest.py ---------


def test_default_export_writes_the_cpu_and_int8_models_and_records_the_gate(export_l2: ExportResult) -> None:
    result = export_l2
    m = read_manifest(result.artifact)
    assert [x.path for x in m.models] == ["model.onnx", CPU_ONNX, quantize.INT8_ONNX]
    assert m.models[-1] == quantize.INT8_MODEL and m.files[quantize.INT8_ONNX]
    parity = json.loads((result.artifact / "parity.json").read_text())
    (gate,) = [c for c in parity["comparisons"] if c["model"] == quantize.INT8_ONNX]
    assert gate["inputs"] == CALIB and gate["samples"] == 24 and gate["status"] == "pass"
    assert gate["agreement"] >= quantize.MIN_AGREEMENT and gate["tolerances"]["logit_atol"] == 0.25
    assert "INT8 gate: agreement >= 0.99, 0 decisive flips" in gate["note"] and gate["note"].endswith(
        "passed"
    )
    assert parity["rejected"] == [] and any(n.startswith(quantize.INT8_ONNX) for n in result.notes)


def test_detector_picks_int8_on_the_cpu_unless_fp32_is_forced(export_l2: ExportResult) -> None:
    result = export_l2
    x = np.random.default_rng(3).standard_normal((5, 3, 64, 64), dtype=np.float32)
    with Detector(result.artifact) as det, Detector(result.artifact, precision="fp32") as fp32:
        assert det.backend.model_path.name == quantize.INT8_ONNX and det.backend.precision == "int8"
        assert fp32.backend.model_path.name == CPU_ONNX and fp32.backend.precision == "fp32"
        np.testing.assert_allclose(det.predict_batch(x), fp32.predict_batch(x), atol=0.25 / 4)
    with Detector(result.artifact, precision="int8") as det:
        assert det.backend.model_path.name == quantize.INT8_ONNX


def test_no_cpu_and_no_calibration_images_mean_no_int8(checkpoint_l2: Path, tmp_path: Path) -> None:
    ckpt = checkpoint_l2
    plain = run_export(
        ExportOptions(
            ckpt=ckpt, out=tmp_path / "plain.i2p", engine="no", random_samples=4, cpu=False, int8=False
        ),
        echo=lambda _: None,
    )
    assert [x.path for x in read_manifest(plain.artifact).models] == ["model.onnx"]
    with Detector(plain.artifact) as det:
        assert det.backend.model_path.name == "model.onnx"
    with pytest.raises(ArtifactError, match="no int8 CPU model"):
        Detector(plain.artifact, precision="int8")
    uncalibrated = run_export(
        ExportOptions(ckpt=ckpt, out=tmp_path / "nocalib.i2p", engine="no", random_samples=4),
        echo=lambda _: None,
    )
    assert [x.path for x in read_manifest(uncalibrated.artifact).models] == ["model.onnx", CPU_ONNX]
    assert any("--calib-images" in n for n in uncalibrated.notes)


@pytest.mark.slow
def test_a_dropped_int8_model_is_recorded_but_does_not_fail_the_export(
    checkpoint_l2: Path, calibration_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = checkpoint_l2
    monkeypatch.setattr(quantize, "MAX_MEAN_ERROR", 0.0)
    atol = {**DEFAULT_ATOL, "int8": 0.0}  # no error allowed: any INT8 rounding fails the gate
    result = run_export(
        ExportOptions(
            ckpt=ckpt,
            out=tmp_path / "strict.i2p",
            engine="no",
            random_samples=4,
            calib_images=calibration_images,
            atol=atol,
        ),
        echo=lambda _: None,
    )
    assert quantize.INT8_ONNX not in [x.path for x in result.manifest.models]
    assert not (result.artifact / quantize.INT8_ONNX).exists() and result.parity.passed
    parity = json.loads((result.artifact / "parity.json").read_text())
    assert parity["passed"] and parity["rejected"] and all(c["status"] == "fail" for c in parity["rejected"])
    assert all("mean |Δlogit|" in c["note"] and "failed:" in c["note"] for c in parity["rejected"])
    assert any("dropped" in n for n in result.notes)
