"""``manifest.json``: what an exported artifact directory holds, and the checks before anything is used.

Written by ``i2p.export``, read by ``Detector``. Nothing in a manifest is trusted:

- the file is at most ``MAX_MANIFEST_BYTES``, UTF-8 JSON, and not a symlink;
- every field has a type and a range, checked at load; an error names the file and the field. The
  fields a checkpoint shares (layers, threshold, preprocessing, operating points) are checked by
  ``schema``, the same rules training applies when it writes them, and so are the rules between fields;
- every listed path is relative, without ``..``, and resolves (no symlinks on the way) to a regular
  file inside the artifact directory before anything reads or hashes it;
- a file is used only once its sha256 matches the manifest, and the network's input shape must match
  the manifest's once the backend has it open (``check_session_io``).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from i2p.base.files import sha256_file

from . import schema
from .model_files import PRECISIONS, ModelFile, choose, kind_of
from .preprocess import PreprocessSpec
from .schema import OodSpec, OperatingPoint, SchemaError

FORMAT = "i2p-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a real manifest is ~5 KB; parity and metrics live in their own files
DTYPES = ("float32", "float16")
REQUIRED = frozenset(
    {"name", "backbone", "layer", "num_layers", "threshold", "preprocess", "inputs", "outputs", "models"}
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(RuntimeError):
    """The artifact directory is missing, tampered with, or from an incompatible version."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16"
    shape: tuple[int | str, ...]  # "batch" marks the dynamic axis


