"""Parity bookkeeping: errors, decision flips, tolerances, reports, and the ONNX Runtime child process."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest

from i2p.export.ort_run import RunnerError, _failure, run_onnx
from i2p.export.parity import FAIL, NOT_RUN, PASS, Comparison, ParityReport, Tolerances
from tests.support.parity import compare_logits


def compare(ref_logit, logit, threshold=0.5, atol=0.1):
    return compare_logits(
        ref_logit,
        logit,
        model="model.fp16.onnx",
        precision="fp16",
        inputs="random",
        threshold=threshold,
        atol=atol,
    )


def test_errors_and_agreement_are_measured():
    c = compare([-2.0, 0.5, 3.0, 1.0], [-2.0, 0.52, 3.0, 0.96])
    assert c.status == PASS and c.passed
    assert c.logit.max_abs == pytest.approx(0.04, abs=1e-6)
    assert c.logit.mean_abs == pytest.approx(0.015, abs=1e-6)
    assert 0 < c.probability.max_abs < 0.04 / 4 + 1e-9
    assert c.agreement == 1.0 and c.flips == 0


def test_logit_error_beyond_tolerance_fails():
    c = compare([-2.0, 0.5, 3.0], [-2.0, 0.5, 3.5])
    assert c.status == FAIL and not c.passed
    assert "logit: max |Δ| 0.5000" in c.report() and "FAIL" in c.report()


def test_a_borderline_flip_passes_a_decisive_flip_fails():
    borderline = compare([0.01, 2.0], [-0.01, 2.0])  # probability 0.5025 -> 0.4975, inside the band
    assert borderline.flips == 1 and borderline.decisive_flips == 0 and borderline.status == PASS
    assert borderline.agreement == 0.5
    decisive = compare([0.5, 2.0], [-0.5, 2.0])  # probability 0.62 -> 0.38: beyond the band and the tolerance
    assert decisive.flips == decisive.decisive_flips == 1 and decisive.status == FAIL
    assert "1 flipped, 1 beyond the borderline band" in decisive.report()


def test_non_finite_outputs_fail_and_stay_valid_json():
    c = compare([1.0, 2.0, 3.0], [1.0, np.inf, np.nan])
    assert c.status == FAIL
    assert c.logit.nonfinite == 2 and math.isinf(c.logit.max_abs)
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert d["logit"]["max_abs"] is None and d["logit"]["nonfinite"] == 2
    assert "2 non-finite" in c.report()


def test_report_summary_and_not_run():
    ok = compare([1.0, -1.0], [1.0, -1.0])
    skipped = Comparison.not_run(
        model="model.fp16.onnx",
        precision="fp16",
        inputs="random",
        samples=2,
        reason="no FP16 kernels",
        threshold=0.5,
        tolerances=Tolerances(0.05),
    )
    report = ParityReport("PyTorch", (ok, skipped))
    assert report.passed and skipped.status == NOT_RUN
    assert "not run: no FP16 kernels" in report.report()
    assert report.summary()["model.fp16.onnx"]["status"] == NOT_RUN
    assert "not-run" in report.table()
    failed = ParityReport("PyTorch", (ok, compare([1.0], [2.0])))
    assert not failed.passed and len(failed.failures()) == 1
    assert failed.summary()["model.fp16.onnx"] == {
        "status": FAIL,
        "max_abs_logit_error": 1.0,
        "runner": "test",
    }


def test_runner_failures_are_described():
    assert "SIGSEGV" in _failure(-signal.SIGSEGV, "")
    assert _failure(1, "Traceback...\nonnxruntime.Fail: bad graph\n") == "onnxruntime.Fail: bad graph"


def test_runner_reports_a_model_it_cannot_load(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(RunnerError, match="(?i)protobuf|parse|load"):
        run_onnx(bad, np.zeros((1, 3, 8, 8), np.float32), batch=1)


def test_a_crash_retried_with_the_known_bad_optimizer_off_reads_as_information(monkeypatch, tmp_path):
    """The retry is how the runtime loads such a file: the note explains, it does not alarm."""
    from i2p.export import parity_runs

    calls = []

    def fake_run(model, images, batch, disabled):
        calls.append(disabled)
        if not disabled:
            raise RunnerError("onnxruntime crashed (SIGSEGV) while loading or running the model")
        return "result"

    monkeypatch.setattr(parity_runs, "run_onnx", fake_run)
    result, note = parity_runs.run_ort(tmp_path / "model.fp16.onnx", np.zeros((1, 3, 4, 4)), 1)
    assert result == "result" and calls == [(), ("NchwcTransformer",)]
    assert note.startswith("checked with ONNX Runtime's NchwcTransformer disabled, as the runtime loads")
    assert "SIGSEGV" in note and "rerun" not in note
