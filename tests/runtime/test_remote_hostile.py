"""RemoteDetector against hostile KServe v2 HTTP servers (http.server on 127.0.0.1): malformed model configs,
verdicts outside the contract, a server that trickles bytes, answers too large or inflating too far."""

from __future__ import annotations

import functools
import gzip
import json
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient.http", reason="the client needs tritonclient (the [serve] extra)")

from benchmarks.support.memory import peak_rss_mb, reset_peak_rss  # noqa: E402
from i2p.runtime.detect_cli import detect  # noqa: E402
from i2p.runtime.remote import RemoteDetector, ServerError  # noqa: E402
from i2p.runtime.triton_http import MAX_RESPONSE_BYTES  # noqa: E402

GOOD_CONFIG = {
    "name": "i2p",
    "max_batch_size": 8,
    "input": [{"name": "image", "data_type": "TYPE_STRING", "dims": [1]}],
    "output": [{"name": n} for n in ("probability", "label", "error")],
    "parameters": {
        "threshold": {"string_value": "0.5"},
        "network": {"string_value": "onnxruntime"},
        "precision": {"string_value": "fp32"},
        "artifact": {"string_value": "fake"},
    },
}


def verdict_body(probabilities: list[Any], labels: list[str], errors: list[str]) -> bytes:
    n = len(probabilities)
    return json.dumps(
        {
            "outputs": [
                {"name": "probability", "datatype": "FP32", "shape": [n, 1], "data": probabilities},
                {"name": "label", "datatype": "BYTES", "shape": [n, 1], "data": labels},
                {"name": "error", "datatype": "BYTES", "shape": [n, 1], "data": errors},
            ]
        }
    ).encode()


def sane(n: int) -> bytes:
    return verdict_body([0.75] * n, ["fake"] * n, [""] * n)


class Behaviour:
    """What the fake server answers: the config (any JSON or raw bytes) and, per inference, a function of
    the number of images that writes the raw answer on the handler."""

    def __init__(self) -> None:
        self.config: Any = GOOD_CONFIG
        self.infer: Callable[[BaseHTTPRequestHandler, int], None] = lambda h, n: send(h, sane(n))
        self.config_writer: Callable[[BaseHTTPRequestHandler, bytes], None] | None = None


def send(handler: BaseHTTPRequestHandler, body: bytes, headers: dict[str, str] | None = None) -> None:
    handler.send_response(200)
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    for k, v in headers.items():
        if v is not None:
            handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def trickle(handler: BaseHTTPRequestHandler, raw: bytes, pause: float = 0.2) -> None:
    try:
        for i in range(len(raw)):
            handler.wfile.write(raw[i : i + 1])
            handler.wfile.flush()
            time.sleep(pause)
    except OSError:
        pass  # the client hung up: what it should do


def http_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    behaviour = Behaviour()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.endswith("/config"):
                body = (
                    behaviour.config if isinstance(behaviour.config, bytes) else json.dumps(behaviour.config)
                )
                body = body.encode() if isinstance(body, str) else body
                if behaviour.config_writer:
                    behaviour.config_writer(self, body)
                else:
                    send(self, body)
            else:
                send(self, b"")

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            header = json.loads(data[: int(self.headers["Inference-Header-Content-Length"])])
            behaviour.infer(self, header["inputs"][0]["shape"][0])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", behaviour
    finally:
        httpd.shutdown()
        httpd.server_close()


BLOBS = [b"image one", b"image two", b"image three"]


# -- model config ------------------------------------------------------------------------------------------


def with_(**changes: Any) -> dict[str, Any]:
    return {**GOOD_CONFIG, **changes}


MALFORMED = [
    (with_(parameters=[1, 2]), "'parameters' is a list"),
    (with_(parameters={"threshold": "0.5"}), "no string_value"),
    (with_(parameters={"threshold": {"string_value": 5}}), "no string_value"),
    (with_(max_batch_size=-1), "max_batch_size"),
    (with_(max_batch_size="8x"), "max_batch_size"),
    (with_(max_batch_size=True), "max_batch_size"),
    (with_(max_batch_size=2.5), "max_batch_size"),
    (with_(input=None), "'input' is NoneType"),
    (with_(input=[1, 2]), "'input' is list"),
    (with_(output={"name": "probability"}), "'output' is dict"),
    ([GOOD_CONFIG], "a JSON list"),
    ("just a string", "a JSON str"),
    (b"{not json", "not JSON"),
    (b"[" * 200_000, "not JSON"),
    (with_(input=[{"name": "pixels"}]), "not an i2p ensemble"),
]


