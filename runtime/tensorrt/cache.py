"""The engine cache: file names keyed by what an engine was built for, JSON sidecars, verification, lookup.

Engines do not move between GPUs or TensorRT versions, so the first load on a machine builds one and
caches it under a name keyed by GPU, compute capability, TensorRT version, precision and the ONNX
file's sha256. A JSON sidecar repeats the key and holds the engine's own sha256: a tampered, truncated
or foreign engine is rebuilt, never deserialized.

Deserializing an engine runs native code from it, so engines are read only from places the runtime
trusts: its own cache (``engine_cache()``: the user cache dir, 0700, no symlinks, this user's files;
``i2p.runtime.private_cache``) and engines the artifact's manifest lists and hashes (``engines/NAME``
with its sidecar). A file planted in ``ARTIFACT/engines/`` and not hashed is never read, and nothing is
ever written into the artifact.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from i2p.base.files import cache_root, sha256_file, write_bytes_atomic, write_json_atomic

from ..manifest import MANIFEST, ArtifactError, Manifest, ModelFile, confined_file
from ..model_files import ENGINE_PRECISIONS
from ..private_cache import UntrustedCacheError, private_dir, read_own_file
from ..schema import parse_json
from .api import EngineBuildError, major

SIDECAR_FORMAT = "i2p-tensorrt-engine"
ENGINES = "engines"  # the cache's folder under cache_root(), and the artifact folder of hashed engines
MAX_SIDECAR_BYTES = 1 << 16
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


class StaleEngine(Exception):
    """Why an engine file cannot be used (absent, foreign, tampered, untrusted): a reason to rebuild."""


def read_engine(engine_path: str | os.PathLike, key: EngineKey) -> bytes:
    """The engine's bytes, once its sidecar says it was built for ``key`` and the bytes read match its sha256.

    The bytes returned are the ones hashed (read once, without following links, this user's regular
    files): what is deserialized is what was verified. StaleEngine says why not.
    """
    path = Path(engine_path)
    side = sidecar_path(path)
    try:
        data = read_own_file(path)
    except FileNotFoundError:
        raise StaleEngine("no engine built yet") from None
    except UntrustedCacheError as e:
        raise StaleEngine(str(e)) from None
    try:
        meta_bytes = read_own_file(side, MAX_SIDECAR_BYTES)
    except FileNotFoundError:
        raise StaleEngine(f"{side.name} is missing") from None
    except UntrustedCacheError as e:
        raise StaleEngine(str(e)) from None
    _check_sidecar(meta_bytes, side.name, key, hashlib.sha256(data).hexdigest(), path.name)
    return data


def _check_sidecar(raw: bytes, name: str, key: EngineKey, actual_sha: str, engine: str) -> None:
    try:
        meta = parse_json(raw)  # SchemaError is a ValueError
        built = EngineKey(
            **{
                **{f: meta[f] for f in EngineKey.__dataclass_fields__},
                "compute_capability": tuple(meta["compute_capability"]),
            }
        )
        expected_sha = meta["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise StaleEngine(f"{name} is unreadable ({e})") from None
    if meta.get("format") != SIDECAR_FORMAT:
        raise StaleEngine(f"{name} is not an i2p engine sidecar")
    for field in ("gpu", "compute_capability", "tensorrt", "precision", "onnx_sha256", "input_size"):
        if getattr(built, field) != getattr(key, field):
            raise StaleEngine(
                f"it was built for {field}={getattr(built, field)!r}, this one needs {getattr(key, field)!r}"
            )
    if built.max_batch < key.max_batch:
        raise StaleEngine(f"it was built for max_batch={built.max_batch}, {key.max_batch} is needed")
    if actual_sha != expected_sha:
        raise StaleEngine(f"{engine} does not match the sha256 in {name} (modified or truncated)")


def engine_mismatch(engine_path: str | os.PathLike, key: EngineKey) -> str | None:
    """None if the engine at ``engine_path`` was built for ``key`` and is intact, else why not.

    An engine built for a larger ``max_batch`` serves a smaller one; ``opt_batch`` only tunes speed.
    """
    try:
        read_engine(engine_path, key)
    except StaleEngine as e:
        return str(e)
    return None


def timing_cache_name(key: EngineKey) -> str:
    """One timing cache per GPU and TensorRT version: rebuilds for other batch sizes take seconds."""
    major_cc, minor_cc = key.compute_capability
    return f"timing_{slug(key.gpu)}_sm{major_cc}{minor_cc}_trt{key.tensorrt}.cache"


@dataclass(frozen=True)
class Lookup:
    """The verified engine for a key (``data``, from ``path``), or where to build it and why there is none."""

    path: Path
    found: bool
    reasons: tuple[str, ...] = ()
    data: bytes | None = None  # the engine's bytes as verified: what the backend deserializes


def engine_cache() -> Path:
    """The runtime's own engine cache (``cache_root()/engines``), checked private; EngineBuildError if not."""
    try:
        return private_dir(cache_root() / ENGINES)
    except UntrustedCacheError as e:
        raise EngineBuildError(f"refusing the TensorRT engine cache: {e}") from None


def lookup(
    cache: Path, key: EngineKey, artifact: Path | None = None, manifest: Manifest | None = None
) -> Lookup:
    """A verified engine for ``key``: one the manifest hashes (``engines/NAME``), else one in ``cache``.

    ``cache`` must be the runtime's own (``engine_cache()``); a miss says to build there. Engine files in
    the artifact that the manifest does not hash are named in the reasons and never read.
    """
    reasons = []
    if artifact is not None and manifest is not None:
        rel = f"{ENGINES}/{key.filename}"
        if rel in manifest.files:
            try:
                return Lookup(artifact / rel, True, (), _hashed_engine(artifact, manifest, rel, key))
            except (StaleEngine, ArtifactError) as e:
                reasons.append(f"{artifact / rel}: {e}")
        elif os.path.lexists(artifact / rel):
            reasons.append(
                f"{artifact / rel}: not hashed in {MANIFEST}, so not loaded (an engine runs native code; "
                "only the runtime's own cache and hashed engines are)"
            )
    candidate = cache / key.filename
    try:
        return Lookup(candidate, True, (), read_engine(candidate, key))
    except StaleEngine as e:
        reasons.append(f"{candidate}: {e}")
    return Lookup(candidate, False, tuple(reasons))


def _hashed_engine(artifact: Path, manifest: Manifest, rel: str, key: EngineKey) -> bytes:
    """An engine the manifest lists with its sidecar: both confined to the artifact and matching their sha256."""
    side = str(sidecar_path(rel))
    if side not in manifest.files:
        raise StaleEngine(f"its sidecar {side} is not hashed in {MANIFEST}")
    blobs = []
    for name in (rel, side):
        path = confined_file(artifact, name)  # inside the artifact, no symlink on the way, a regular file
        try:
            data = read_own_file(path, any_owner=True)  # an artifact is often another user's, read-only
        except (OSError, UntrustedCacheError) as e:
            raise StaleEngine(f"cannot read {name} ({e})") from None
        if hashlib.sha256(data).hexdigest() != manifest.files[name]:
            raise StaleEngine(f"{name} does not match its sha256 in {MANIFEST}")
        blobs.append(data)
    engine, meta = blobs
    _check_sidecar(meta, side, key, manifest.files[rel], rel)
    return engine