@dataclass(frozen=True)
class Manifest:
    name: str
    backbone: str  # open_clip model name
    layer: int  # L*: transformer blocks kept
    num_layers: int  # N: blocks in the full backbone
    threshold: float  # on the probability
    preprocess: PreprocessSpec
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    models: tuple[ModelFile, ...]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 of every file
    tools: dict[str, str] = field(default_factory=dict)  # package -> version used to export
    extra: dict[str, Any] = field(default_factory=dict)  # metrics, parity summary, checkpoint info
    # Named thresholds calibrated on validation ("balanced", "fpr_1pct", ...); ``threshold`` is the one
    # ``operating_point`` names (checked at load).
    operating_points: dict[str, OperatingPoint] = field(default_factory=dict)
    operating_point: str = ""
    # The layer feature the network reads after block L*: "cls" token or "mean" of the patch tokens
    # (a backbone without a class token); artifacts exported before backbone families mean "cls".
    pool: str = "cls"
    # The network's out-of-distribution output and its threshold (``schema.OodSpec``); None for artifacts
    # exported before it, or from checkpoints without a density: their predictions say ood is absent.
    ood: OodSpec | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def point_threshold(self, name: str) -> float:
        """The threshold of the named operating point; ArtifactError listing the ones there are."""
        if name not in self.operating_points:
            known = ", ".join(sorted(self.operating_points)) or "none (exported before operating points)"
            raise ArtifactError(f"no operating point {name!r} in this artifact; it has: {known}")
        return self.operating_points[name].threshold

    def model(self, precision: str, format: str = "onnx") -> ModelFile | None:
        """The portable network file of a precision (``format="onnx"``: runs on every backend)."""
        return next((m for m in self.models if m.precision == precision and m.format == format), None)

    def choose(self, device: str, precision: str | None = None) -> list[ModelFile]:
        """This artifact's models for ONNX Runtime on ``device``, in the catalogue's preference order."""
        return choose(self.models, device, precision)

    def to_json(self) -> str:
        d = asdict(self)
        d["operating_points"] = {name: p.to_dict() for name, p in self.operating_points.items()}
        if self.ood is None:
            del d["ood"]
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Validate every field (ArtifactError naming the field), then build."""
        try:
            return cls._from_dict(d)
        except SchemaError as e:
            raise ArtifactError(str(e)) from e

    @classmethod
    def _from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ArtifactError(f"the manifest must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ArtifactError(f"not an i2p artifact manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ArtifactError(f"field 'format_version' must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {version!r} is newer than this i2p supports ({FORMAT_VERSION}); "
                "upgrade i2p-detector or re-export with this version"
            )
        known = set(cls.__dataclass_fields__)
        missing = sorted(REQUIRED - set(d))
        if missing:
            raise ArtifactError(f"missing field(s) {missing}")
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise ArtifactError(f"unknown field(s) {unknown}; this i2p version knows {sorted(known)}")
        layer, num_layers = schema.layers(d["layer"], d["num_layers"])
        threshold = schema.probability(d["threshold"], "threshold")
        points = schema.operating_points(d.get("operating_points", {}))
        default = d.get("operating_point", "")
        if default != "":  # "": exported before operating points, or without them
            schema.point_name(default, "operating_point")
        schema.default_point(threshold, points, default)
        outputs = _tensors(d, "outputs")
        ood = schema.OodSpec.from_dict(d["ood"]) if d.get("ood") is not None else None
        declared = any(o.name == schema.OOD_OUTPUT for o in outputs)
        if declared != (ood is not None):
            raise ArtifactError(
                f"field 'ood' and an output named {schema.OOD_OUTPUT!r} go together; this manifest has "
                f"{'the output' if declared else 'no such output'} but {'a' if ood else 'no'} 'ood' field"
            )
        return cls(
            name=_string(d, "name"),
            backbone=_string(d, "backbone"),
            layer=layer,
            num_layers=num_layers,
            threshold=threshold,
            preprocess=schema.preprocess(d["preprocess"]),
            inputs=_tensors(d, "inputs"),
            outputs=outputs,
            models=_models(d),
            files=_files(d.get("files", {})),
            tools=_str_map(d.get("tools", {}), "tools"),
            extra=_object(d.get("extra", {}), "extra"),
            operating_points=points,
            operating_point=default,
            pool=schema.pool(d.get("pool", "cls")),
            ood=ood,
            format=FORMAT,
            format_version=version,
        )


# -- field checks: each raises ArtifactError naming the field ------------------------------------------


def _string(d: dict[str, Any], key: str, max_len: int = 256) -> str:
    value = d[key]
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ArtifactError(
            f"field {key!r} must be a non-empty string of at most {max_len} characters, got {value!r:.80}"
        )
    return value


def _object(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ArtifactError(f"field {key!r} must be an object, got {type(value).__name__}")
    return value


def _str_map(value: Any, key: str) -> dict[str, str]:
    for k, v in _object(value, key).items():
        if not isinstance(v, str):
            raise ArtifactError(f"field '{key}.{k}' must be a string, got {type(v).__name__}")
    return value


def _list(d: dict[str, Any], key: str, empty: bool = False) -> list[Any]:
    value = d[key]
    if not isinstance(value, list) or not (value or empty):
        raise ArtifactError(f"field {key!r} must be a non-empty list, got {value!r:.80}")
    return value


def _tensors(d: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    specs = []
    for i, t in enumerate(_list(d, key)):
        where = f"{key}[{i}]"
        if not isinstance(t, dict) or set(t) != {"name", "dtype", "shape"}:
            raise ArtifactError(
                f"field {where!r} must be an object with name, dtype and shape, got {t!r:.80}"
            )
        name, dtype, shape = _string(t, "name", 128), t["dtype"], t["shape"]
        if dtype not in DTYPES:
            raise ArtifactError(f"field '{where}.dtype' must be one of {list(DTYPES)}, got {dtype!r:.80}")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 8:
            raise ArtifactError(
                f"field '{where}.shape' must be a list of 1 to 8 dimensions, got {shape!r:.80}"
            )
        for dim in shape:
            ok_int = isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= 1 << 16
            if not ok_int and not (isinstance(dim, str) and 0 < len(dim) <= 64):
                raise ArtifactError(
                    f"field '{where}.shape' dimensions must be positive integers or axis names, got {dim!r:.80}"
                )
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    return tuple(specs)


def _models(d: dict[str, Any]) -> tuple[ModelFile, ...]:
    models = []
    for i, m in enumerate(_list(d, "models", empty=True)):  # none: the Detector says so
        where = f"models[{i}]"
        if not isinstance(m, dict) or not {"path", "precision"} <= set(m) <= {"path", "precision", "format"}:
            raise ArtifactError(
                f"field {where!r} must be an object with path, precision[, format], got {m!r:.80}"
            )
        if m["precision"] not in PRECISIONS:
            raise ArtifactError(
                f"field '{where}.precision' must be one of {list(PRECISIONS)}, got {m['precision']!r:.80}"
            )
        fmt = _string(m, "format", 64) if "format" in m else "onnx"
        model = ModelFile(_relative_path(m["path"], f"{where}.path"), m["precision"], fmt)
        if kind_of(model) is None:
            raise ArtifactError(
                f"field {where!r}: no kind of model file is {m['precision']} in format {fmt!r:.80} "
                "(see i2p.runtime.model_files)"
            )
        if any(kind_of(other) == kind_of(model) for other in models):
            raise ArtifactError(
                f"field {where!r}: a second {m['precision']} {fmt} model; each kind is listed once"
            )
        models.append(model)
    listed = set(_object(d.get("files", {}), "files"))
    for i, m in enumerate(models):
        if m.path not in listed:
            raise ArtifactError(
                f"field 'models[{i}].path': {m.path} is not listed in {MANIFEST}; refusing an unverified file"
            )
    return tuple(models)


def _files(value: Any) -> dict[str, str]:
    for rel, digest in _object(value, "files").items():
        _relative_path(rel, "files")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ArtifactError(f"field 'files.{rel}' must be a lowercase hex sha256, got {digest!r:.80}")
    return value


def _relative_path(rel: Any, key: str) -> str:
    """A plain relative POSIX path: no absolute path, no ``..``, no empty or odd components."""
    if not isinstance(rel, str) or not rel or len(rel) > 1024 or "\0" in rel or "\\" in rel:
        raise ArtifactError(f"field {key!r}: {rel!r:.80} is not a relative file path")
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or PurePosixPath(rel).is_absolute() or ".." in parts or rel != "/".join(parts):
        raise ArtifactError(
            f"field {key!r}: {rel!r:.80} must be a relative path inside the artifact (no '/' at the start, no '..')"
        )
    return rel


# -- reading --------------------------------------------------------------------------------------------


def read_manifest(artifact: str | os.PathLike) -> Manifest:
    """Parse ``ARTIFACT/manifest.json`` with errors that name the directory and the problem."""
    root = Path(artifact)
    if root.is_file():
        if root.suffix == ".safetensors" or _looks_like_safetensors(root):
            raise ArtifactError(
                f"{root}: this is a training checkpoint (i2p-train output), not an exported artifact; "
                f"export it first with `i2p-export --ckpt {root} --fp16`, then load the directory it "
                f"writes ({root.with_suffix('.i2p')})"
            )
        raise ArtifactError(f"{root}: a file, not an artifact directory (expected the output of i2p-export)")
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory (expected the output of i2p-export)")
    path = root / MANIFEST
    text = _read_capped(path, root)
    try:
        data = schema.parse_json(text)
    except SchemaError as e:
        raise ArtifactError(f"{path}: unreadable manifest, {e}") from None
    try:
        return Manifest.from_dict(data)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from e


def _read_capped(path: Path, root: Path) -> str:
    """manifest.json's text: a regular file (not a symlink) of at most MAX_MANIFEST_BYTES, UTF-8."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise ArtifactError(f"{root}: no {MANIFEST} here; is this an i2p-export output directory?") from None
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e.strerror or e})") from e
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"{path}: is a symlink; an artifact's files must be regular files inside it")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path}: not a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path}: {st.st_size:,} bytes is over the {MAX_MANIFEST_BYTES:,}-byte manifest limit"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e.strerror or e})") from e
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path}: over the {MAX_MANIFEST_BYTES:,}-byte manifest limit")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: not UTF-8 text ({e})") from e


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def confined_file(artifact: str | os.PathLike, rel: str) -> Path:
    """``ARTIFACT/rel`` once it is proven a regular file inside the artifact, reached without symlinks."""
    root = Path(artifact).resolve()
    _relative_path(rel, "files")
    path = root
    for part in PurePosixPath(rel).parts:
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            raise ArtifactError(f"{Path(artifact) / rel}: listed in {MANIFEST} but missing") from None
        except OSError as e:
            raise ArtifactError(f"{Path(artifact) / rel}: cannot read ({e.strerror or e})") from e
        if stat.S_ISLNK(mode):
            raise ArtifactError(
                f"{Path(artifact) / rel}: {path.name} is a symlink; an artifact's files must be regular files inside it"
            )
    if not stat.S_ISREG(mode) or root not in path.resolve().parents:
        raise ArtifactError(f"{Path(artifact) / rel}: not a regular file inside the artifact directory")
    return path