@pytest.mark.parametrize(("config", "message"), MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_model_config_is_a_clear_error(server, config: Any, message: str) -> None:
    url, behaviour = server
    behaviour.config = config
    with pytest.raises(ServerError, match="malformed model config|not an i2p ensemble|not JSON") as e:
        RemoteDetector(url, timeout=5)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf", "1.5", "-0.1", "abc", "", "1e400"])
def test_a_server_threshold_that_is_not_a_probability_is_refused(server, threshold: str) -> None:
    url, behaviour = server
    behaviour.config = with_(parameters={"threshold": {"string_value": threshold}})
    with pytest.raises(ServerError, match="threshold .* is not a probability in \\[0, 1\\]"):
        RemoteDetector(url, timeout=5)
    result = CliRunner().invoke(detect, [__file__, "--server", url, "--json"])
    assert result.exit_code == 1 and "is not a probability" in result.stderr and "NaN" not in result.output


def test_the_cli_says_what_is_wrong_with_a_config(server) -> None:
    url, behaviour = server
    behaviour.config = with_(parameters=[1])
    result = CliRunner().invoke(detect, [__file__, "--server", url])
    assert result.exit_code == 1 and "malformed model config" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_sane_server_gives_results_and_a_valid_summary(server, tmp_path) -> None:
    url, _ = server
    with RemoteDetector(url, timeout=5) as remote:
        assert [(p.probability, p.label) for p in remote.predict(BLOBS)] == [(0.75, "fake")] * 3
        assert remote.batch_size == 8 and remote.threshold == 0.5
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    result = CliRunner().invoke(detect, [str(image), "--server", url, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1], parse_constant=lambda c: pytest.fail(c))
    assert summary["threshold"] == 0.5


# -- verdicts ---------------------------------------------------------------------------------------------


VERDICTS = [
    ([float("nan"), 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], "probability nan"),
    ([7.5, 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], "probability 7.5"),
    ([-1.0, 0.2, 0.9], ["real", "real", "fake"], ["", "", ""], "probability -1"),
    ([float("inf"), 0.2, 0.9], ["fake", "real", "fake"], ["", "", ""], "probability inf"),
    ([0.9, 0.2, 0.9], ["maybe", "real", "fake"], ["", "", ""], "label 'maybe'"),
    ([0.9, 0.2, 0.9], ["", "real", "fake"], ["", "", ""], "label ''"),
    ([0.9, 0.2, 0.9], ["FAKE", "real", "fake"], ["", "", ""], "label 'FAKE'"),
    ([0.9, 0.2, 0.9], ["real", "real", "fake"], ["", "", ""], "label 'real'"),  # contradicts threshold 0.5
    ([float("nan"), 0.2, 0.9], ["fake", "real", "fake"], ["bad file", "", ""], "inconsistent"),
]


@pytest.mark.parametrize(("probabilities", "labels", "errors", "message"), VERDICTS, ids=range(len(VERDICTS)))
def test_verdicts_outside_the_contract_are_error_rows(
    server, probabilities: list[float], labels: list[str], errors: list[str], message: str
) -> None:
    url, behaviour = server
    behaviour.infer = lambda h, n: send(h, verdict_body(probabilities, labels, errors))
    with RemoteDetector(url, timeout=5) as remote:
        first, *rest = remote.predict(BLOBS)
    assert first.probability is None and first.label is None and message in first.error, first.error
    assert [(p.probability, p.label) for p in rest] == [
        (pytest.approx(0.2), "real"),
        (pytest.approx(0.9), "fake"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        verdict_body(["a", "b", "c"], ["fake"] * 3, [""] * 3),  # probabilities that are not numbers
        verdict_body([0.5, 0.5], ["fake"] * 2, [""] * 2),  # two answers for three images
        b'{"outputs": 5}',
        b'{"outputs": [{"name": "label"}]}',
        b"[" * 100_000,
        b"\xff\xfe not json",
    ],
    ids=range(6),
)
def test_malformed_answers_are_error_rows(server, body: bytes) -> None:
    url, behaviour = server
    behaviour.infer = lambda h, n: send(h, body)
    with RemoteDetector(url, timeout=5) as remote:
        rows = remote.predict(BLOBS)
    assert all(p.probability is None and "server error" in p.error for p in rows), rows


def test_a_long_server_error_text_is_cut(server) -> None:
    url, behaviour = server
    behaviour.infer = lambda h, n: send(h, verdict_body([float("nan")] * n, [""] * n, ["x" * 100_000] * n))
    with RemoteDetector(url, timeout=5) as remote:
        rows = remote.predict(BLOBS)
    assert all(p.error and len(p.error) < 2100 for p in rows)


# -- deadline --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("part", ["body", "headers", "status"])
def test_a_trickling_server_is_cut_at_the_request_deadline(server, part: str) -> None:
    url, behaviour = server
    raw = http_answer(sane(3))
    cut = {"status": 0, "headers": raw.index(b"\r\n") + 2, "body": raw.index(b"\r\n\r\n") + 4}[part]

    def slow(h: BaseHTTPRequestHandler, n: int) -> None:
        h.wfile.write(raw[:cut])
        h.wfile.flush()
        trickle(h, raw[cut:], pause=0.1)  # a byte per 0.1 s: each read is well within the timeout

    behaviour.infer = slow
    with RemoteDetector(url, timeout=1.0) as remote:
        start = time.monotonic()
        rows = remote.predict(BLOBS)
        elapsed = time.monotonic() - start
    assert elapsed < 3, elapsed
    assert all(p.probability is None and "request deadline" in p.error for p in rows), rows


@pytest.mark.timeout(60)
def test_a_trickled_config_is_cut_at_the_deadline(server) -> None:
    url, behaviour = server
    behaviour.config_writer = lambda h, body: trickle(h, http_answer(body), pause=0.1)
    start = time.monotonic()
    with pytest.raises(ServerError, match="request deadline"):
        RemoteDetector(url, timeout=1.0)
    assert time.monotonic() - start < 3


@pytest.mark.timeout(60)
def test_a_silent_server_is_cut_at_the_deadline(server) -> None:
    url, behaviour = server
    behaviour.infer = lambda h, n: time.sleep(5)
    with RemoteDetector(url, timeout=0.5) as remote:
        start = time.monotonic()
        rows = remote.predict(BLOBS)
        assert time.monotonic() - start < 2 and all("request deadline" in p.error for p in rows)
        behaviour.infer = lambda h, n: send(h, sane(n))
        assert all(p.ok for p in remote.predict(BLOBS))  # the next request gets a fresh connection


# -- size ------------------------------------------------------------------------------------------------


@functools.cache
def _bomb(size: int, wbits: int) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, wbits)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(size >> 20)) + packer.flush()


