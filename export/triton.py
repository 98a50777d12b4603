"""A Triton Inference Server model repository that takes encoded images: ``i2p-export --triton REPO``.

Four models, each ``REPO/<model>/config.pbtxt`` + version ``1/``:

- ``i2p_preprocess`` (Python backend): image file bytes -> float32 [3, S, S] + a per-image error, decoded
  by ``i2p.runtime``'s own preprocessing (``i2p.runtime.serving.decode_batch``);
- ``i2p_network``: the exported network, as a TensorRT plan (``tensorrt_plan``), ONNX (``onnxruntime_onnx``),
  or a Python-backend model that runs the artifact through the runtime's ONNX Runtime backend (for
  CPU-only servers, and for Triton builds without an ONNX Runtime backend);
- ``i2p_postprocess`` (Python backend): logit + decode error -> probability, label, error, by the
  Detector's rule and the artifact's calibrated threshold;
- ``i2p``: the ensemble clients call (``image`` BYTES in; ``probability``, ``label``, ``error`` out).

OOD: an artifact whose network has the ``ood`` output (``schema.OodSpec``) also gets it through the
network step (as the ensemble tensor ``ood_score``) into postprocessing, and the ensemble returns ``ood``
and ``uncertain`` per image (ood > the artifact's OOD threshold, the ``ood_threshold`` parameter of the
postprocess model and of the ensemble). Without it (artifacts exported before the OOD score, or from a
checkpoint without a density) neither output exists and the ensemble's ``ood_threshold`` says ``absent``.

Operating points: the labels use the artifact's default threshold unless the request carries the
parameter ``operating_point`` (a point's name); Triton (>= 2.39) forwards an ensemble request's
parameters to its steps, and postprocessing looks the name up in the ``operating_points`` parameter
(JSON name -> threshold, also on the ensemble's config for clients). An unknown name fails the request
with the names there are. Re-write the repository after ``i2p calibrate`` adds a point.

Configs are built with Triton's own ModelConfig protobuf and printed with ``text_format``, so they are
well-formed by construction. With ``max_batch_size > 0`` Triton owns the leading batch axis, and a
batch-only tensor is declared ``dims: [1]`` (the ONNX/TensorRT network produces ``[batch]``, hence
``reshape: { shape: [] }`` there). The Python models' sources ship inside this package
(``triton_models/``) and are copied as ``1/model.py``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from i2p.runtime.manifest import MANIFEST, Manifest
from i2p.runtime.schema import OOD_OUTPUT
from i2p.runtime.serving import (
    DECODE_ERROR,
    ENSEMBLE,
    IMAGE,
    LOGIT,
    OOD_ABSENT,
    OOD_SCORE,
    OOD_VERDICT,
    PIXELS,
    STEPS,
    VERDICT,
)

from .artifact import ENGINES, check_target, staged_directory
from .network import ExportError
from .onnx_export import INPUT

CONFIG = "config.pbtxt"
BACKENDS = ("auto", "tensorrt", "onnxruntime", "python")
PLAN, ONNX = "model.plan", "model.onnx"
POINTS = "operating_points"  # parameter of the postprocess model and the ensemble: JSON name -> threshold
ARTIFACT_DIR = "artifact"  # inside i2p_network/1/ for the Python backend: manifest + FP32 ONNX files
# How long the dynamic batcher may hold a request for more (µs). Measured with benchmarks/serve.py on the
# 2-core CPU server (docs/performance.md, "Serving"; docs/serving.md): 0, 2 ms and 10 ms were within noise
# of each other at 16 clients (two runs ranked them differently), as requests queue anyway while the one
# network instance is busy (batches of ~7-8 formed either way); 0 never delays a request on an idle
# server. On a GPU, where a batch costs little more than one image, measure again (docs/serving.md).
QUEUE_DELAY_US = 0


@dataclass(frozen=True)
class TritonOptions:
    """How the repository serves the network; defaults are the measured ones (docs/serving.md)."""

    backend: str = "auto"  # auto: the TensorRT plan if this export built one, else ONNX Runtime
    name: str = ENSEMBLE  # the ensemble; composing models are <name>_preprocess etc.
    max_batch: int = 32
    queue_delay_us: int = QUEUE_DELAY_US
    preprocess_instances: int = 2  # decoding is CPU work in Python: one process per instance
    network_threads: int = 0  # Python-backend network: ONNX Runtime intra-op threads (0 = its default)

    def model(self, step: str) -> str:
        return f"{self.name}_{step}"


def check_repository(repo: Path, opts: TritonOptions, force: bool) -> None:
    """Refuse early (before a slow export) to overwrite model folders that are not ours, or without --force."""
    if opts.backend not in BACKENDS:
        raise ExportError(f"--triton-backend must be one of {', '.join(BACKENDS)}, not {opts.backend!r}")
    if repo.is_dir():
        for model in (opts.name, *(opts.model(s) for s in STEPS)):
            check_target(repo / model, force, marker=CONFIG)


def write_repository(
    repo: Path, artifact: Path, manifest: Manifest, opts: TritonOptions, force: bool
) -> tuple[Path, list[str]]:
    """Write the four models (each folder atomically) into ``repo``; returns the ensemble's folder and notes."""
    check_repository(repo, opts, force)
    repo.mkdir(parents=True, exist_ok=True)
    kind, source = _network_source(artifact, manifest, opts.backend)
    size, ood = manifest.preprocess.size, manifest.ood is not None
    notes = [f"Triton: ensemble {opts.name!r} in {repo}, network on {kind}"]
    with staged_directory(repo / opts.model("preprocess"), force, marker=CONFIG) as staging:
        params = {"preprocess": json.dumps(manifest.preprocess.to_dict())}
        _write_python_model(staging, opts, "preprocess", params, opts.preprocess_instances, size, ood)
    with staged_directory(repo / opts.model("network"), force, marker=CONFIG) as staging:
        (staging / "1").mkdir()
        if kind == "python":
            _copy_fp32_models(artifact, manifest, staging / "1" / ARTIFACT_DIR)
            params = {"artifact": ARTIFACT_DIR, "threads": str(opts.network_threads)}
            _write_python_model(staging, opts, "network", params, 1, size, ood)
        else:
            (staging / CONFIG).write_text(_network_config(opts, kind, size, ood))
            if source is not None:
                shutil.copyfile(source, staging / "1" / (PLAN if kind == "tensorrt" else ONNX))
            else:
                notes.append(
                    f"Triton: no TensorRT engine was built here; build it on the serving GPU and copy it to "
                    f"{repo / opts.model('network') / '1' / PLAN} (docs/serving.md)"
                )
    with staged_directory(repo / opts.model("postprocess"), force, marker=CONFIG) as staging:
        params = {"threshold": repr(float(manifest.threshold)), POINTS: _points_json(manifest)}
        if ood:
            params["ood_threshold"] = _ood_threshold(manifest)
        _write_python_model(staging, opts, "postprocess", params, 1, size, ood)
    with staged_directory(repo / opts.name, force, marker=CONFIG) as staging:
        (staging / CONFIG).write_text(_ensemble_config(opts, manifest, kind, _precision(kind, manifest)))
        (staging / "1").mkdir()  # Triton wants a version folder even for an ensemble
    return repo / opts.name, notes


