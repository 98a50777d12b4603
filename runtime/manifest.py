"""``manifest.json``: what an exported artifact directory holds, and the checks before anything is used.

Written by ``i2p.export``, read by ``Detector``. The runtime trusts a file only after its sha256
matches the manifest, and refuses a manifest from a newer format version than it understands.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from i2p.base.files import sha256_file

from .preprocess import PreprocessSpec

FORMAT = "i2p-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """The artifact directory is missing, tampered with, or from an incompatible version."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16"
    shape: tuple[int | str, ...]  # "batch" marks the dynamic axis


@dataclass(frozen=True)
class ModelFile:
    """One network file of the artifact."""

    path: str  # relative to the artifact directory
    precision: str  # "fp32" | "fp16"
    format: str = "onnx"


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
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def model(self, precision: str, format: str = "onnx") -> ModelFile | None:
        """The portable network file of a precision (``format="onnx"``: runs on every backend)."""
        return next((m for m in self.models if m.precision == precision and m.format == format), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise ArtifactError(f"not an i2p artifact manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {version!r} is newer than this i2p supports ({FORMAT_VERSION}); "
                "upgrade i2p-detector or re-export with this version"
            )
        try:
            return cls(
                **{
                    **d,
                    "preprocess": PreprocessSpec.from_dict(d["preprocess"]),
                    "inputs": tuple(
                        TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["inputs"]
                    ),
                    "outputs": tuple(
                        TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["outputs"]
                    ),
                    "models": tuple(ModelFile(**m) for m in d["models"]),
                }
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"malformed manifest: {e}") from e


def read_manifest(artifact: str | os.PathLike) -> Manifest:
    """Parse ``ARTIFACT/manifest.json`` with errors that name the directory and the problem."""
    root = Path(artifact)
    if not root.is_dir():
        raise ArtifactError(f"{root}: no such artifact directory (expected the output of i2p-export)")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST} here; is this an i2p-export output directory?")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from e
    try:
        return Manifest.from_dict(data)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from e


def verify_file(artifact: str | os.PathLike, manifest: Manifest, rel: str) -> Path:
    """Return the path of ``rel`` once its sha256 matches the manifest; raise ArtifactError otherwise."""
    path = Path(artifact) / rel
    expected = manifest.files.get(rel)
    if expected is None:
        raise ArtifactError(f"{path}: not listed in {MANIFEST}; refusing an unverified file")
    if not path.is_file():
        raise ArtifactError(f"{path}: listed in {MANIFEST} but missing")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"{path}: sha256 {actual[:16]}… does not match the manifest ({expected[:16]}…); "
            "the file was modified or truncated, re-export the artifact"
        )
    return path