@pytest.mark.parametrize(("encoding", "wbits"), [("gzip", 31), ("deflate", 15), ("deflate", -15)])
def test_a_compression_bomb_is_not_inflated(server, encoding: str, wbits: int) -> None:
    url, behaviour = server
    bomb = _bomb(512 << 20, wbits)  # 512 MiB of zeros in about 2 MB: 32 times the cap
    behaviour.infer = lambda h, n: send(h, bomb, {"Content-Encoding": encoding})
    reset_peak_rss()  # pytest's own earlier peak would hide the growth
    before = peak_rss_mb()
    with RemoteDetector(url, timeout=30) as remote:
        rows = remote.predict(BLOBS)
    grown_mb = peak_rss_mb() - before
    assert all("inflates beyond" in p.error for p in rows), rows
    assert grown_mb < 200, grown_mb


def test_a_small_compressed_answer_is_accepted(server) -> None:
    url, behaviour = server
    behaviour.infer = lambda h, n: send(h, gzip.compress(sane(n)), {"Content-Encoding": "gzip"})
    with RemoteDetector(url, timeout=5) as remote:
        assert all(p.ok for p in remote.predict(BLOBS))


@pytest.mark.parametrize("how", ["announced", "sent", "chunked", "unknown-encoding", "corrupt-gzip"])
def test_oversized_or_undecodable_answers_are_refused(server, how: str) -> None:
    url, behaviour = server
    big = b" " * (MAX_RESPONSE_BYTES + 1)

    def answer(h: BaseHTTPRequestHandler, n: int) -> None:
        if how == "announced":  # claims 10 GiB, sends a little: refused before reading
            h.send_response(200)
            h.send_header("Content-Length", str(10 << 30))
            h.end_headers()
            h.wfile.write(b"{}")
        elif how == "sent":
            send(h, big)
        elif how == "chunked":
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for _ in range(20):
                h.wfile.write(b"%x\r\n" % (1 << 20) + bytes(1 << 20) + b"\r\n")
            h.wfile.write(b"0\r\n\r\n")
        elif how == "unknown-encoding":
            send(h, sane(n), {"Content-Encoding": "br"})
        else:
            send(h, b"not gzip at all", {"Content-Encoding": "gzip"})

    behaviour.infer = answer
    with RemoteDetector(url, timeout=10) as remote:
        rows = remote.predict(BLOBS)
    assert all(p.probability is None and "server error" in p.error for p in rows), rows
    assert any(w in rows[0].error for w in ("cap", "Content-Encoding", "decompress")), rows[0].error


def test_no_answer_can_put_nan_in_the_summary(server, tmp_path) -> None:
    url, behaviour = server
    behaviour.infer = lambda h, n: send(h, verdict_body([float("nan")] * n, ["fake"] * n, [""] * n))
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    result = CliRunner().invoke(detect, [str(image), "--server", url, "--json"])
    assert result.exit_code == 0
    for line in result.stdout.splitlines():
        json.loads(line, parse_constant=pytest.fail)
    assert not math.isnan(json.loads(result.stdout.splitlines()[-1])["threshold"])
