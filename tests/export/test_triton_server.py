"""The exported Triton repository on a REAL tritonserver (2.51 from the nvidia-pytriton wheel).

The network runs on the Python backend (this build has no ONNX Runtime or TensorRT backend), through the
runtime's ONNX Runtime backend, so results must equal ``Detector.predict`` on the same files. Skipped,
with the install command, where the wheel is not installed (tests/support/triton_server.py).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from i2p.export.triton import TritonOptions, write_repository
from i2p.runtime import Detector
from i2p.runtime.detect_cli import detect
from i2p.runtime.manifest import read_manifest
from i2p.runtime.preprocess import PreprocessSpec
from i2p.runtime.remote import RemoteDetector, ServerError
from tests.support.concurrency import run_in_threads
from tests.support.corpus import base_image, encode, make_bad_corpus
from tests.support.fake_artifact import make_artifact
from tests.support.triton_server import TritonServer, free_port, missing_reason

# slow: every module run starts a real tritonserver and stops it, and one test restarts it
pytestmark = [
    pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason())),
    pytest.mark.slow,
]

CLIENTS, REQUESTS = 8, 200


def assert_same(remote, local, atol: float = 1e-6) -> None:
    """Row for row: the same source, label and error; probabilities within ``atol``."""
    assert len(remote) == len(local)
    for r, lo in zip(remote, local, strict=True):
        assert (r.source, r.label, r.error) == (lo.source, lo.label, lo.error)
        if lo.ok:
            assert abs(r.probability - lo.probability) <= atol, (r, lo)


# Every preprocessing field the non-CLIP backbone families change (issue 23), in one more ensemble of the
# same server: SigLIP 2's and PE-Core's squash resize, PE-Core's bilinear filter, EVA-02's crop fraction.
FAMILY_MODE = "i2p_families"
FAMILY_SPEC = PreprocessSpec(size=32, resize="squash", interpolation="bilinear", crop_pct=0.9)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, artifact): the fake-but-real ONNX artifact behind the ensemble, Python-backend network.

    The same repository also holds the ensemble ``FAMILY_MODE``, serving ``<FAMILY_MODE>.i2p``.
    """
    root = tmp_path_factory.mktemp("triton")
    artifact = make_artifact(root / "fake.i2p", size=32, threshold=0.3)
    opts = TritonOptions(backend="python", max_batch=16)
    write_repository(root / "repo", artifact, read_manifest(artifact), opts, force=False)
    other = make_artifact(root / f"{FAMILY_MODE}.i2p", threshold=0.3, preprocess=FAMILY_SPEC)
    mode = TritonOptions(backend="python", max_batch=16, name=FAMILY_MODE, preprocess_instances=1)
    write_repository(root / "repo", other, read_manifest(other), mode, force=False)
    server = TritonServer(root / "repo", root / "server").start()
    yield server, artifact
    server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """JPEG and PNG files of several sizes and aspect ratios (the resize and crop paths differ)."""
    root = tmp_path_factory.mktemp("images")
    files = []
    for i, (w, h) in enumerate([(48, 40), (32, 32), (100, 30), (31, 77), (64, 64), (200, 150)] * 3):
        path = root / f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        path.write_bytes(encode(base_image(w, h, seed=i), "PNG" if i % 2 else "JPEG", quality=90))
        files.append(path)
    return files


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_results_equal_detector_predict(served, images, protocol):
    server, artifact = served
    url = server.grpc_url if protocol == "grpc" else server.http_url
    files = [str(p) for p in images]
    with RemoteDetector(url, batch_size=5, concurrency=3) as remote:
        assert remote.threshold == 0.3 and remote.scorer.precision == "fp32"
        got = remote.predict(files)
    expected = Detector(artifact).predict(files)
    assert all(p.ok for p in expected) and {p.label for p in expected} == {"real", "fake"}
    assert_same(got, expected)


def test_the_families_preprocessing_equals_detector_predict(served, images):
    """The preprocess model applies the manifest's resize mode, filter and crop fraction as the runtime does."""
    server, artifact = served
    files = [str(p) for p in images]
    with RemoteDetector(server.grpc_url, model=FAMILY_MODE, batch_size=5) as remote:
        got = remote.predict(files)
    expected = Detector(artifact.with_name(f"{FAMILY_MODE}.i2p")).predict(files)
    assert_same(got, expected)
    clip_mode = Detector(artifact).predict(files)  # same weights, CLIP preprocessing: other numbers
    assert max(abs(a.probability - b.probability) for a, b in zip(got, clip_mode, strict=True)) > 1e-4


