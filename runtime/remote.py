"""Scoring through a Triton server: ``i2p-detect --server URL`` and ``RemoteDetector``.

The server runs the ensemble ``i2p-export --triton`` wrote (``i2p.runtime.serving`` describes its
tensors): files are sent as their encoded bytes and decoded on the server by the runtime's own code,
so rows match local detection. Requests carry up to ``batch_size`` images, at most ``concurrency`` are
in flight, each with a deadline for the whole request (``timeout``) and a cap on the answer
(``MAX_RESPONSE_BYTES``, compressed or not); a failed request (deadline, cap, server error) becomes error
rows for its images, never an exception mid-run. What the server sends is checked like any input: a
malformed model config or a threshold that is not a probability is a ServerError at connection; a verdict
outside the contract (a probability that is not finite in [0, 1], a label other than real/fake, a label
that contradicts the server's threshold or comes with an error) is an error row. An ensemble of an
artifact with the OOD output also returns ``ood`` and ``uncertain`` (``Prediction.ood``/``uncertain``; None
from one without): its ``ood_threshold`` must be a finite number >= 0 declared with both outputs, and an
ood that is not finite and >= 0, or an ``uncertain`` that contradicts ood > that threshold, is an error row
too. Needs ``tritonclient`` (``pip install 'i2p-detector[serve]'``); one client per thread, as
tritonclient's clients are not thread-safe.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .cells import display
from .detector import Prediction
from .preprocess import ImageError, _read_file, describe
from .schema import MAX_OOD
from .serving import ENSEMBLE, IMAGE, OOD_ABSENT, OOD_VERDICT, VERDICT
from .streaming import ScorerInfo
from .triton_http import MAX_RESPONSE_BYTES, TritonHttp

SCHEMES = {"grpc": ("grpc", False), "grpcs": ("grpc", True), "http": ("http", False), "https": ("http", True)}
DEFAULT_TIMEOUT_S = 60.0
MAX_SERVER_TEXT = 2000  # characters of a server's error text kept in a row


class ServerError(RuntimeError):
    """The server cannot be reached, or does not serve the i2p ensemble."""


@dataclass(frozen=True)
class ServerAddress:
    protocol: str  # "grpc" | "http"
    host_port: str
    ssl: bool = False

    @classmethod
    def parse(cls, url: str) -> ServerAddress:
        """``grpc://host:8001``, ``http://host:8000`` (``grpcs``/``https`` for TLS); a bare ``host:port`` is gRPC."""
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "grpc", url
        if scheme not in SCHEMES or not rest.strip("/"):
            raise ValueError(f"{url!r}: expected grpc://HOST:PORT or http://HOST:PORT")
        protocol, ssl = SCHEMES[scheme]
        return cls(protocol, rest.strip("/"), ssl)