def _ood_threshold(manifest: Manifest) -> str:
    """The ``ood_threshold`` parameter: above it a verdict is uncertain; ``absent`` without the OOD output."""
    return OOD_ABSENT if manifest.ood is None else repr(float(manifest.ood.threshold))


def _points_json(manifest: Manifest) -> str:
    """name -> threshold of every operating point: a request's ``operating_point`` parameter picks one."""
    return json.dumps({name: p.threshold for name, p in manifest.operating_points.items()}, sort_keys=True)


def _network_source(artifact: Path, manifest: Manifest, backend: str) -> tuple[str, Path | None]:
    """(tensorrt|onnxruntime|python, the file Triton loads): FP16 ONNX when exported, else FP32."""
    engines = sorted((artifact / ENGINES).glob("*.engine"))
    if backend == "auto":
        backend = "tensorrt" if engines else "onnxruntime"
    if backend == "tensorrt":
        return backend, engines[0] if engines else None
    if backend == "python":
        return backend, None
    models = manifest.choose("gpu")  # the catalogue's GPU order: FP16 ONNX, then FP32
    if not models:
        raise ExportError(f"{artifact}: the manifest lists no ONNX model for Triton")
    return backend, artifact / models[0].path


def _copy_fp32_models(artifact: Path, manifest: Manifest, target: Path) -> None:
    """What ``Detector(backend='onnxruntime', precision='fp32')`` loads on a CPU: the FP32 files, and a manifest
    that lists only them (the Detector checks every listed file at load, so it cannot name files left out)."""
    target.mkdir()
    kept = tuple(m for m in manifest.models if m.precision == "fp32")
    dropped = {m.path for m in manifest.models} - {m.path for m in kept}
    files = {rel: digest for rel, digest in manifest.files.items() if rel not in dropped}
    trimmed = dataclasses.replace(manifest, models=kept, files=files)
    Manifest.from_dict(json.loads(trimmed.to_json()))  # still a valid manifest
    (target / MANIFEST).write_text(trimmed.to_json())
    for rel in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact / rel, target / rel)


def _write_python_model(
    staging: Path,
    opts: TritonOptions,
    step: str,
    params: dict[str, str],
    instances: int,
    size: int,
    ood: bool,
) -> None:
    """config.pbtxt and ``1/model.py`` (this package's ``triton_models/<step>.py``)."""
    (staging / CONFIG).write_text(_python_config(opts, step, params, instances, size, ood))
    (staging / "1").mkdir(exist_ok=True)
    source = resources.files("i2p.export").joinpath("triton_models", f"{step}.py")
    (staging / "1" / "model.py").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")


