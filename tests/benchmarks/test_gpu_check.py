"""benchmarks.gpu_check's CPU-side logic: which checks run on which machine, how results and failures are
reported, the JSON schema and markdown, and a real run here (no GPU: every check 'not available', exit 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import Environment, Result, markdown, plan, report, run_checks
from benchmarks.gpu_runners import CheckFailed

NOTHING = Environment(packages={name: None for name in gpu_check.PACKAGES})
H200_AS_LENT = Environment(  # what the lent H200 has: cupy, torch (CUDA), CPU onnxruntime; pycuda carried
    gpu="NVIDIA H200",
    packages={"cupy": "14.2.0", "torch": "2.11.0", "open_clip": "3.3.0", "onnxruntime": "1.30.0"},
    nvcc=True,
    pycuda_gpu=True,
    cupy_gpu=True,
    torch_cuda=True,
    ort_providers=("CPUExecutionProvider",),
)


def test_without_a_gpu_nothing_runs_and_every_reason_is_given() -> None:
    reasons = plan(NOTHING)
    assert set(reasons) == set(gpu_check.REQUIREMENTS)
    assert all(reasons.values())
    assert "no NVIDIA GPU visible" in reasons["kernel-cupy"] and "cupy" in reasons["kernel-cupy"]
    assert "onnxruntime-gpu not installed" in reasons["runtime-ort-cuda"]


def test_each_check_runs_exactly_when_its_pieces_are_present() -> None:
    runs = {name for name, reason in plan(H200_AS_LENT).items() if reason is None}
    assert runs == {"kernel-pycuda", "kernel-cupy", "torch-fp16-numerics", "throughput-torch"}
    no_open_clip = Environment(**{**H200_AS_LENT.__dict__, "packages": {"torch": "2.11.0"}})
    assert "open_clip_torch is not installed" in plan(no_open_clip)["torch-fp16-numerics"]
    with_trt = Environment(**{**H200_AS_LENT.__dict__, "tensorrt": True})
    assert plan(with_trt)["runtime-tensorrt"] is None and plan(with_trt)["detect-gpu-preprocessing"] is None


def test_outcomes_pass_fail_error_and_not_available() -> None:
    def failing() -> dict:
        raise CheckFailed("not bit-exact: mixed_float16", {"mixed_float16_mismatched_bytes": 12})

    def broken() -> dict:
        raise RuntimeError("cuModuleLoad failed")

    called = []
    runners = {name: (lambda n=name: called.append(n) or {"x": 1.0}) for name in gpu_check.REQUIREMENTS}
    runners |= {"kernel-cupy": failing, "torch-fp16-numerics": broken}
    results = {r.name: r for r in run_checks(H200_AS_LENT, runners, echo=lambda _: None)}
    assert results["kernel-pycuda"].status == "pass" and results["kernel-pycuda"].figures["x"] == 1.0
    assert (
        results["kernel-cupy"].status == "fail"
        and results["kernel-cupy"].figures["mixed_float16_mismatched_bytes"] == 12
    )
    assert (
        results["torch-fp16-numerics"].status == "error"
        and "cuModuleLoad" in results["torch-fp16-numerics"].reason
    )
    assert results["runtime-tensorrt"].status == "not available" and "runtime-tensorrt" not in called
    assert all("seconds" in r.figures for r in results.values() if r.status != "not available")


def test_report_schema_and_markdown() -> None:
    results = [
        Result("kernel-cupy", "pass", figures={"batch64_float16_ms_incl_copies": 1.23456}),
        Result("torch-fp16-numerics", "error", "ValueError: x|y", {"traceback": "long"}),
        Result("runtime-tensorrt", "not available", "tensorrt is not installed"),
    ]
    rep = report(H200_AS_LENT, results, "python -m benchmarks.gpu_check", 12.34)
    assert rep["schema"] == gpu_check.SCHEMA and rep["environment"]["gpu"] == "NVIDIA H200"
    assert [c["status"] for c in rep["checks"]] == ["pass", "error", "not available"]
    json.dumps(rep)  # serializable as is
    text = markdown(rep)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(results)
    assert "1.235" in text and "long" not in text and "x/y" in text  # figures short, no traceback, no '|'


@pytest.mark.slow
def test_it_runs_here_and_says_why_each_check_is_not_available(tmp_path: Path) -> None:
    if gpu_check.probe().gpu is not None:
        pytest.skip("this machine has a GPU: the checks would run")
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {c["status"] for c in rep["checks"]} == {"not available"}
    assert all(c["reason"] for c in rep["checks"])
    assert (tmp_path / "gpu_check.md").read_text().count("not available") == len(rep["checks"])