def test_hostile_files_are_error_rows_and_the_model_stays_up(served, tmp_path, images):
    server, artifact = served
    cases = make_bad_corpus(tmp_path / "corpus")
    files = [str(tmp_path / "corpus" / name) for name in sorted(cases)]
    stubs = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}
    with RemoteDetector(server.grpc_url, batch_size=8, concurrency=2) as remote:
        got = remote.predict(files)
        bad = [g for g, name in zip(got, sorted(cases), strict=True) if cases[name].error]
        assert bad and all(g.error and g.error.startswith(g.source + ": ") for g in bad)
        for g, name in zip(got, sorted(cases), strict=True):
            if cases[name].error:
                assert cases[name].error in g.error, (name, g.error)
        assert_same(got, Detector(artifact).predict(files))
        assert server.ready()  # and no model instance died (and was restarted) on the way:
        assert {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)} == stubs
        after = remote.predict([str(images[0]), b"\xff\xd8\xff garbage", b""])
    assert after[0].ok and after[1].error.startswith("<") and after[2].error == "<0 bytes>: empty file"


def test_eight_concurrent_clients_lose_and_duplicate_nothing(served, tmp_path):
    """8 clients (gRPC and HTTP) x 200 one-image requests, each image distinct: every answer is its own."""
    server, artifact = served
    total = CLIENTS * REQUESTS
    blobs = [encode(base_image(24 + i % 17, 24 + i % 13, seed=i), "PNG") for i in range(total)]
    expected = [p.probability for p in Detector(artifact).predict(blobs)]
    assert len(set(expected)) == total  # a swapped answer cannot go unnoticed

    def client(k: int) -> list[float | str | None]:
        url = server.grpc_url if k % 2 else server.http_url
        with RemoteDetector(url, batch_size=1, concurrency=1) as remote:
            answers = []
            for j in range(REQUESTS):
                (p,) = remote.predict([blobs[k * REQUESTS + j]])
                answers.append(p.probability if p.ok else p.error)
            return answers

    got = [p for answers in run_in_threads(client, CLIENTS, threads=CLIENTS) for p in answers]
    assert len(got) == total
    np.testing.assert_allclose(np.array(got, dtype=np.float64), expected, rtol=0, atol=1e-6)


def test_detect_cli_with_server_writes_the_same_csv_as_local(served, images, tmp_path):
    server, artifact = served
    folder = images[0].parent
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    runner = CliRunner()
    local = runner.invoke(detect, [str(folder), "-m", str(artifact), "--csv", str(tmp_path / "local.csv")])
    remote = runner.invoke(
        detect,
        [str(folder), "--server", server.grpc_url, "--csv", str(tmp_path / "remote.csv"), "--workers", "3"],
    )
    assert local.exit_code == 0 and remote.exit_code == 0, (local.output, remote.output)
    rows = [
        list(csv.DictReader((tmp_path / f"{n}.csv").read_text().splitlines())) for n in ("local", "remote")
    ]
    assert len(rows[0]) == len(images) + 1 and [r["path"] for r in rows[0]] == [r["path"] for r in rows[1]]
    for lo, r in zip(*rows, strict=True):
        assert (lo["label"], lo["error"]) == (r["label"], r["error"])
        if lo["probability"]:
            assert abs(float(lo["probability"]) - float(r["probability"])) <= 1e-6
    assert "triton grpc://" in remote.output and "errors" in remote.output


def test_timeouts_and_unreachable_servers(served, images):
    server, _ = served
    with RemoteDetector(server.grpc_url) as remote:
        remote.timeout = 1e-4  # no answer comes back in 0.1 ms
        (row,) = remote.predict([str(images[0])])
    assert row.error.startswith(f"{images[0]}: server error") and "Deadline" in row.error
    with pytest.raises(ServerError, match="cannot talk to the server"):
        RemoteDetector(f"grpc://127.0.0.1:{free_port()}")
    with pytest.raises(ServerError, match="not ready"):
        RemoteDetector(server.grpc_url, model="no_such_model")
    with pytest.raises(ServerError, match="not an i2p ensemble"):
        RemoteDetector(server.grpc_url, model="i2p_network")


def test_the_server_restarts_cleanly(served, images):
    """SIGTERM drains and exits 0 with no stub process left; a new server on the same repository answers alike."""
    server, artifact = served
    files = [str(p) for p in images[:4]]
    with RemoteDetector(server.http_url) as remote:
        before = remote.predict(files)
    stubs = psutil.Process(server.process.pid).children(recursive=True)
    assert stubs  # the Python backend's stub processes
    log = server.log
    code = server.stop()
    assert code == 0, log.read_text(errors="replace")[-4000:]
    assert not [p for p in stubs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    server.start()
    with RemoteDetector(server.grpc_url) as remote:
        assert_same(remote.predict(files), before, atol=0)