def _mc() -> Any:
    """Triton's generated ModelConfig protobuf module (tritonclient, imported only when writing)."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _base_config(opts: TritonOptions, model: str) -> Any:
    mc = _mc()
    config = mc.ModelConfig(name=model, max_batch_size=opts.max_batch)
    config.dynamic_batching.max_queue_delay_microseconds = opts.queue_delay_us
    return config


def _python_config(
    opts: TritonOptions, step: str, params: dict[str, str], instances: int, size: int, ood: bool
) -> str:
    """config.pbtxt of a Python-backend step; tensors as in ``i2p.runtime.serving`` (``ood``: the network
    has the OOD output, which the network step returns and postprocessing turns into ood and uncertain)."""
    from google.protobuf import text_format

    mc = _mc()
    config = _base_config(opts, opts.model(step))
    config.backend = "python"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    for key, value in params.items():
        config.parameters[key].string_value = value
    fp32, text, chw = mc.TYPE_FP32, mc.TYPE_STRING, [3, size, size]
    verdict = [(name, dtype, [1]) for name, dtype in _verdict_types(ood)]
    score = [(OOD_OUTPUT, fp32, [1])] if ood else []
    inputs, outputs = {
        "preprocess": ([(IMAGE, text, [1])], [(PIXELS, fp32, chw), (DECODE_ERROR, text, [1])]),
        "network": ([(INPUT, fp32, chw)], [(LOGIT, fp32, [1]), *score]),
        "postprocess": (
            [(LOGIT, fp32, [1]), (DECODE_ERROR, text, [1]), *([(OOD_SCORE, fp32, [1])] if ood else [])],
            verdict,
        ),
    }[step]
    for name, dtype, dims in inputs:
        config.input.add(name=name, data_type=dtype, dims=dims)
    for name, dtype, dims in outputs:
        config.output.add(name=name, data_type=dtype, dims=dims)
    return text_format.MessageToString(config)


def _verdict_types(ood: bool) -> list[tuple[str, int]]:
    """(name, Triton data type) of the ensemble's outputs: VERDICT, then OOD_VERDICT with the OOD output."""
    mc = _mc()
    types = {"probability": mc.TYPE_FP32, OOD_OUTPUT: mc.TYPE_FP32, "uncertain": mc.TYPE_BOOL}
    return [(name, types.get(name, mc.TYPE_STRING)) for name in (*VERDICT, *(OOD_VERDICT if ood else ()))]


def _network_config(opts: TritonOptions, kind: str, size: int, ood: bool) -> str:
    """The ONNX Runtime or TensorRT network: float32 image [3, S, S] in, logit (and ood) out ([batch] -> [1])."""
    from google.protobuf import text_format

    mc = _mc()
    config = _base_config(opts, opts.model("network"))
    config.platform = "tensorrt_plan" if kind == "tensorrt" else "onnxruntime_onnx"
    config.default_model_filename = PLAN if kind == "tensorrt" else ONNX
    config.input.add(name=INPUT, data_type=mc.TYPE_FP32, dims=[3, size, size])
    for name in (LOGIT, *((OOD_OUTPUT,) if ood else ())):
        config.output.add(
            name=name, data_type=mc.TYPE_FP32, dims=[1], reshape=mc.ModelTensorReshape(shape=[])
        )
    return text_format.MessageToString(config)


def _precision(kind: str, manifest: Manifest) -> str:
    if kind == "onnxruntime" and manifest.model("fp16") is not None:
        return "fp16"
    return "fp16" if kind == "tensorrt" else "fp32"


def _ensemble_config(opts: TritonOptions, manifest: Manifest, kind: str, precision: str) -> str:
    """bytes -> preprocess -> network -> postprocess; threshold, network and artifact recorded for clients."""
    from google.protobuf import text_format

    mc = _mc()
    config = mc.ModelConfig(name=opts.name, platform="ensemble", max_batch_size=opts.max_batch)
    config.input.add(name=IMAGE, data_type=mc.TYPE_STRING, dims=[1])
    ood = manifest.ood is not None
    verdict = _verdict_types(ood)
    for name, dtype in verdict:
        config.output.add(name=name, data_type=dtype, dims=[1])
    config.parameters["threshold"].string_value = repr(float(manifest.threshold))
    config.parameters["ood_threshold"].string_value = _ood_threshold(manifest)
    config.parameters[POINTS].string_value = _points_json(manifest)
    config.parameters["artifact"].string_value = manifest.name
    config.parameters["network"].string_value = kind
    config.parameters["precision"].string_value = precision
    score = {OOD_SCORE: OOD_SCORE} if ood else {}
    steps = (
        ("preprocess", {IMAGE: IMAGE}, {PIXELS: PIXELS, DECODE_ERROR: DECODE_ERROR}),
        ("network", {INPUT: PIXELS}, {LOGIT: LOGIT, **({OOD_OUTPUT: OOD_SCORE} if ood else {})}),
        ("postprocess", {LOGIT: LOGIT, DECODE_ERROR: DECODE_ERROR, **score}, {v: v for v, _ in verdict}),
    )
    for step, inputs, outputs in steps:
        config.ensemble_scheduling.step.add(
            model_name=opts.model(step), model_version=-1, input_map=inputs, output_map=outputs
        )
    return text_format.MessageToString(config)
