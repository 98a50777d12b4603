"""``DetectImages``: the Ray Data stage that scores a column of images with the torch-free ``Detector``.

Used as ``ds.map_batches(DetectImages, fn_constructor_kwargs={"model": "m.i2p"}, concurrency=N,
batch_size=B)``. Each actor loads the artifact once through ``Detector`` (the same manifest and sha256
checks, the same backend choice), and decodes with the runtime's own code under its limits. Every input
row gives one output row: an image that cannot be read or decoded is a row with ``error`` set, never a
failed block. Paths and URIs (``s3://``, ``gs://``, ``file://`` through ``pyarrow.fs``) are read in the
actor, at most ``MAX_INPUT_BYTES`` each; local paths go to ``Detector`` as they are.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .detector import Detector, Prediction, Prepared
from .preprocess import MAX_INPUT_BYTES, ImageInput, describe

# The columns DetectImages adds (``verdict``: "fake", "real", or None on an error row; ``ood`` and
# ``uncertain``: ``Prediction.ood``/``uncertain``, null on error rows and for artifacts without the OOD output).
RESULT_COLUMNS = (
    "probability",
    "verdict",
    "threshold",
    "operating_point",
    "model_sha256",
    "error",
    "ood",
    "uncertain",
)
INPUT_COLUMNS = ("bytes", "path")  # looked for in this order when no column is named
OBJECT_STORES = ("s3", "gs", "gcs")  # pyarrow's path in them is the URI without its scheme


class DetectImages:
    """A stateful ``map_batches`` callable: one ``Detector`` per actor, one result row per input row.

    ``column`` names the input column (encoded bytes, or paths/URIs); by default ``bytes`` when the batch
    has it (``ray.data.read_binary_files``), else ``path``. The output keeps the batch's other columns
    (not the bytes) and adds ``RESULT_COLUMNS``. ``threads`` defaults to the CPUs Ray gave the actor.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        column: str | None = None,
        backend: str = "auto",
        device: int = 0,
        precision: str | None = None,
        threads: int | None = None,
        batch_size: int = 32,
        threshold: float | None = None,
        operating_point: str | None = None,
    ) -> None:
        self.column = column
        self.detector = Detector(
            model,
            backend=backend,
            device=device,
            precision=precision,
            threads=threads or _assigned_cpus(),
            batch_size=batch_size,
            threshold=threshold,
            operating_point=operating_point,
        )
        manifest = self.detector.manifest
        self.operating_point = operating_point or (manifest.operating_point if threshold is None else "")
        self.model_sha256 = model_sha256(self.detector)
        self._filesystems: dict[str, Any] = {}

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        columns = _as_columns(batch)
        name = self.column or next((c for c in INPUT_COLUMNS if c in columns), None)
        if name is None or name not in columns:
            raise KeyError(
                f"DetectImages: no input column {name or ' or '.join(map(repr, INPUT_COLUMNS))} in the "
                f"batch (it has {sorted(columns)}); pass fn_constructor_kwargs={{'column': ...}}"
            )
        predictions = self.detector.predict_prepared([self._prepare(item) for item in columns[name]])
        out = {k: np.asarray(v) for k, v in columns.items() if not _holds_bytes(v)}  # bytes stay behind
        out.update(self._result_columns(predictions))
        return out

    def _prepare(self, item: Any) -> Prepared:
        """Read and decode one input; whatever goes wrong is this row's error, named by its path or URI."""
        source = _source_name(item)
        try:
            data = self._load(item)
        except (OSError, ValueError, TypeError) as e:
            return Prepared(source, None, f"{source}: cannot read ({e})")
        prepared = self.detector.prepare(data)
        if prepared.source == source:
            return prepared
        error = prepared.error  # read from a URI: name the URI, not "<N bytes>"
        if error is not None and error.startswith(prepared.source):
            error = source + error[len(prepared.source) :]
        return replace(prepared, source=source, error=error)

    def _load(self, item: Any) -> ImageInput:
        """Bytes as they are, local paths as paths, URIs read through pyarrow.fs (bounded)."""
        if isinstance(item, (bytes, bytearray, memoryview)):
            return bytes(item)
        if not isinstance(item, str):
            raise TypeError(f"expected encoded bytes or a path/URI string, got {type(item).__name__}")
        scheme, _, rest = item.partition("://")
        if not rest or len(scheme) < 2:  # a plain path (a Windows drive letter is not a scheme)
            return item
        if scheme == "file":
            return rest
        return read_uri(item, self._filesystems)

    def _result_columns(self, predictions: Sequence[Prediction]) -> dict[str, np.ndarray]:
        n = len(predictions)
        return {
            "probability": np.array(
                [np.nan if p.probability is None else p.probability for p in predictions], np.float64
            ),
            "verdict": np.array([p.label for p in predictions], object),
            "threshold": np.full(n, self.detector.threshold, np.float64),
            "operating_point": np.array([self.operating_point] * n, object),
            "model_sha256": np.array([self.model_sha256] * n, object),
            "error": np.array([p.error for p in predictions], object),
            "ood": np.array([np.nan if p.ood is None else p.ood for p in predictions], np.float64),
            "uncertain": np.array([p.uncertain for p in predictions], object),  # None: no flag
        }


