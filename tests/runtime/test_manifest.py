"""Hostile artifacts: every manifest field typed and ranged, files confined to the artifact, size caps,
the network's input shape checked against the manifest. Each case must be refused at load, with a
message naming manifest.json (or the file) and the field, through the API and through i2p-detect."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from i2p.base.files import sha256_file
from i2p.runtime import ArtifactError, Detector
from i2p.runtime.detect_cli import detect
from i2p.runtime.manifest import MAX_MANIFEST_BYTES, Manifest, read_manifest
from tests.support.corpus import base_image, encode
from tests.support.fake_artifact import make_artifact


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("pristine") / "a.i2p")


@pytest.fixture
def artifact(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (tests tamper with it)."""
    root = tmp_path / "a.i2p"
    root.mkdir()
    for f in pristine.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    return root


def manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def rewrite(root: Path, data: dict[str, Any]) -> None:
    (root / "manifest.json").write_text(json.dumps(data))


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_path(d, "preprocess/mean", x)``; numeric parts index lists; value DELETE removes the key."""
    *parents, last = dotted.split("/")
    node: Any = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value


DELETE = object()

# (field, bad value, what the message must name). Every field, wrong types and values out of range.
BAD_FIELDS = [
    ("format_version", True, "format_version"),
    ("format_version", "1", "format_version"),
    ("format_version", 0, "format_version"),
    ("name", 5, "'name'"),
    ("name", "", "'name'"),
    ("backbone", None, "'backbone'"),
    ("backbone", ["ViT-B-16"], "'backbone'"),
    ("layer", "1", "'layer'"),
    ("layer", 0, "'layer'"),
    ("layer", 1.0, "'layer'"),
    ("num_layers", 0, "'num_layers'"),  # fewer blocks than L*
    ("num_layers", 10**9, "'num_layers'"),
    ("threshold", "0.5", "'threshold'"),
    ("threshold", float("nan"), "'threshold'"),
    ("threshold", 7, "'threshold'"),
    ("threshold", -0.1, "'threshold'"),
    ("threshold", True, "'threshold'"),
    ("preprocess", "bicubic", "'preprocess'"),
    ("preprocess/size", "64", "size"),
    ("preprocess/size", -32, "size"),
    ("preprocess/size", 10**6, "size"),
    ("preprocess/size", 32.0, "size"),
    ("preprocess/mean", "abc", "mean"),
    ("preprocess/mean", [0.5, 0.5], "mean"),
    ("preprocess/mean", [0.5, "x", 0.5], "mean[G]"),
    ("preprocess/mean", [0.5, 0.5, float("inf")], "mean[B]"),
    ("preprocess/std", [0.2, 0.0, 0.2], "std[G]"),
    ("preprocess/std", [float("nan"), 0.2, 0.2], "std[R]"),
    ("preprocess/std", [0.2, 0.2, -1], "std[B]"),
    ("preprocess/max_pixels", 10**18, "max_pixels"),
    ("preprocess/max_pixels", 1e7, "max_pixels"),
    ("preprocess/max_pixels", 100, "max_pixels"),  # below one size x size image
    ("preprocess/crop", "random", "crop"),
    ("preprocess/interpolation", 3, "interpolation"),
    ("preprocess/colour", "rgb", "unknown preprocessing keys"),
    ("inputs", {}, "'inputs'"),
    ("inputs", [], "'inputs'"),
    ("inputs/0", "image", "'inputs[0]'"),
    ("inputs/0/dtype", "float64", "inputs[0].dtype"),
    ("inputs/0/shape", "batch,3,32,32", "inputs[0].shape"),
    ("inputs/0/shape", ["batch", 3, -32, 32], "inputs[0].shape"),
    ("inputs/0/shape", ["batch", 3, 32, True], "inputs[0].shape"),
    ("inputs/0/name", 7, "'name'"),
    ("outputs/0/shape", [], "outputs[0].shape"),
    ("models", "model.onnx", "'models'"),
    ("models/0", ["model.onnx", "fp32"], "'models[0]'"),
    ("models/0/precision", "int4", "models[0].precision"),
    ("models/0/path", 3, "models[0].path"),
    ("files", [], "'files'"),
    ("files/model.onnx", "abc", "files.model.onnx"),
    ("files/model.onnx", 12, "files.model.onnx"),
    ("tools", "onnx", "'tools'"),
    ("tools/onnx", 1.15, "tools.onnx"),
    ("extra", [], "'extra'"),
    ("pool", "max", "'pool'"),
    ("pool", None, "'pool'"),
    ("pool", ["cls"], "'pool'"),
    ("layer", DELETE, "missing field(s) ['layer']"),
    ("preprocess", DELETE, "missing field(s) ['preprocess']"),
    ("surprise", 1, "unknown field(s) ['surprise']"),
]


@pytest.mark.parametrize(
    ("field", "value", "named"), BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_FIELDS]
)
def test_every_field_is_typed_and_ranged(artifact: Path, field: str, value: Any, named: str) -> None:
    data = manifest(artifact)
    set_path(data, field, value)
    rewrite(artifact, data)
    with pytest.raises(ArtifactError) as e:
        Detector(artifact)
    assert str(artifact / "manifest.json") in str(e.value) and named in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"[1, 2]", "must be a JSON object"),
        (b'"i2p-artifact"', "must be a JSON object"),
        (b"{not json", "not valid JSON"),
        (b'{"format": "i2p-artifact", "name": "\xff\xfe"}', "not UTF-8"),
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
        (b'{"format": "i2p-artifact", "threshold": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"format_version": -' + b"1" * 100_000 + b"}", "not valid JSON"),
        (b'{"format": "onnx"}', "not an i2p artifact manifest"),
    ],
    ids=[
        "list",
        "string",
        "bad-json",
        "not-utf8",
        "deep",
        "deep-objects",
        "long-int",
        "long-negative-int",
        "other-format",
    ],
)
def test_malformed_manifest_files(artifact: Path, text: bytes, message: str) -> None:
    (artifact / "manifest.json").write_bytes(text)
    with pytest.raises(ArtifactError, match=message) as e:
        read_manifest(artifact)
    assert str(artifact / "manifest.json") in str(e.value)


def test_an_oversized_manifest_is_refused_unread(artifact: Path) -> None:
    """99 MB (sparse): refused from its size; RSS does not grow by what a read + parse would cost."""
    with open(artifact / "manifest.json", "r+b") as f:
        f.truncate(99 * 2**20)
    rss0 = psutil.Process().memory_info().rss
    with pytest.raises(ArtifactError, match=f"over the {MAX_MANIFEST_BYTES:,}-byte manifest limit"):
        Detector(artifact)
    assert psutil.Process().memory_info().rss - rss0 < 20 * 2**20


def test_a_manifest_just_under_the_cap_loads(artifact: Path) -> None:
    data = manifest(artifact)
    data["extra"] = {"padding": "x" * (MAX_MANIFEST_BYTES - len(json.dumps(data)) - 100)}
    rewrite(artifact, data)
    assert Detector(artifact).manifest.name == "fake"


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../outside.onnx",
        "sub/../../outside.onnx",
        "./model.onnx",
        "sub//model.onnx",
        "..\\outside.onnx",
        "model.onnx\0.txt",
        "",
    ],
)
def test_listed_paths_must_stay_inside(artifact: Path, path: str) -> None:
    data = manifest(artifact)
    data["files"][path] = data["files"]["model.onnx"]
    data["models"][0]["path"] = path
    rewrite(artifact, data)
    with pytest.raises(ArtifactError, match="relative") as e:
        Detector(artifact, precision="fp32")
    assert "manifest.json" in str(e.value)


def _outside_model(artifact: Path, tmp_path: Path) -> Path:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model.onnx").write_bytes((artifact / "model.onnx").read_bytes())
    return outside


def test_a_symlinked_model_is_refused_even_with_the_right_hash(artifact: Path, tmp_path: Path) -> None:
    outside = _outside_model(artifact, tmp_path)
    (artifact / "model.onnx").unlink()
    os.symlink(outside / "model.onnx", artifact / "model.onnx")  # same bytes, so the sha256 would match
    with pytest.raises(ArtifactError, match="model.onnx is a symlink"):
        Detector(artifact, precision="fp32")


def test_a_symlinked_directory_on_the_way_is_refused(artifact: Path, tmp_path: Path) -> None:
    outside = _outside_model(artifact, tmp_path)
    os.symlink(outside, artifact / "sub")
    data = manifest(artifact)
    data["files"]["sub/model.onnx"] = data["files"]["model.onnx"]
    data["models"][0]["path"] = "sub/model.onnx"
    rewrite(artifact, data)
    with pytest.raises(ArtifactError, match="sub is a symlink"):
        Detector(artifact, precision="fp32")


@pytest.mark.timeout(30)
def test_a_symlink_is_refused_before_it_is_read(artifact: Path, tmp_path: Path) -> None:
    """The link points at a FIFO: hashing it would block forever, so passing proves nothing read it."""
    os.mkfifo(tmp_path / "fifo")
    (artifact / "model.onnx").unlink()
    os.symlink(tmp_path / "fifo", artifact / "model.onnx")
    with pytest.raises(ArtifactError, match="symlink"):
        Detector(artifact, precision="fp32")


def test_a_symlinked_manifest_is_refused(artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "m.json").write_bytes((artifact / "manifest.json").read_bytes())
    (artifact / "manifest.json").unlink()
    os.symlink(tmp_path / "m.json", artifact / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json: is a symlink"):
        Detector(artifact)


def test_a_listed_directory_or_fifo_is_refused(artifact: Path) -> None:
    data = manifest(artifact)
    (artifact / "adir").mkdir()
    os.mkfifo(artifact / "afifo")
    for name in ("adir", "afifo"):
        data["files"][name] = data["files"]["model.onnx"]
        data["models"][0]["path"] = name
        rewrite(artifact, data)
        with pytest.raises(ArtifactError, match=f"{name}: not a regular file inside the artifact"):
            Detector(artifact, precision="fp32")


def test_the_network_input_must_match_the_manifest(tmp_path: Path) -> None:
    """A 16x16 network under a manifest that says 32: refused at load, not at the first predict."""
    small = make_artifact(tmp_path / "small.i2p", size=16)
    data = manifest(small)
    data["preprocess"]["size"] = 32
    data["inputs"][0]["shape"] = ["batch", 3, 32, 32]
    rewrite(small, data)
    for precision in ("fp32", "fp16"):
        with pytest.raises(
            ArtifactError, match=r"takes 'image' as \['batch', 3, 16, 16\].*says \['batch', 3, 32, 32\]"
        ):
            Detector(small, precision=precision)
    data["inputs"][0]["name"] = "pixels"
    rewrite(small, data)
    with pytest.raises(ArtifactError, match="has no input 'pixels'"):
        Detector(small, precision="fp32")


def test_a_checkpoint_is_named_as_one(tmp_path: Path) -> None:
    for name, head in (("run/checkpoint.safetensors", b"{}"), ("run/weights.bin", b"\x10\0\0\0\0\0\0\0{")):
        ckpt = tmp_path / name
        ckpt.parent.mkdir(exist_ok=True)
        ckpt.write_bytes(head + b" " * 16)
        with pytest.raises(ArtifactError, match="training checkpoint.*i2p-export --ckpt") as e:
            Detector(ckpt)
        assert str(ckpt) in str(e.value) and str(ckpt.with_suffix(".i2p")) in str(e.value)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="a file, not an artifact directory"):
        Detector(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("threshold", float("nan"), "'threshold'"),
        ("preprocess.max_pixels", 10**18, "max_pixels"),
        ("models/0/path", "../model.onnx", "models[0].path"),
    ],
)
def test_i2p_detect_refuses_with_one_message(
    artifact: Path, tmp_path: Path, field: str, value: Any, named: str
) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(encode(base_image(), "PNG"))
    data = manifest(artifact)
    set_path(data, field, value)
    rewrite(artifact, data)
    result = CliRunner().invoke(detect, [str(image), "--model", str(artifact)])
    assert result.exit_code == 1, result.output  # a bad input file (README: exit codes)
    assert "Traceback" not in result.output and named in result.stderr and "manifest.json" in result.stderr


def test_the_pristine_artifact_still_loads(artifact: Path) -> None:
    """The checks refuse hostile manifests, not the real one (hashes re-checked after copying)."""
    det = Detector(artifact)
    assert sha256_file(artifact / "model.onnx") == det.manifest.files["model.onnx"]
    assert det.predict(np.zeros((8, 8, 3), np.uint8))[0].ok


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
FIELD_PATHS = [
    *(f for f, _, _ in BAD_FIELDS if not f.startswith(("files/", "tools/"))),
    "preprocess/std/1",
    "inputs/0/shape/2",
    "models/1",
]


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELD_PATHS), JSON_VALUES), min_size=1, max_size=3))
def test_any_field_replaced_by_any_json_is_loaded_valid_or_refused(pristine: Path, edits) -> None:
    """Whatever JSON lands in whichever fields: ArtifactError, or a manifest whose fields hold their types."""
    data = manifest(pristine)
    for field, value in edits:
        try:
            set_path(data, field, value)
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # the parent itself was replaced by an earlier edit
    try:
        m = Manifest.from_dict(json.loads(json.dumps(data)))
    except ArtifactError:
        return
    assert 0 <= m.threshold <= 1 and 1 <= m.layer <= m.num_layers
    assert all(0 < s <= 10 for s in m.preprocess.std) and isinstance(m.preprocess.size, int)
    assert all(isinstance(f.path, str) and f.path in m.files for f in m.models)
