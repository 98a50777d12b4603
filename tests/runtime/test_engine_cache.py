"""TensorRT engines are read only from the runtime's own cache or when the manifest hashes them.

Deserializing an engine runs its code, so an engine (or sidecar, or timing cache) planted in
``ARTIFACT/engines/`` — as a file, through a symlink, or with ``engines/`` itself a symlink — is never
read, and built engines never go into the artifact. TensorRT is absent here: these tests drive the
cache and path logic (``i2p.runtime.tensorrt.cache``, ``i2p.runtime.private_cache``) with real files,
FIFOs and links, and the backend's engine step with a stand-in for the GPU and the builder.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from i2p.base.files import sha256_file
from i2p.runtime.backends import tensorrt as trt_backend
from i2p.runtime.backends.onnxruntime import CPU_EP, TENSORRT_EP, auto_providers
from i2p.runtime.manifest import read_manifest
from i2p.runtime.private_cache import UntrustedCacheError, private_dir, read_own_file
from i2p.runtime.tensorrt.api import EngineBuildError
from i2p.runtime.tensorrt.cache import (
    ENGINES,
    EngineKey,
    StaleEngine,
    engine_cache,
    engine_mismatch,
    lookup,
    read_engine,
    sidecar_path,
    write_engine,
)
from tests.support.fake_artifact import make_artifact

SIZE = 32
ENGINE = b"\x00serialized engine\xff" * 64


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh I2P_CACHE_DIR (the runtime's cache root) for each test."""
    root = tmp_path / "user-cache"
    monkeypatch.setenv("I2P_CACHE_DIR", str(root))
    return root


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "a.i2p", size=SIZE)


def key_for(root: Path) -> EngineKey:
    """The key the backend computes for this artifact's FP16 ONNX (TensorRT 10) on an Orin."""
    manifest = read_manifest(root)
    return EngineKey(
        "NVIDIA Jetson AGX Orin", (8, 7), "10.3.0", "fp16", manifest.files["model.fp16.onnx"], SIZE, 8, 8
    )


def hash_into_manifest(root: Path, *rels: str) -> None:
    data = json.loads((root / "manifest.json").read_text())
    data["files"].update({rel: sha256_file(root / rel) for rel in rels})
    (root / "manifest.json").write_text(json.dumps(data))


# -- engines in the artifact --------------------------------------------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("planted", ["file", "fifo", "symlink to an engine outside", "engines/ a symlink"])
def test_an_unhashed_engine_in_the_artifact_is_never_read(
    artifact: Path, cache_dir: Path, tmp_path: Path, planted: str
) -> None:
    key = key_for(artifact)
    outside = tmp_path / "outside"
    write_engine(outside / key.filename, ENGINE, key)  # a valid engine with a matching sidecar
    engines = artifact / ENGINES
    if planted == "engines/ a symlink":
        engines.symlink_to(outside, target_is_directory=True)
    else:
        engines.mkdir()
        if planted == "file":
            write_engine(engines / key.filename, ENGINE, key)
        elif planted == "fifo":  # opened the old way, this would hang the load
            os.mkfifo(engines / key.filename)
            sidecar_path(engines / key.filename).write_bytes(
                sidecar_path(outside / key.filename).read_bytes()
            )
        else:
            (engines / key.filename).symlink_to(outside / key.filename)
            sidecar_path(engines / key.filename).symlink_to(sidecar_path(outside / key.filename))
    found = lookup(engine_cache(), key, artifact, read_manifest(artifact))
    assert not found.found and found.data is None
    assert found.path == cache_dir / ENGINES / key.filename  # a build goes to the runtime's cache
    assert any("not hashed in manifest.json, so not loaded" in r for r in found.reasons), found.reasons


def test_an_engine_the_manifest_hashes_is_used_and_checked(artifact: Path, cache_dir: Path) -> None:
    key = key_for(artifact)
    rel = f"{ENGINES}/{key.filename}"
    write_engine(artifact / rel, ENGINE, key)
    hash_into_manifest(artifact, rel, str(sidecar_path(rel)))
    found = lookup(engine_cache(), key, artifact, read_manifest(artifact))
    assert found.found and found.data == ENGINE and found.path == artifact / rel

    (artifact / rel).write_bytes(ENGINE[:-1] + b"\x00")  # changed after export: the hash no longer matches
    found = lookup(engine_cache(), key, artifact, read_manifest(artifact))
    assert not found.found and any("does not match its sha256 in manifest.json" in r for r in found.reasons)