def verify_file(artifact: str | os.PathLike, manifest: Manifest, rel: str) -> Path:
    """Return the path of ``rel`` once it is confined to the artifact and its sha256 matches the manifest."""
    shown = Path(artifact) / rel
    expected = manifest.files.get(rel)
    if expected is None:
        raise ArtifactError(f"{shown}: not listed in {MANIFEST}; refusing an unverified file")
    path = confined_file(artifact, rel)
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"{shown}: sha256 {actual[:16]}… does not match the manifest ({expected[:16]}…); "
            "the file was modified or truncated, re-export the artifact"
        )
    return path


def check_session_io(artifact: str | os.PathLike, manifest: Manifest, session: Any) -> None:
    """The loaded network's input must have the manifest's name and fixed dimensions.

    ``session`` is an ONNX Runtime InferenceSession (``get_inputs()``), or None for backends that check
    their own input (TensorRT builds its engine from the verified ONNX and reads its shape there).
    """
    if session is None:
        return
    expected = manifest.inputs[0]
    actual = {i.name: list(i.shape) for i in session.get_inputs()}
    shape = actual.get(expected.name)
    problem = None
    if shape is None:
        problem = f"has no input {expected.name!r} (inputs: {sorted(actual)})"
    elif len(shape) != len(expected.shape) or any(
        isinstance(want, int) and isinstance(got, int) and want != got
        for want, got in zip(expected.shape, shape, strict=True)
    ):
        problem = f"takes {expected.name!r} as {shape}, but {MANIFEST} says {list(expected.shape)}"
    if problem:
        raise ArtifactError(f"{artifact}: the network {problem}; the artifact is inconsistent, re-export it")
