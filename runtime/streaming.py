"""One streaming protocol for every detector the command line drives: local (``Detector``) or on a Triton
server (``RemoteDetector``).

``i2p-detect`` types its detector as ``StreamingDetector`` and never asks which kind it has: both stream
predictions in source order (``predict_stream``) and say who scored them (``scorer``), which every output
row records. The local implementation overlaps decoding (``workers`` threads, a bounded number of images
in flight) with inference on the previous batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .detector import Detector, Prediction, Prepared
    from .preprocess import ImageInput


@dataclass(frozen=True)
class ScorerInfo:
    """Who scored a prediction: for summaries, and recorded in every output row (``model``)."""

    name: str  # the backend, e.g. "onnxruntime[CPUExecutionProvider]", or the server and its network
    precision: str
    model_id: str  # "sha256:" + the manifest's sha256, or "triton:<artifact>/<network>/<precision>"


@runtime_checkable
class StreamingDetector(Protocol):
    """What ``i2p-detect`` needs of a detector, local or remote."""

    threshold: float | None

    @property
    def scorer(self) -> ScorerInfo: ...

    def predict_stream(
        self, sources: Iterable[ImageInput], workers: int | None = None
    ) -> Iterator[Prediction]: ...

    def close(self) -> None: ...


def prepare_stream(
    detector: Detector, sources: Iterable[ImageInput], workers: int, ahead: int
) -> Iterator[Prepared]:
    """``detector.prepare`` over ``sources`` in ``workers`` threads, in order, at most ``ahead`` in flight."""
    with ThreadPoolExecutor(workers, thread_name_prefix="i2p-decode") as pool:
        pending: deque[Future[Prepared]] = deque()
        try:
            for src in sources:
                pending.append(pool.submit(detector.prepare, src))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def stream_predictions(
    detector: Detector, sources: Iterable[ImageInput], workers: int
) -> Iterator[Prediction]:
    """Predictions in source order; decoding of the next batch overlaps inference on this one."""
    batch: list[Prepared] = []
    for item in prepare_stream(detector, sources, workers, ahead=2 * detector.batch_size + workers):
        batch.append(item)
        if len(batch) == detector.batch_size:
            yield from detector.predict_prepared(batch)
            batch = []
    if batch:
        yield from detector.predict_prepared(batch)