def read_uri(uri: str, filesystems: dict[str, Any]) -> bytes:
    """The object's bytes (at most MAX_INPUT_BYTES) through ``pyarrow.fs``; one filesystem per bucket."""
    from pyarrow import fs

    scheme, _, rest = uri.partition("://")
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"  # credentials and region are per bucket
    if scheme not in OBJECT_STORES:  # hdfs://, ...: pyarrow says what the path is
        filesystem, path = fs.FileSystem.from_uri(uri)
    else:
        if bucket not in filesystems:
            filesystems[bucket] = fs.FileSystem.from_uri(uri)[0]
        filesystem, path = filesystems[bucket], rest
    size = filesystem.get_file_info(path).size
    if size is not None and size > MAX_INPUT_BYTES:
        raise ValueError(f"{size:,} bytes exceeds the {MAX_INPUT_BYTES:,}-byte input limit")
    with filesystem.open_input_stream(path) as f:
        data = f.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise ValueError(f"more than {MAX_INPUT_BYTES:,} bytes (the input limit)")
    return data


def model_sha256(detector: Detector) -> str:
    """The manifest's sha256 of the network file the backend runs (for TensorRT: the ONNX it was built from)."""
    manifest = detector.manifest
    loaded = getattr(detector.backend, "model_path", None)
    for m in manifest.models:
        if loaded is not None and Path(loaded).resolve() == (detector.path / m.path).resolve():
            return manifest.files[m.path]
    fp16 = manifest.model("fp16") or manifest.models[0]
    return manifest.files[fp16.path]


def _as_columns(batch: Any) -> Mapping[str, Any]:
    """A batch in any of Ray Data's formats (numpy dict, pandas, pyarrow) as name -> sequence."""
    if isinstance(batch, Mapping):
        return batch
    if hasattr(batch, "to_pydict"):  # pyarrow.Table
        return batch.to_pydict()
    if hasattr(batch, "to_dict"):  # pandas.DataFrame
        return {k: batch[k].to_numpy() for k in batch.columns}
    raise TypeError(f"DetectImages takes a batch of columns, got {type(batch).__name__}")


def _holds_bytes(values: Any) -> bool:
    return len(values) > 0 and isinstance(values[0], (bytes, bytearray, memoryview))


def _source_name(item: Any) -> str:
    return item if isinstance(item, str) else describe(bytes(item) if isinstance(item, memoryview) else item)


def _assigned_cpus() -> int | None:
    """The CPUs Ray reserved for this actor (ONNX Runtime's thread count), None outside a Ray worker.

    Asked only of a connected Ray (``get_runtime_context`` would start a local instance otherwise), and only
    in a worker: a driver connected to Ray has no assigned resources (Ray asserts there)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None
    cpus = context.get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None
