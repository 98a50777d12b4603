"""The HTTP side of ``RemoteDetector``: KServe v2 / Triton over HTTP with a deadline per request and a cap
on what comes back.

tritonclient's HTTP client bounds each socket read (a server trickling a byte a second holds it forever)
and inflates a gzip answer whole. Here every request, from connecting to the last byte of the answer,
ends by ``timeout`` seconds (a watchdog shuts the socket), and an answer larger than
``MAX_RESPONSE_BYTES``, announced or sent, compressed or not, is refused while it is read. tritonclient
still encodes the request and decodes the answer (the binary tensor extension).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl as ssl_module
import threading
import urllib.parse
import zlib
from contextlib import suppress
from typing import Any

MAX_RESPONSE_BYTES = 16 << 20  # an answer for 1024 images with long error texts is well under 2 MiB
_CHUNK = 1 << 16
_WBITS = {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}  # deflate: zlib-wrapped, or raw as some send


class HttpError(RuntimeError):
    """The server's answer is late, too large, malformed, or an HTTP error."""


class TritonHttp:
    """One connection (kept alive between requests); not thread-safe, like tritonclient's clients."""

    def __init__(
        self, host_port: str, ssl: bool, timeout: float, max_bytes: int = MAX_RESPONSE_BYTES
    ) -> None:
        self.host_port, self.ssl, self.timeout, self.max_bytes = host_port, ssl, timeout, max_bytes
        self._conn: http.client.HTTPConnection | None = None

    # -- the v2 calls RemoteDetector makes -------------------------------------------------------------

    def is_server_live(self) -> bool:
        return self._call("GET", "/v2/health/live")[0] == 200

    def is_model_ready(self, model: str) -> bool:
        return self._call("GET", f"/v2/models/{_quote(model)}/ready")[0] == 200

    def get_model_config(self, model: str) -> Any:
        return self._json(self._call("GET", f"/v2/models/{_quote(model)}/config"), "model config")

    def infer(self, model: str, inputs: list[Any], outputs: list[Any]) -> Any:
        import tritonclient.http as tc

        body, json_size = tc.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
        headers = {"Content-Type": "application/octet-stream"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        status, answer, data = self._call("POST", f"/v2/models/{_quote(model)}/infer", body, headers)
        if status != 200:
            self._json((status, answer, data), "inference")  # raises with the server's message
        length = answer.get("Inference-Header-Content-Length")
        return tc.InferResult.from_response_body(data, header_length=int(length) if length else None)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- transport -----------------------------------------------------------------------------------

    def _call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, decoded body), all of it within ``timeout`` seconds and ``max_bytes``."""
        conn = self._connection()
        expired = threading.Event()
        done = threading.Lock()

        def expire() -> None:
            with done:
                expired.set()
                sock = conn.sock
                if sock is not None:
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)  # a blocked read returns at once

        watchdog = threading.Timer(self.timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = self._read(response)
            with done:
                watchdog.cancel()
                if expired.is_set():
                    raise TimeoutError
        except BaseException as e:
            watchdog.cancel()
            self.close()
            if expired.is_set():
                raise HttpError(
                    f"no complete answer within the {self.timeout:g} s request deadline"
                ) from None
            if isinstance(e, (OSError, http.client.HTTPException)):
                raise HttpError(f"{method} {path}: {type(e).__name__}: {e}") from e
            raise
        if response.will_close:
            self.close()
        return response.status, response.headers, data

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.ssl:
                self._conn = http.client.HTTPSConnection(
                    self.host_port, timeout=self.timeout, context=ssl_module.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(self.host_port, timeout=self.timeout)
        return self._conn

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        """The body, at most ``max_bytes`` on the wire and once decompressed."""
        declared = response.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise HttpError(
                f"the answer announces {int(declared):,} bytes, over the {self.max_bytes:,}-byte cap"
            )
        parts, size = [], 0
        while chunk := response.read(_CHUNK):
            size += len(chunk)
            if size > self.max_bytes:
                raise HttpError(f"the answer exceeds the {self.max_bytes:,}-byte cap")
            parts.append(chunk)
        data = b"".join(parts)
        encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
        if encoding == "identity":
            return data
        if encoding not in _WBITS:
            raise HttpError(f"the answer has an unknown Content-Encoding {encoding[:40]!r}")
        return self._inflate(data, encoding)

    def _inflate(self, data: bytes, encoding: str) -> bytes:
        """Decompress at most ``max_bytes`` (a 1 MB gzip can hold 1 GiB): the rest is never inflated."""
        for wbits in _WBITS[encoding]:
            inflater = zlib.decompressobj(wbits)
            try:
                out = inflater.decompress(data, self.max_bytes + 1)
            except zlib.error as e:
                error = e
                continue
            if len(out) > self.max_bytes or inflater.unconsumed_tail:
                raise HttpError(f"the {encoding} answer inflates beyond the {self.max_bytes:,}-byte cap")
            return out
        raise HttpError(f"the {encoding} answer does not decompress ({error})")

    def _json(self, answer: tuple[int, http.client.HTTPMessage, bytes], what: str) -> Any:
        status, _, data = answer
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            parsed = None
        if status != 200:
            message = parsed.get("error") if isinstance(parsed, dict) else None
            raise HttpError(f"{what}: HTTP {status}: {str(message or data[:200])[:500]}")
        if parsed is None:
            raise HttpError(f"{what}: the answer is not JSON")
        return parsed


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
