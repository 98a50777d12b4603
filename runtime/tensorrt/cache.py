"""The engine cache: file names keyed by what an engine was built for, JSON sidecars, verification, lookup.

Engines do not move between GPUs or TensorRT versions, so the first load on a machine builds one and
caches it in ``ARTIFACT/engines/`` (or the user cache when the artifact is read-only) under a name
keyed by GPU, compute capability, TensorRT version, precision and the ONNX file's sha256. A JSON
sidecar repeats the key and holds the engine's own sha256: a tampered, truncated or foreign engine
is rebuilt, never deserialized.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from i2p.base.files import sha256_file, write_bytes_atomic, write_json_atomic

from ..manifest import Manifest, ModelFile
from ..model_files import ENGINE_PRECISIONS
from .api import EngineBuildError, major

SIDECAR_FORMAT = "i2p-tensorrt-engine"
PRECISIONS = ENGINE_PRECISIONS  # the engine rows of the model-file catalogue


def engine_source(manifest: Manifest, trt_version: str) -> ModelFile:
    """The ONNX file an FP16 engine is built from: FP16 graph for strong typing (>= 10), else the FP32 one."""
    fp16, fp32 = manifest.model("fp16"), manifest.model("fp32")
    if major(trt_version) >= 10:
        if fp16 is None:
            raise EngineBuildError(
                f"TensorRT {trt_version} builds strongly typed FP16 engines from model.fp16.onnx, "
                "which this artifact lacks; re-export with i2p-export --fp16"
            )
        return fp16
    model = fp32 or fp16
    if model is None:
        raise EngineBuildError("the manifest lists no ONNX model")
    return model


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def engine_name(gpu_name: str, cc: tuple[int, int], trt_version: str, precision: str, onnx_sha: str) -> str:
    """``{gpu-name-slug}_sm{major}{minor}_trt{version}_{precision}_{onnx-sha256[:12]}.engine``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not re.fullmatch(r"[0-9a-f]{12,64}", onnx_sha):
        raise ValueError(f"expected the ONNX file's hex sha256, got {onnx_sha!r}")
    if not re.fullmatch(r"[0-9][0-9A-Za-z.]*", trt_version):
        raise ValueError(f"unexpected TensorRT version string {trt_version!r}")
    major, minor = cc
    return f"{slug(gpu_name)}_sm{int(major)}{int(minor)}_trt{trt_version}_{precision}_{onnx_sha[:12]}.engine"


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built for; stored in its sidecar and compared before the engine is trusted."""

    gpu: str
    compute_capability: tuple[int, int]
    tensorrt: str
    precision: str
    onnx_sha256: str
    input_size: int
    max_batch: int
    opt_batch: int

    @property
    def filename(self) -> str:
        return engine_name(self.gpu, self.compute_capability, self.tensorrt, self.precision, self.onnx_sha256)


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(engine_path).with_suffix(".json")


def write_engine(engine_path: str | os.PathLike, data: Any, key: EngineKey) -> str:
    """Write the engine, then its sidecar, each atomically; return the engine's sha256."""
    path = Path(engine_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)
    digest = sha256_file(path)
    write_json_atomic(sidecar_path(path), {"format": SIDECAR_FORMAT, **asdict(key), "sha256": digest})
    return digest


def engine_mismatch(engine_path: str | os.PathLike, key: EngineKey) -> str | None:
    """None if the engine at ``engine_path`` was built for ``key`` and is intact, else why not.

    An engine built for a larger ``max_batch`` serves a smaller one; ``opt_batch`` only tunes speed.
    """
    path = Path(engine_path)
    side = sidecar_path(path)
    if not path.is_file():
        return "no engine built yet"
    if not side.is_file():
        return f"{side.name} is missing"
    try:
        meta = json.loads(side.read_text())
        built = EngineKey(
            **{
                **{f: meta[f] for f in EngineKey.__dataclass_fields__},
                "compute_capability": tuple(meta["compute_capability"]),
            }
        )
        expected_sha = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{side.name} is unreadable ({e})"
    if meta.get("format") != SIDECAR_FORMAT:
        return f"{side.name} is not an i2p engine sidecar"
    for field in ("gpu", "compute_capability", "tensorrt", "precision", "onnx_sha256", "input_size"):
        if getattr(built, field) != getattr(key, field):
            return (
                f"it was built for {field}={getattr(built, field)!r}, this one needs {getattr(key, field)!r}"
            )
    if built.max_batch < key.max_batch:
        return f"it was built for max_batch={built.max_batch}, {key.max_batch} is needed"
    if sha256_file(path) != expected_sha:
        return f"{path.name} does not match the sha256 in {side.name} (modified or truncated)"
    return None


def timing_cache_name(key: EngineKey) -> str:
    """One timing cache per GPU and TensorRT version: rebuilds for other batch sizes take seconds."""
    major_cc, minor_cc = key.compute_capability
    return f"timing_{slug(key.gpu)}_sm{major_cc}{minor_cc}_trt{key.tensorrt}.cache"


@dataclass(frozen=True)
class Lookup:
    """Where the engine for a key is: ``found`` when a verified one exists, else where to build it and why."""

    path: Path
    found: bool
    reasons: tuple[str, ...] = ()


def lookup(directories: Sequence[Path], key: EngineKey) -> Lookup:
    """The first directory holding a verified engine for ``key``; else the first writable one to build in."""
    reasons = []
    for directory in directories:
        candidate = directory / key.filename
        reason = engine_mismatch(candidate, key)
        if reason is None:
            return Lookup(candidate, True)
        reasons.append(f"{candidate}: {reason}")
    target = next((d for d in directories if _writable(d)), None)
    if target is None:
        raise EngineBuildError(f"no writable place for a TensorRT engine: {[str(d) for d in directories]}")
    return Lookup(target / key.filename, False, tuple(reasons))


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)
