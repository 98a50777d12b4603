"""DetectImages and i2p scan with the OOD score: ``ood`` and ``uncertain`` columns equal to ``Detector.predict``'s,
null on error rows and for artifacts without the OOD output (fast: the stage called outside Ray; slow: a scan on
the local Ray instance of test_ray_scan)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install 'i2p-detector[ray]')")
pa = pytest.importorskip("pyarrow", reason="the [ray] extra is not installed")
import pyarrow.parquet as pq  # noqa: E402

from i2p.runtime import Detector  # noqa: E402
from i2p.runtime.ray_scan import OUTPUT_COLUMNS, Shard, _write_shard, scan  # noqa: E402
from i2p.runtime.ray_stage import DetectImages  # noqa: E402
from tests.runtime import test_ray_scan  # noqa: E402
from tests.support.corpus import base_image, encode  # noqa: E402
from tests.support.fake_artifact import make_artifact  # noqa: E402

cluster = test_ray_scan.cluster  # the module's local Ray instance (slow test only)
OOD_THRESHOLD = 1.052  # inside the fake network's scores on these images: both flags occur


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("art")
    return make_artifact(root / "ood.i2p", ood_threshold=OOD_THRESHOLD), make_artifact(root / "old.i2p")


def images(folder: Path, n: int = 12) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        path.write_bytes(encode(base_image(24 + i % 17, 24 + i % 13, seed=i), "PNG") if i != 5 else b"broken")
        paths.append(str(path))
    return paths


def test_the_stage_adds_ood_and_uncertain_like_detector_predict(artifacts, tmp_path):
    ood_artifact, old = artifacts
    paths = images(tmp_path / "imgs")
    expected = Detector(ood_artifact).predict(paths)
    assert {p.uncertain for p in expected if p.ok} == {True, False}
    for column, values in (("path", paths), ("bytes", [Path(p).read_bytes() for p in paths])):
        out = DetectImages(model=str(ood_artifact), column=column)({column: np.array(values, object)})
        for i, want in enumerate(expected):
            if want.ok:
                assert out["ood"][i].tobytes() == np.float64(want.ood).tobytes()
                assert out["uncertain"][i] is want.uncertain
            else:
                assert np.isnan(out["ood"][i]) and out["uncertain"][i] is None and out["error"][i]
    out = DetectImages(model=str(old))({"path": np.array(paths, object)})
    assert np.isnan(out["ood"]).all() and all(u is None for u in out["uncertain"])


def test_shards_hold_the_ood_columns_and_csv_of_older_rows_stays_aligned(tmp_path):
    rows = {
        0: {"path": "a.png", "probability": 0.7, "verdict": "fake", "threshold": 0.5, "operating_point": "",
            "model_sha256": "x", "error": None, "ood": 2.5, "uncertain": True},
        1: {"path": "b.png", "probability": None, "verdict": None, "threshold": 0.5, "operating_point": "",
            "model_sha256": "x", "error": "b.png: bad", "ood": None, "uncertain": None},
        2: {"path": "c.png", "probability": 0.2, "verdict": "real", "threshold": 0.5, "operating_point": "",
            "model_sha256": "x", "error": None},  # a row read back from a shard written before the columns
    }  # fmt: skip
    shard = Shard(0, ["a.png", "b.png", "c.png"], "part-000000-abc.parquet")
    _write_shard(tmp_path, shard, rows, csv=True)
    table = pq.read_table(tmp_path / shard.name)
    assert (
        table.schema.field("ood").type == pa.float64() and table.schema.field("uncertain").type == pa.bool_()
    )
    assert table.column("ood").to_pylist() == [2.5, None, None]
    assert table.column("uncertain").to_pylist() == [True, None, None]
    lines = list(csv.reader((tmp_path / "part-000000-abc.csv").read_text().splitlines()))
    assert lines[0] == list(OUTPUT_COLUMNS) and all(len(line) == len(OUTPUT_COLUMNS) for line in lines)
    assert lines[1][-2:] == ["2.5", "True"] and lines[3][-2:] == ["", ""]


@pytest.mark.slow
def test_scan_writes_the_detector_s_ood_bits(cluster: str, artifacts, tmp_path: Path) -> None:
    ood_artifact, _ = artifacts
    paths = images(tmp_path / "imgs", 40)
    scan(paths, ood_artifact, tmp_path / "out", workers=1, batch_size=8, shard_size=20)
    rows = {
        r["path"]: r
        for part in sorted((tmp_path / "out").glob("part-*.parquet"))
        for r in pq.read_table(part).to_pylist()
    }
    assert len(rows) == len(paths)
    for want in Detector(ood_artifact).predict(paths):
        row = rows[want.source]
        assert (row["ood"], row["uncertain"]) == ((want.ood, want.uncertain) if want.ok else (None, None))
        if want.ok:
            assert np.float64(row["ood"]).tobytes() == np.float64(want.ood).tobytes()