def test_a_hashed_engine_needs_a_hashed_sidecar_and_no_links(
    artifact: Path, cache_dir: Path, tmp_path: Path
) -> None:
    key = key_for(artifact)
    rel = f"{ENGINES}/{key.filename}"
    write_engine(artifact / rel, ENGINE, key)
    hash_into_manifest(artifact, rel)  # the engine only
    found = lookup(engine_cache(), key, artifact, read_manifest(artifact))
    assert not found.found and any("sidecar" in r and "not hashed" in r for r in found.reasons)

    hash_into_manifest(artifact, rel, str(sidecar_path(rel)))
    real = tmp_path / "real.engine"
    real.write_bytes((artifact / rel).read_bytes())
    (artifact / rel).unlink()
    (artifact / rel).symlink_to(real)  # same bytes, same hash, but through a link
    found = lookup(engine_cache(), key, artifact, read_manifest(artifact))
    assert not found.found and any("symlink" in r for r in found.reasons), found.reasons


def test_the_backend_builds_into_its_own_cache_and_loads_what_it_verified(
    artifact: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """TensorRTBackend._ensure_engine with the GPU and the builder stood in: where it reads and writes."""
    key = key_for(artifact)
    write_engine(artifact / ENGINES / key.filename, b"planted", key)  # planted: never the one loaded
    built: list[Path] = []

    def fake_build(onnx_path, engine_path, max_batch, opt_batch, precision, timing, device, input_name):
        built.append(Path(engine_path))
        assert Path(timing).parent == cache_dir / ENGINES  # the timing cache lives in the private cache too
        write_engine(engine_path, ENGINE, key)
        return key

    monkeypatch.setattr(trt_backend, "build_engine", fake_build)
    monkeypatch.setattr(trt_backend.kernels, "compute_capability", lambda device: (8, 7))
    backend = SimpleNamespace(
        _trt=SimpleNamespace(__version__="10.3.0"),
        _cuda=SimpleNamespace(Device=lambda d: SimpleNamespace(name=lambda: key.gpu)),
        artifact=artifact,
        manifest=read_manifest(artifact),
        device=0,
        size=SIZE,
        max_batch=8,
        input_name="image",
    )
    with caplog.at_level(logging.INFO, logger="i2p"):
        path = trt_backend.TensorRTBackend._ensure_engine(backend)
    assert built == [cache_dir / ENGINES / key.filename] == [path]
    assert backend._engine_data == ENGINE  # the verified bytes, read once
    assert stat.S_IMODE((cache_dir / ENGINES).stat().st_mode) == 0o700
    assert "not hashed in manifest.json" in caplog.text
    built.clear()
    trt_backend.TensorRTBackend._ensure_engine(backend)  # second load: from the cache, no build
    assert built == [] and backend._engine_data == ENGINE


# -- the runtime's own cache --------------------------------------------------------------------------------


def test_the_cache_is_created_private(cache_dir: Path) -> None:
    path = engine_cache()
    assert path == cache_dir / ENGINES
    for directory in (cache_dir, path):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_group_writable_cache_is_tightened(cache_dir: Path) -> None:
    (cache_dir / ENGINES).mkdir(parents=True)
    os.chmod(cache_dir, 0o777)
    os.chmod(cache_dir / ENGINES, 0o775)
    engine_cache()
    assert stat.S_IMODE(cache_dir.stat().st_mode) & 0o022 == 0
    assert stat.S_IMODE((cache_dir / ENGINES).stat().st_mode) & 0o022 == 0


@pytest.mark.parametrize("linked", ["engines", "the cache root"])
def test_a_symlink_on_the_way_to_the_cache_is_refused(cache_dir: Path, tmp_path: Path, linked: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if linked == "engines":
        cache_dir.mkdir(mode=0o700)
        (cache_dir / ENGINES).symlink_to(elsewhere, target_is_directory=True)
    else:
        cache_dir.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(EngineBuildError, match="refusing the TensorRT engine cache: .* is a symlink"):
        engine_cache()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user needs root")
def test_a_cache_of_another_user_is_refused(cache_dir: Path) -> None:
    (cache_dir / ENGINES).mkdir(parents=True, mode=0o700)
    os.chown(cache_dir / ENGINES, 4242, 4242)
    with pytest.raises(EngineBuildError, match="belongs to user 4242"):
        engine_cache()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("which", ["engine", "sidecar"])
@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_links_and_fifos_in_the_cache_are_not_read(
    cache_dir: Path, tmp_path: Path, which: str, planted: str
) -> None:
    key = key_for(make_artifact(tmp_path / "b.i2p", size=SIZE))
    cache = engine_cache()
    outside = tmp_path / "outside"
    write_engine(outside / key.filename, ENGINE, key)
    write_engine(cache / key.filename, ENGINE, key)
    target = cache / key.filename if which == "engine" else sidecar_path(cache / key.filename)
    target.unlink()
    if planted == "symlink":
        target.symlink_to(outside / target.name)
    else:
        os.mkfifo(target)
    found = lookup(cache, key)
    assert not found.found and found.data is None
    reason = engine_mismatch(cache / key.filename, key)
    assert reason is not None and ("without following links" in reason or "not a regular file" in reason)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
def test_an_engine_of_another_user_in_the_cache_is_not_read(cache_dir: Path, tmp_path: Path) -> None:
    key = key_for(make_artifact(tmp_path / "b.i2p", size=SIZE))
    cache = engine_cache()
    write_engine(cache / key.filename, ENGINE, key)
    os.chown(cache / key.filename, 4242, 4242)
    assert "belongs to user 4242" in engine_mismatch(cache / key.filename, key)


def test_read_own_file_refuses_links_fifos_and_oversized_files(tmp_path: Path) -> None:
    """The reader of timing caches, engines and sidecars."""
    real = tmp_path / "timing.cache"
    real.write_bytes(b"x" * 100)
    assert read_own_file(real) == b"x" * 100
    (tmp_path / "link").symlink_to(real)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(UntrustedCacheError, match="without following links"):
        read_own_file(tmp_path / "link")
    with pytest.raises(UntrustedCacheError, match="not a regular file"):
        read_own_file(tmp_path / "fifo")
    with pytest.raises(UntrustedCacheError, match="over the 10-byte limit"):
        read_own_file(real, 10)
    with pytest.raises(FileNotFoundError):
        read_own_file(tmp_path / "absent")


def test_the_onnxruntime_tensorrt_ep_caches_engines_only_in_a_private_dir(
    cache_dir: Path, tmp_path: Path, caplog
) -> None:
    shape = ("image", 8, 3, SIZE, SIZE)
    private = cache_dir / "ort-trt" / "abcd"
    (trt, _opts), *_ = auto_providers(
        0, "fp16", [TENSORRT_EP, CPU_EP], engine_cache=private, input_shape=shape
    )
    assert _opts["trt_engine_cache_enable"] and _opts["trt_engine_cache_path"] == str(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    linked = cache_dir / "ort-trt" / "linked"
    linked.symlink_to(tmp_path, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="i2p"):
        (trt, opts), *_ = auto_providers(
            0, "fp16", [TENSORRT_EP, CPU_EP], engine_cache=linked, input_shape=shape
        )
    assert "trt_engine_cache_enable" not in opts and "is a symlink" in caplog.text
    with pytest.raises(UntrustedCacheError):
        private_dir(linked)


@pytest.mark.parametrize(
    "sidecar",
    [b"[" * 30_000 + b"]" * 30_000, b'{"sha256": ' + b"7" * 5000 + b"}", b"{not json", b"[]"],
    ids=["nested", "long-int", "bad-json", "list"],
)
def test_a_malformed_sidecar_means_rebuild_not_a_crash(
    cache_dir: Path, artifact: Path, sidecar: bytes
) -> None:
    key = key_for(artifact)
    path = private_dir(engine_cache()) / "x.engine"
    write_engine(path, ENGINE, key)
    sidecar_path(path).write_bytes(sidecar)
    with pytest.raises(StaleEngine):
        read_engine(path, key)
