"""The serving contract without a server: URL parsing, the ensemble's decode and verdict steps.

tests/export/test_triton_server.py runs all of it on a real tritonserver.
"""

from __future__ import annotations

import numpy as np
import pytest

from i2p.runtime import Detector
from i2p.runtime.remote import RemoteDetector, ServerAddress, ServerError
from i2p.runtime.serving import NON_FINITE, decode_batch, text_tensor, verdicts
from tests.support.corpus import base_image, encode
from tests.support.fake_artifact import make_artifact
from tests.support.triton_server import free_port


@pytest.mark.parametrize(
    "url, expected",
    [
        ("grpc://host:8001", ("grpc", "host:8001", False)),
        ("http://10.0.0.2:8000/", ("http", "10.0.0.2:8000", False)),
        ("https://triton.example", ("http", "triton.example", True)),
        ("grpcs://h:443", ("grpc", "h:443", True)),
        ("localhost:8001", ("grpc", "localhost:8001", False)),
    ],
)
def test_server_urls(url, expected):
    a = ServerAddress.parse(url)
    assert (a.protocol, a.host_port, a.ssl) == expected


@pytest.mark.parametrize("url", ["ftp://h:1", "grpc://", "http:///"])
def test_bad_server_urls_are_refused(url):
    with pytest.raises(ValueError, match="expected grpc://HOST:PORT"):
        ServerAddress.parse(url)


def test_nobody_listening_is_a_clear_error():
    pytest.importorskip("tritonclient", reason="the client needs tritonclient (the [serve] extra)")
    with pytest.raises(ServerError, match="cannot talk to the server"):
        RemoteDetector(f"http://127.0.0.1:{free_port()}", timeout=2)


def test_server_steps_compute_what_the_detector_computes(tmp_path):
    """decode_batch + network + verdicts on bytes == Detector.predict on the same bytes, errors included."""
    artifact = make_artifact(tmp_path / "a.i2p", size=32, threshold=0.3)
    detector = Detector(artifact)
    blobs = [encode(base_image(40 + i, 30 + 3 * i, seed=i), "JPEG" if i % 2 else "PNG") for i in range(6)]
    blobs += [b"", b"\x89PNG\r\n\x1a\nnot really", encode(base_image(), "GIF")]
    pixels, errors = decode_batch(blobs, detector.spec)
    assert pixels.shape == (len(blobs), 3, 32, 32) and not pixels[6:8].any()
    probabilities, labels, reasons = verdicts(detector.backend.infer(pixels), errors, detector.threshold)
    for blob, p, label, reason, expected in zip(
        blobs, probabilities, labels, reasons, detector.predict(blobs), strict=True
    ):
        if expected.ok:
            assert (float(p), label, reason) == (expected.probability, expected.label, "")
        else:  # the server sends the reason; the client puts the name in front
            assert np.isnan(p) and label == "" and f"<{len(blob)} bytes>: {reason}" == expected.error
    assert sum(bool(r) for r in reasons) == 2


def test_verdicts_threshold_in_float64_and_non_finite_logits():
    logits = np.array([0.0, np.nan, np.inf, 2.0], np.float32)
    p, labels, reasons = verdicts(logits, ["", "", "", "bad file"], threshold=0.5)
    assert labels == ["fake", "", "fake", ""] and reasons == ["", NON_FINITE, "", "bad file"]
    assert p[0] == 0.5 and np.isnan(p[1]) and p[2] == 1.0 and np.isnan(p[3])
    # 0.5000000001 rounds to 0.5 in float32: compared in float32 this would be "fake"; the Detector says real.
    assert verdicts(np.zeros(1, np.float32), [""], threshold=0.5000000001)[1] == ["real"]


def test_text_tensors_are_utf8_bytes_one_per_row():
    t = text_tensor(["", "é"])
    assert t.shape == (2, 1) and t.dtype == object and list(t[:, 0]) == [b"", "é".encode()]