class RemoteDetector:
    """The i2p ensemble on a Triton server, behind a Detector-like API for files and encoded bytes."""

    def __init__(
        self,
        url: str,
        model: str = ENSEMBLE,
        batch_size: int = 8,
        concurrency: int = 4,
        timeout: float = DEFAULT_TIMEOUT_S,
        threshold: float | None = None,
    ) -> None:
        if batch_size < 1 or concurrency < 1 or timeout <= 0:
            raise ValueError("batch_size and concurrency must be >= 1 and timeout > 0")
        self.address = ServerAddress.parse(url)
        self.url, self.model, self.timeout, self.concurrency = url, model, timeout, concurrency
        self._local = threading.local()
        self._clients: list[Any] = []  # every thread's client, closed by close()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        where = f"{self.url} model {self.model!r}"
        max_batch, params, outputs = _settings(self._config(), where)
        self.batch_size = min(batch_size, max_batch or batch_size)
        self.server_threshold = _threshold(params["threshold"], where) if "threshold" in params else None
        # above it the server calls a verdict uncertain; None: the ensemble has no OOD output
        self.ood_threshold = _ood_threshold(params.get("ood_threshold"), outputs, where)
        self._relabel = threshold is not None
        self.threshold = threshold if threshold is not None else self.server_threshold
        self.scorer = ScorerInfo(  # the server names its artifact, not its hash: rows record that
            f"triton {self.address.protocol}://{self.address.host_port} {model} ({params.get('network', '?')})",
            params.get("precision", "?"),
            display(
                f"triton:{params.get('artifact', '?')}/{params.get('network', '?')}/{params.get('precision', '?')}"
            ),
        )

    def __repr__(self) -> str:
        return f"RemoteDetector({self.url!r}, model={self.model!r})"

    # -- connection --------------------------------------------------------------------------------

    def _client(self) -> Any:
        """This thread's tritonclient (created on first use)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = _make_client(self.address, self.timeout)
            with self._lock:
                self._clients.append(client)
        return client

    def _config(self) -> Any:
        """Checks the server is up and serves ``model``; returns its config as the server sent it."""
        where = f"{self.url} model {self.model!r}"
        try:
            client = self._client()
            if self.address.protocol == "grpc":
                deadline = {"client_timeout": self.timeout}  # gRPC deadlines cover the whole call
                if not client.is_server_live(**deadline):
                    raise ServerError(f"{self.url}: the Triton server is not live")
                if not client.is_model_ready(self.model, **deadline):
                    raise ServerError(
                        f"{where}: not ready (not loaded, or loading failed; see the server log)"
                    )
                answer = client.get_model_config(self.model, as_json=True, **deadline)
                return answer.get("config") if isinstance(answer, dict) else answer
            if not client.is_server_live():
                raise ServerError(f"{self.url}: the Triton server is not live")
            if not client.is_model_ready(self.model):
                raise ServerError(f"{where}: not ready (not loaded, or loading failed; see the server log)")
            return client.get_model_config(self.model)
        except ServerError:
            raise
        except Exception as e:  # connection refused, DNS, TLS, deadline, cap: several types
            raise ServerError(f"{where}: cannot talk to the server ({e})") from e

    def close(self) -> None:
        """Stop the request threads and close every connection (a server drains open ones on shutdown)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        self._local = threading.local()

    def __enter__(self) -> RemoteDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inference ---------------------------------------------------------------------------------

    def predict(self, inputs: Sequence[str | Path | bytes]) -> list[Prediction]:
        """One Prediction per input (paths or encoded bytes), in order; bad files are error rows."""
        items = [inputs] if isinstance(inputs, (str, Path, bytes)) else list(inputs)
        for i, item in enumerate(items):
            if not isinstance(item, (str, Path, bytes)):
                raise TypeError(
                    f"input {i} is a {type(item).__name__}; the server takes files: a path or encoded bytes"
                )
        return list(self.predict_stream(items))

    def predict_stream(
        self, sources: Iterable[str | Path | bytes], workers: int | None = None
    ) -> Iterator[Prediction]:
        """Predictions in source order; up to ``workers`` (at most ``concurrency``) requests of ``batch_size``
        images in flight (``StreamingDetector``: the server decodes, so concurrency is in requests)."""
        in_flight = self.concurrency if workers is None else max(1, min(workers, self.concurrency))
        it = iter(sources)
        chunks = iter(lambda: list(islice(it, self.batch_size)), [])
        with self._lock:
            if self._pool is None:  # long-lived threads keep their connections between calls
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="i2p-remote")
            pool = self._pool
        pending: deque[Future[list[Prediction]]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(self._predict_chunk, chunk))
                if len(pending) >= in_flight:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def _predict_chunk(self, chunk: Sequence[str | Path | bytes]) -> list[Prediction]:
        """Read the files here, send those that could be read in one request, merge the answers back."""
        names, blobs, results = [], [], {}
        for i, src in enumerate(chunk):
            name = describe(src)
            names.append(name)
            try:
                blobs.append((i, src if isinstance(src, bytes) else _read_file(Path(src), name)))
            except ImageError as e:
                results[i] = Prediction(name, None, None, str(e))
        if blobs:
            sent = [i for i, _ in blobs]
            answers = self._infer([names[i] for i in sent], [b for _, b in blobs])
            results.update(zip(sent, answers, strict=True))
        return [results[i] for i in range(len(chunk))]

    def _infer(self, names: list[str], blobs: list[bytes]) -> list[Prediction]:
        try:
            answers = self._request(blobs)
        except Exception as e:  # timeout, server or transport error: this request's images get error rows
            reason = f"server error ({type(e).__name__}): {e}"
            return [Prediction(n, None, None, f"{n}: {reason}") for n in names]
        return [self._verdict(*answer) for answer in zip(names, *answers, strict=True)]

    def _verdict(
        self, name: str, p: float, label: str, error: str, ood: float | None, uncertain: bool | None
    ) -> Prediction:
        """One image's answer, checked: an error row when the server contradicts itself or the contract."""
        if error:
            # the contract: NaN, no label, and with the OOD outputs a NaN ood and uncertain false
            if label or p == p or (ood is not None and (ood == ood or uncertain)):
                return Prediction(
                    name,
                    None,
                    None,
                    f"{name}: server sent an inconsistent verdict (error with label {label[:20]!r}, "
                    f"probability {p:.4g}{_ood_text(ood, uncertain)}): {error[:MAX_SERVER_TEXT]}",
                )
            return Prediction(name, None, None, f"{name}: {error[:MAX_SERVER_TEXT]}")
        expected = (
            None if self.server_threshold is None else ("fake" if p >= self.server_threshold else "real")
        )
        bad_ood = ood is not None and not (
            0.0 <= ood <= MAX_OOD and uncertain == (ood > self.ood_threshold)  # NaN fails both
        )
        if (
            not 0.0 <= p <= 1.0
            or label not in ("real", "fake")
            or (expected and label != expected)
            or bad_ood
        ):
            return Prediction(
                name,
                None,
                None,
                f"{name}: server sent an invalid verdict (probability {p:.4g}, label {label[:20]!r}"
                f"{_ood_text(ood, uncertain)}); see the server",
            )
        is_fake = p >= self.threshold if self._relabel else label == "fake"
        return Prediction(name, p, is_fake, ood=ood, uncertain=uncertain)

    def _request(
        self, blobs: list[bytes]
    ) -> tuple[list[float], list[str], list[str], list[float | None], list[bool | None]]:
        """One inference request: (probabilities, labels, errors, ood, uncertain), one each per blob (ood and
        uncertain None each when the ensemble has no OOD output)."""
        if self.address.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        data = np.array(blobs, dtype=np.object_).reshape(-1, 1)
        tensor = tc.InferInput(IMAGE, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        wanted = (*VERDICT, *(OOD_VERDICT if self.ood_threshold is not None else ()))
        outputs = [tc.InferRequestedOutput(name) for name in wanted]
        if self.address.protocol == "grpc":
            result = self._client().infer(self.model, [tensor], outputs=outputs, client_timeout=self.timeout)
        else:
            result = self._client().infer(self.model, [tensor], outputs)
        probabilities = _numbers(result.as_numpy("probability"))
        labels, errors = (_texts(result.as_numpy(name)) for name in VERDICT[1:])
        if self.ood_threshold is None:
            ood: list[float | None] = [None] * len(blobs)
            uncertain: list[bool | None] = [None] * len(blobs)
        else:
            ood, uncertain = (
                _numbers(result.as_numpy(OOD_VERDICT[0])),
                _flags(result.as_numpy(OOD_VERDICT[1])),
            )
        if not len(probabilities) == len(labels) == len(errors) == len(ood) == len(uncertain) == len(blobs):
            raise ServerError(f"sent {len(blobs)} images, got {len(probabilities)} answers")
        return probabilities, labels, errors, ood, uncertain


def _ood_text(ood: float | None, uncertain: bool | None) -> str:
    return "" if ood is None else f", ood {ood:.4g}, uncertain {uncertain}"


def _texts(array: np.ndarray | None) -> list[str]:
    if array is None:
        raise ServerError("the server's answer lacks an output")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]


