"""The OOD score through a REAL tritonserver (2.51, Python backend): the ensemble of an artifact exported from a
checkpoint with a density returns ood and uncertain equal to ``Detector.predict``'s on the same files.

Skipped, with the install command, where the server is not installed (tests/support/triton_server.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from i2p.export.triton import TritonOptions, write_repository
from i2p.runtime import Detector
from i2p.runtime.manifest import read_manifest
from i2p.runtime.remote import RemoteDetector
from tests.support.corpus import base_image, encode
from tests.support.triton_server import TritonServer, missing_reason

pytestmark = [
    pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason())),
    pytest.mark.slow,  # an export and a server start
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, artifact): an export of a tiny checkpoint with a density, its OOD threshold moved to the median of
    these images' scores (so both flags occur), behind the ensemble on the Python-backend network."""
    from i2p.export.pipeline import ExportOptions, run_export
    from tests.support.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("triton_ood")
    ckpt = make_checkpoint(root / "ckpt", layer=2, ood=True)
    artifact = run_export(
        ExportOptions(ckpt=ckpt, out=root / "det.i2p", engine="no", random_samples=4), echo=lambda _: None
    ).artifact
    predictions = Detector(artifact, backend="onnxruntime", precision="fp32").predict(files(root))
    scores = sorted(p.ood for p in predictions if p.ok)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["ood"]["threshold"] = scores[len(scores) // 2]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    write_repository(
        root / "repo", artifact, read_manifest(artifact), TritonOptions(backend="python"), force=False
    )
    server = TritonServer(root / "repo", root / "server").start()
    yield server, artifact
    server.stop()


def files(root: Path) -> list[str]:
    folder = root / "images"
    if not folder.is_dir():
        folder.mkdir()
        for i, (w, h) in enumerate([(48, 40), (32, 32), (100, 30), (31, 77), (64, 64), (200, 150)] * 2):
            fmt = "PNG" if i % 2 else "JPEG"
            (folder / f"img{i:02d}.{fmt.lower()}").write_bytes(
                encode(base_image(w, h, seed=i), fmt, quality=90)
            )
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return sorted(str(p) for p in folder.iterdir())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_ensemble_s_ood_equals_detector_predict(served, protocol, tmp_path_factory):
    server, artifact = served
    paths = files(artifact.parent)
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with RemoteDetector(url, batch_size=5, concurrency=2) as remote:
        assert remote.ood_threshold == read_manifest(artifact).ood.threshold
        got = remote.predict(paths)
    local = Detector(artifact).predict(paths)  # the Detector's own choice of model file, as the server's
    assert {p.uncertain for p in local if p.ok} == {True, False} and sum(not p.ok for p in local) == 1
    for r, lo in zip(got, local, strict=True):
        assert (r.source, r.label, r.error, r.uncertain) == (lo.source, lo.label, lo.error, lo.uncertain)
        if lo.ok:
            assert r.ood == pytest.approx(lo.ood, rel=1e-5, abs=1e-5)
        else:
            assert r.ood is None
