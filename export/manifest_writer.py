"""The artifact's ``manifest.json`` (the contract ``i2p.runtime.manifest`` reads) and ``parity.json``.

Both are written once, last: file hashes are taken once the network files are final, and the engine
step (which needs a manifest to load the staged artifact) gets the same record in memory.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from i2p.base.files import sha256_file, write_json_atomic
from i2p.runtime.manifest import MANIFEST, ArtifactError, Manifest, TensorSpec
from i2p.runtime.model_files import FileKind
from i2p.runtime.schema import OOD_OUTPUT

from .build import FP16_ONNX, Build
from .network import ExportError
from .onnx_export import INPUT, OUTPUTS
from .parity import ParityReport

PARITY = "parity.json"


def describe(
    build: Build, kept: Sequence[FileKind], hashes: dict[str, str], parity: ParityReport
) -> Manifest:
    """The manifest of the staged artifact: the ``kept`` model files, ``hashes`` of every file."""
    opts, meta, net = build.opts, build.meta, build.net
    size = net.image_size
    return Manifest(
        name=opts.target.stem,
        backbone=meta.backbone.model,
        layer=net.layer,
        num_layers=net.num_layers,
        threshold=build.threshold,
        preprocess=build.spec,
        inputs=(TensorSpec(INPUT, "float32", ("batch", 3, size, size)),),
        outputs=tuple(
            TensorSpec(o, "float32", ("batch",)) for o in (*OUTPUTS, *((OOD_OUTPUT,) if net.ood else ()))
        ),
        models=tuple(kind.entry for kind in kept),
        files=dict(hashes),
        tools=tool_versions(),
        extra=_extra(build, parity),
        operating_points=dict(meta.operating_points or {}),  # calibrated on validation at training
        operating_point=meta.operating_point if meta.operating_points else "",
        pool=net.pool,
        ood=meta.ood if net.ood is not None else None,
    )


def write(
    build: Build, kept: Sequence[FileKind], staging: Path, hashes: dict[str, str], parity: ParityReport
) -> Manifest:
    """parity.json, then manifest.json listing every file's sha256 (parity.json's included)."""
    write_json_atomic(staging / PARITY, parity.to_dict())
    manifest = describe(build, kept, {**hashes, PARITY: sha256_file(staging / PARITY)}, parity)
    text = manifest.to_json()
    try:  # what exports also loads: the runtime's own checks, before anything is written
        Manifest.from_dict(json.loads(text))
    except ArtifactError as e:
        raise ExportError(f"{build.opts.ckpt}: the artifact's manifest would not load: {e}") from e
    write_json_atomic(staging / MANIFEST, text)
    return manifest


def _extra(build: Build, parity: ParityReport) -> dict[str, Any]:
    """Provenance and export facts the runtime does not need but a reader of the artifact does."""
    opts, meta, net = build.opts, build.meta, build.net
    name, value = build.largest_weight
    extra: dict[str, Any] = {
        "checkpoint": {"file": opts.ckpt.name, "sha256": build.checkpoint_sha256},
        "backbone_weights": {"pretrained": meta.backbone.pretrained, "sha256": meta.backbone.sha256},
        "backbone_family": meta.backbone.family,
        "baseline": meta.baseline,
        "metrics": meta.metrics,
        "compute_kept": f"{net.layer}/{net.num_layers} transformer blocks",
        "opset": opts.opset,
        "max_batch": opts.max_batch,
        "largest_abs_weight": {"name": name, "value": value},
        "parity": parity.summary(),
    }
    if opts.fp16:
        extra["fp16"] = {
            "file": FP16_ONNX,
            "io_dtype": "float32",
            "compute_dtype": "float16",
            "kept_in_fp32": list(opts.keep_fp32),
        }
    return extra


def tool_versions() -> dict[str, str]:
    tools = {"python": platform.python_version()}
    for dist in ("i2p-detector", "torch", "open_clip_torch", "timm", "onnx", "onnxruntime", "tensorrt"):
        try:
            tools[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return tools