def _numbers(array: np.ndarray | None) -> list[float]:
    if array is None:
        raise ServerError("the server's answer lacks a number output (probability or ood)")
    try:
        return [float(v) for v in np.asarray(array, np.float64).reshape(-1)]
    except (TypeError, ValueError) as e:
        raise ServerError(f"the server's probabilities or ood scores are not numbers ({e})") from None


def _flags(array: np.ndarray | None) -> list[bool]:
    """The ``uncertain`` output: booleans only (no 0/1, no strings: the contract says BOOL)."""
    if array is None:
        raise ServerError("the server's answer lacks the uncertain output")
    if not isinstance(array, np.ndarray) or array.dtype != np.bool_:
        raise ServerError(
            f"the server's uncertain flags are {getattr(array, 'dtype', type(array))}, not BOOL"
        )
    return [bool(v) for v in array.reshape(-1)]


def _settings(config: Any, where: str) -> tuple[int, dict[str, str], list[Any]]:
    """(max_batch_size, parameters, output names) of an i2p ensemble's config, every field checked: a
    server's answer is input like any other."""

    def bad(what: str) -> ServerError:
        return ServerError(
            f"{where}: malformed model config ({what}); serve the repository from i2p-export --triton"
        )

    if not isinstance(config, dict):
        raise bad(f"a JSON {type(config).__name__}, not an object")
    tensors = {}
    for key in ("input", "output"):
        value = config.get(key)
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise bad(f"'{key}' is {type(value).__name__}, not a list of tensors")
        tensors[key] = [t.get("name") for t in value]
    if tensors["input"] != [IMAGE] or not set(VERDICT) <= set(tensors["output"]):
        raise ServerError(
            f"{where}: not an i2p ensemble (inputs {str(tensors['input'])[:200]}); "
            "serve the repository from i2p-export --triton"
        )
    max_batch = config.get("max_batch_size", 0)
    if isinstance(max_batch, str) and max_batch.isdigit():  # protobuf's JSON writes int64 as strings
        max_batch = int(max_batch)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 0:
        raise bad(f"max_batch_size {str(max_batch)[:40]!r} is not a count")
    parameters = config.get("parameters", {})
    if not isinstance(parameters, dict):
        raise bad(f"'parameters' is a {type(parameters).__name__}, not an object")
    params = {}
    for key, value in parameters.items():
        text = value.get("string_value", "") if isinstance(value, dict) else None
        if not isinstance(text, str):
            raise bad(f"parameter {str(key)[:40]!r} has no string_value")
        params[key] = text
    return max_batch, params, tensors["output"]


