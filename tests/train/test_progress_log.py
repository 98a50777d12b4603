"""Training left in a log file reports itself: estimates with ETA, and a final time that covers the whole run."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.training import TINY, training_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return training_folder(tmp_path_factory, n_per_class=8)


@pytest.mark.slow
def test_train_into_a_log_prints_estimates_and_the_whole_run_time(tmp_path: Path, data_dir: Path) -> None:
    """`i2p-train ... > train.log 2>&1`: neither stream is a terminal; each line is timed as it arrives."""
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "i2p.cli",
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--epochs",
        "2",
    ]
    proc = subprocess.Popen([*args, *TINY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    assert proc.wait(timeout=300) == 0, "\n".join(line for _, line in timed)
    text = "\n".join(line for _, line in timed)
    for stage in ("stage 1: calibration features", "stage 1: validation features", "epoch 1/2", "epoch 2/2"):
        estimate = [line for line in text.splitlines() if line.startswith(stage) and "ETA" in line]
        assert estimate, f"no line with an ETA for {stage!r} in:\n{text}"
    assert "\r" not in text and "\x1b[" not in text  # no terminal redraws in a log
    pattern = r"this run took (\S+) \(start-up (\S+), data (\S+), stage 1 (\S+), stage 2 (\S+)\)"
    final = re.search(pattern, text)
    assert final, text
    total = _seconds(final.group(1))
    assert abs(total - sum(_seconds(final.group(i)) for i in (2, 3, 4, 5))) <= 2
    first = timed[0][0]
    last = next(t for t, line in timed if "this run took" in line)
    assert total >= last - first - 1  # at least everything the log shows, stage 1 included
    assert f"next: i2p-export --ckpt {out / 'checkpoint.safetensors'}" in text
    assert "layer_importance.png" in text


def _seconds(text: str) -> float:
    """``1m15s`` / ``3.2s`` / ``1h02m`` -> seconds."""
    parts = re.findall(r"([\d.]+)([hms])", text)
    assert parts, text
    return sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "sig"),
    [("data:", signal.SIGTERM), ("stage 1: calibration features", signal.SIGTERM), ("data:", signal.SIGINT)],
)
def test_a_signal_unwinds_and_leaves_no_empty_out(
    tmp_path: Path, data_dir: Path, when: str, sig: int
) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "i2p.cli", "train", "--data", str(data_dir), "--out", str(out), *TINY]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(when):
            assert out.is_dir()  # the run made it
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + sig, "".join(seen) + rest
    assert "Traceback" not in rest and not out.exists()
    assert "No potential checkpoint path" not in "".join(seen) + rest  # open_clip's INFO lines stay out
