"""The steps that make the network files: load the checkpoint, merge and truncate, write ONNX FP32/FP16.

``Build`` is what the model steps start from (options, metadata, probe inputs and their PyTorch
reference, the merged network, notes of loading and merging); the steps that write model files return
what they made (``Produced``) rather than adding to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from i2p.base.files import sha256_file
from i2p.runtime.model_files import FP16, FP32
from i2p.runtime.preprocess import PreprocessSpec
from i2p.train import density as density_mod
from i2p.train.checkpoint import build_model, read_checkpoint, unfinished_run_warning
from i2p.train.density import Density
from i2p.train.metadata import CheckpointMeta
from i2p.train.model import I2PModel

from .fp16 import check_fp16_range, convert_fp16
from .network import DeployedDetector, ExportError, check_merge, deploy, largest_weight
from .onnx_export import check_graph, export_onnx
from .ood_head import OodHead, ood_reference
from .options import ExportOptions
from .parity_inputs import ProbeSet, probe_set, torch_outputs
from .produced import Produced

FP32_ONNX, FP16_ONNX = FP32.file, FP16.file
MERGE_ATOL, MERGE_PROBES = 1e-5, 4


@dataclass
class Build:
    """What the model steps start from: the checkpoint, the probes and their reference, the merged network."""

    opts: ExportOptions
    meta: CheckpointMeta
    probes: ProbeSet
    reference: dict[str, tuple[np.ndarray, np.ndarray]]  # PyTorch outputs per probe set
    net: DeployedDetector | None = None
    largest_weight: tuple[str, float] = ("", 0.0)
    notes: list[str] = field(default_factory=list)
    checkpoint_sha256: str = ""
    density: Density | None = None  # the checkpoint's OOD density (None: trained before it): an ood output
    ood_reference: dict[str, np.ndarray] | None = None  # PyTorch ood per probe set

    @property
    def spec(self) -> PreprocessSpec:
        return self.meta.preprocess

    @property
    def threshold(self) -> float:
        """The calibrated threshold (``load`` refuses a checkpoint without one)."""
        return self.meta.threshold


class Progress:
    """Step lines with timings for the slow parts (stderr under --json)."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.echo(f"{what} ...")
        start = time.perf_counter()
        yield
        self.echo(f"  done in {time.perf_counter() - start:.1f} s")


def load(opts: ExportOptions, progress: Progress) -> tuple[I2PModel, Build]:
    """The unmerged model, and its PyTorch outputs on the probe inputs (the parity reference)."""
    with progress.step(f"loading {opts.ckpt}"):
        ckpt = read_checkpoint(opts.ckpt)
        model, meta, density = build_model(ckpt, opts.backbone), ckpt.meta, density_mod.stored(ckpt)
    if meta.threshold is None:
        raise ExportError(f"{opts.ckpt}: the checkpoint has no calibrated threshold; finish training first")
    spec = meta.preprocess
    size = model.family.image_size(model.tower)
    if spec.size != size:
        raise ExportError(
            f"{opts.ckpt}: preprocessing makes {spec.size}x{spec.size} images but the network takes {size}"
        )
    unfinished = unfinished_run_warning(opts.ckpt, meta)
    notes: list[str] = [unfinished] if unfinished else []
    probes = probe_set(spec, opts.random_samples, opts.seed, opts.calib_images, opts.calib_limit, notes)
    inputs = probes.stacked()
    with progress.step(f"PyTorch FP32 reference on {len(inputs)} inputs (unmerged model)"):
        reference = probes.split(*torch_outputs(model, inputs, opts.max_batch))
        ood = probes.cut(ood_reference(model, density, inputs, opts.max_batch)) if density else None
    if density is None:
        notes.append("no OOD density in the checkpoint (trained before it): the network has no ood output")
    digest = sha256_file(opts.ckpt)
    build = Build(opts, meta, probes, reference, notes=notes, checkpoint_sha256=digest, density=density)
    build.ood_reference = ood
    return model, build


def merge(build: Build, model: I2PModel, echo: Callable[[str], None]) -> None:
    """Merge in place, check merged == unmerged on a few inputs, and check the weights fit FP16."""
    net = deploy(model, OodHead(build.density) if build.density is not None else None)
    images = build.probes.stacked()[:MERGE_PROBES]
    reference = np.concatenate([lo for lo, _ in build.reference.values()])[:MERGE_PROBES]
    err = check_merge(net, torch.from_numpy(images), torch.from_numpy(reference), MERGE_ATOL)
    build.net, build.largest_weight = net, largest_weight(net)
    name, value = build.largest_weight
    build.notes.append(f"merged == unmerged: max |Δlogit| {err:.2g} (limit {MERGE_ATOL:g})")
    build.notes.append(f"largest |weight| after merging: {value:.6g} ({name})")
    if build.opts.fp16 and (warning := check_fp16_range(name, value)):
        build.notes.append(f"warning: {warning}")
        echo(f"warning: {warning}")


def write_models(build: Build, staging: Path, progress: Progress) -> Produced:
    """model.onnx (checked for structure) and, with --fp16, model.fp16.onnx: the files every export keeps.

    Their parity is checked next (``parity_runs.onnx_parity``); a failure there fails the export.
    """
    opts, net = build.opts, build.net
    with progress.step(f"ONNX export (opset {opts.opset}, dynamic batch)"):
        export_onnx(net, staging / FP32_ONNX, opts.opset)
        summary = check_graph(staging / FP32_ONNX, net.layer, net.maps_per_block, 1 + (net.ood is not None))
    note = f"graph: {summary.blocks} transformer blocks, {summary.linear_maps} linear maps, no adapter ops"
    if not opts.fp16:
        return Produced(kept=(FP32,), notes=(note,))
    kept = ", ".join(opts.keep_fp32) or "none"
    with progress.step(f"FP16 conversion (float32 I/O; kept in FP32: {kept})"):
        convert_fp16(staging / FP32_ONNX, staging / FP16_ONNX, opts.keep_fp32)
    return Produced(kept=(FP32, FP16), notes=(note,))