def _threshold(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ServerError(f"{where}: the server's threshold {text[:40]!r} is not a probability in [0, 1]")
    return value


def _ood_threshold(text: str | None, outputs: list[Any], where: str) -> float | None:
    """The ensemble's OOD threshold, or None when it has no OOD output (``absent``, or a config written
    before the OOD score); the parameter and both outputs go together."""
    declared = [name for name in OOD_VERDICT if name in outputs]
    if text is None or text == OOD_ABSENT:
        if declared:
            raise ServerError(
                f"{where}: malformed model config (outputs {declared} without an ood_threshold); "
                "serve the repository from i2p-export --triton"
            )
        return None
    if len(declared) != len(OOD_VERDICT):
        raise ServerError(
            f"{where}: malformed model config (an ood_threshold without the outputs {list(OOD_VERDICT)}); "
            "serve the repository from i2p-export --triton"
        )
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= MAX_OOD):
        raise ServerError(f"{where}: the server's ood_threshold {text[:40]!r} is not a finite number >= 0")
    return value


def _make_client(address: ServerAddress, timeout: float) -> Any:
    try:
        if address.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
    except (ImportError, RuntimeError) as e:  # tritonclient.http raises RuntimeError without its extra
        raise ServerError(
            f"talking to Triton over {address.protocol} needs tritonclient: pip install 'i2p-detector[serve]' ({e})"
        ) from e
    if address.protocol == "grpc":  # gRPC checks the cap on the decompressed message
        limits = [
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            ("grpc.max_send_message_length", -1),
        ]
        return tc.InferenceServerClient(address.host_port, ssl=address.ssl, channel_args=limits)
    return TritonHttp(address.host_port, address.ssl, timeout)
