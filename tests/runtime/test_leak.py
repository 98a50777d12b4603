"""A short leak check: 1,000 predictions (good and bad inputs) must not grow RSS or open descriptors.

``benchmarks/leak_check.py`` runs 10,000 and prints the curve.
"""

from __future__ import annotations

import gc
from pathlib import Path

import psutil
import pytest

from i2p.runtime import Detector
from tests.support.corpus import base_image, encode
from tests.support.fake_artifact import make_artifact

RSS_BOUND_MB = 8.0  # keeping one preprocessed 3x32x32 input per prediction would add 12 MB
FD_BOUND = 0


def usage() -> tuple[float, int]:
    gc.collect()
    proc = psutil.Process()
    return proc.memory_info().rss / 2**20, proc.num_fds()


@pytest.mark.timeout(120)
def test_no_growth_over_1000_predictions(tmp_path: Path) -> None:
    det = Detector(make_artifact(tmp_path / "a.i2p"))
    good = tmp_path / "good.png"
    good.write_bytes(encode(base_image(48, 40), "PNG"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 then garbage")
    array = base_image(64, 30)
    inputs = [good, bad, array, tmp_path / "missing.png"]
    for _ in range(100):  # warm-up: allocator pools, ONNX Runtime arenas, Pillow plugins
        det.predict(inputs)
    rss0, fds0 = usage()
    for _ in range(250):
        results = det.predict(inputs)
    rss1, fds1 = usage()
    assert [r.ok for r in results] == [True, False, True, False]
    assert rss1 - rss0 < RSS_BOUND_MB, f"RSS grew {rss1 - rss0:.1f} MB over 1,000 predictions"
    assert fds1 - fds0 <= FD_BOUND, f"open descriptors grew from {fds0} to {fds1}"
