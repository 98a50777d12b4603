"""The GPU work behind ``benchmarks.gpu_check``: one function per check, each returning its figures.

A runner raises ``CheckFailed`` (an AssertionError carrying its figures) when the GPU disagrees with
the reference; any other exception is reported as an error. Heavy imports (torch, cupy, pycuda,
tensorrt) happen inside the runners, so only the checks that run pay for them.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from i2p import kernels
from i2p.runtime.preprocess import PreprocessSpec
from i2p.runtime.resample import kernel_batch, preprocess_reference

SPEC = PreprocessSpec(size=224)
# The other backbone families' modes (issue 23): the kernel reads them from its tables, so each must stay
# bit-exact with the reference too (SigLIP 2 and PE-Core squash, PE-Core bilinear, EVA-02 crop_pct 0.9).
FAMILY_SPECS = {
    "squash_bilinear": PreprocessSpec(size=224, resize="squash", interpolation="bilinear"),
    "squash_bicubic": PreprocessSpec(size=224, resize="squash"),
    "crop_pct_0.9": PreprocessSpec(size=224, crop_pct=0.9),
}
BATCHES = (1, 8, 64)
# Mixed sizes, tall (vertical pass first on Pillow >= 13), odd, 1x1, elongated; then the extremes.
MIXED = [(1, 1), (3, 47), (47, 3), (224, 224), (225, 223), (640, 480), (57, 913), (300, 1400), (120, 1900),
         (1000, 1400), (333, 777), (3, 500)]  # fmt: skip
EXTREMES = [(8000, 6000), (20, 30)]


class CheckFailed(AssertionError):
    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


def _tolerance_failures(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """|dlogit| figures, decision flips, and how many exceed 0.05 + 2% of |logit| (the FP16 tolerance)."""
    diff = np.abs(got.astype(np.float64) - want)
    return {
        "max_abs_dlogit": float(diff.max()),
        "mean_abs_dlogit": float(diff.mean()),
        "decision_flips": int(np.sum((got >= 0) != (want >= 0))),
        "over_tolerance": int(np.sum(diff > 0.05 + 0.02 * np.abs(want))),
        "logit_std": float(np.std(want)),
        "n": len(want),
    }


# -- the kernel -------------------------------------------------------------------------------------


@cache
def corpus() -> dict[str, tuple[PreprocessSpec, list[np.ndarray], np.ndarray]]:
    """name -> (spec, images, float32 reference [N, 3, S, S]), computed once for both kernel checks.

    Every batch in the CLIP mode; the mixed sizes also in each of ``FAMILY_SPECS``.
    """
    rng = np.random.default_rng(11)
    batches = {"mixed": MIXED, "extremes": EXTREMES}
    batches["batch64"] = [(int(rng.integers(1, 700)), int(rng.integers(1, 700))) for _ in range(64)]
    images = {name: [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
              for name, sizes in batches.items()}  # fmt: skip
    cases = [(name, SPEC, batch) for name, batch in images.items()]
    cases += [(f"mixed_{mode}", spec, images["mixed"]) for mode, spec in FAMILY_SPECS.items()]
    return {
        name: (spec, batch, np.stack([preprocess_reference(img, spec) for img in batch]))
        for name, spec, batch in cases
    }


def _compare_kernel(run: Callable[[list[np.ndarray], list[Any], type], np.ndarray]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    bad = []
    for dtype in (np.float32, np.float16):
        for name, (spec, images, reference) in corpus().items():
            fitted, tables = kernel_batch(images, spec)
            got = run(fitted, tables, dtype)
            want = reference.astype(dtype)
            mismatched = int(
                np.sum(got.view(np.uint8).reshape(len(got), -1) != want.view(np.uint8).reshape(len(want), -1))
            )
            key = f"{name}_{np.dtype(dtype).name}_mismatched_bytes"
            figures[key] = mismatched
            if mismatched:
                bad.append(key)
        _, images, _ = corpus()["batch64"]
        fitted, tables = kernel_batch(images, SPEC)
        run(fitted, tables, dtype)
        start = time.perf_counter()
        for _ in range(10):
            run(fitted, tables, dtype)
        figures[f"batch64_{np.dtype(dtype).name}_ms_incl_copies"] = round(
            (time.perf_counter() - start) * 100, 2
        )
    if bad:
        raise CheckFailed(f"not bit-exact: {', '.join(bad)}", figures)
    return figures


def kernel_pycuda() -> dict[str, Any]:
    """GpuPreprocessor itself (pinned staging, one stream, the cubin nvcc builds for this GPU)."""
    pre = {dt: kernels.GpuPreprocessor(SPEC.size, SPEC.mean, SPEC.std, max_batch=64, out_dtype=dt)
           for dt in (np.float32, np.float16)}  # fmt: skip
    try:
        figures = _compare_kernel(lambda images, tables, dt: pre[dt](images, tables))
    finally:
        for p in pre.values():
            p.close()
    cc = kernels.compute_capability(0)
    return {"arch": f"sm_{cc[0]}{cc[1]}", **figures}


def kernel_cupy() -> dict[str, Any]:
    """The same source through cupy's RawModule (NVRTC), launched with the same layout and shape."""
    import cupy as cp

    module = cp.RawModule(code=kernels.SOURCE.read_text(), options=("--std=c++17",))

    def run(images: list[np.ndarray], tables: list[Any], dtype: type) -> np.ndarray:
        layout = kernels.plan_batch([img.shape for img in images], tables, SPEC.size)
        src = np.zeros(max(layout.src_bytes, 1), np.uint8)
        kernels.pack_sources(images, layout, src)
        n, s = len(images), SPEC.size
        out = cp.full((n, 3, s, s), 0xFFFF if dtype == np.float16 else 0xFFFFFFFF,
                      np.uint16 if dtype == np.float16 else np.uint32)  # fmt: skip
        grid, block = kernels.launch_shape(s, n)
        kernel = module.get_function(kernels.KERNELS[np.dtype(dtype)])
        args = (cp.asarray(src), cp.asarray(layout.descs), cp.asarray(layout.tables), out, np.int32(s))
        kernel(grid, block, (*args, *(np.float32(v) for v in (*SPEC.mean, *SPEC.std))))
        return out.get().view(dtype)

    return _compare_kernel(run)


# -- torch: the deployed network and the full tower -------------------------------------------------


@cache
def _networks(model: str, layer: int) -> tuple[Any, Any]:
    """(merged truncated network, full open_clip tower), random init, on the GPU in FP32, eval mode."""
    import torch

    from i2p.export.network import deploy
    from i2p.train.backbone import load_backbone
    from i2p.train.model import I2PModel

    tower, _ = load_backbone(model, "none", seed=0)
    full, _ = load_backbone(model, "none", seed=0)
    detector = I2PModel(tower, layer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random head: zero-initialized logits would hide every FP16 error
        fc = detector.head.fc
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) / fc.weight.shape[1] ** 0.5)
        fc.bias.copy_(torch.randn(1, generator=generator) * 0.1)
    net = deploy(detector)
    return net.cuda().float(), full.cuda().float().eval().requires_grad_(False)


def _inputs(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Normalized model inputs from uniform random pixels (what the preprocessing produces)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, size, size, 3), np.float32)
    x = (x - np.asarray(SPEC.mean, np.float32)) / np.asarray(SPEC.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def torch_fp16_numerics(model: str, layer: int) -> dict[str, Any]:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # an FP32 reference, not TF32
    torch.backends.cudnn.allow_tf32 = False
    net, _ = _networks(model, layer)
    x = torch.from_numpy(_inputs(64, net.image_size)).cuda()
    with torch.no_grad():
        z32 = net(x)[0].double().cpu().numpy()
        z16 = copy.deepcopy(net).half()(x.half())[0].float().cpu().numpy()
    figures = {"model": model, "layer": layer, **_tolerance_failures(z16, z32)}
    if figures["over_tolerance"] or not np.isfinite(z16).all():
        raise CheckFailed("FP16 logits outside 0.05 + 2% of the FP32 ones", figures)
    return figures


def _cuda_ms(fn: Callable[[], Any], iters: int) -> float:
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    return 2 * 8192**3 / (_cuda_ms(lambda: a @ b, 10) * 1e-3) / 1e12


def throughput_torch(model: str, layer: int) -> dict[str, Any]:
    import torch

    net, full = _networks(model, layer)
    net16, full16 = copy.deepcopy(net).half(), copy.deepcopy(full).half()
    size = net.image_size
    truncated, baseline, ratio = {}, {}, {}
    with torch.no_grad():
        for b in BATCHES:
            x = torch.from_numpy(_inputs(b, size)).cuda().half()
            iters = 50 if b < 64 else 20
            t_net = _cuda_ms(lambda x=x: net16(x), iters)
            t_full = _cuda_ms(lambda x=x: full16(x), iters)
            truncated[b], baseline[b] = round(b / t_net * 1e3, 1), round(b / t_full * 1e3, 1)
            ratio[b] = round(t_full / t_net, 2)
    blocks = full.transformer.resblocks
    width = full.transformer.width
    tokens = (size // full.conv1.kernel_size[0]) ** 2 + 1
    hidden = blocks[0].mlp.c_fc.out_features
    gflop_block = (2 * tokens * (4 * width * width + 2 * width * hidden) + 4 * tokens * tokens * width) / 1e9
    tflops = _matmul_tflops()
    floor_ms = layer * gflop_block / tflops  # GFLOP / (TFLOP/s) = ms
    return {
        "model": model,
        "layer": layer,
        "num_layers": len(blocks),
        "truncated_fp16_img_per_s": truncated,
        "full_tower_fp16_img_per_s": baseline,
        "speedup_vs_full_tower": ratio,
        "gflop_per_block": round(gflop_block, 3),
        "fp16_matmul_tflops": round(tflops, 1),
        "flop_floor_img_per_s": round(1e3 / floor_ms, 1),
        "batch64_share_of_floor": round(truncated[64] * floor_ms / 1e3, 3),
    }


# -- runtimes on an exported artifact ---------------------------------------------------------------


@cache
def _artifact(model: str, layer: int) -> Path:
    """A random-init artifact exported here (FP32 + FP16 ONNX, no engine), and its CPU FP32 reference."""
    from benchmarks.support.checkpoints import make_checkpoint
    from i2p.export.pipeline import ExportOptions, run_export

    root = Path(tempfile.mkdtemp(prefix="i2p_gpu_check_"))
    ckpt = make_checkpoint(root, layer=layer, backbone=model)
    result = run_export(ExportOptions(ckpt=ckpt, fp16=True, engine="no", max_batch=64), echo=lambda _: None)
    return result.artifact


def _runtime(model: str, layer: int, make: Callable[[Path, Any], Any]) -> dict[str, Any]:
    from i2p.runtime.backends.onnxruntime import CPU_EP, OnnxRuntimeBackend
    from i2p.runtime.manifest import read_manifest

    artifact = _artifact(model, layer)
    manifest = read_manifest(artifact)
    x = _inputs(16, manifest.preprocess.size, seed=1)
    want = OnnxRuntimeBackend(artifact / "model.onnx", [CPU_EP]).infer(x).astype(np.float64)
    backend = make(artifact, manifest)
    try:
        figures = _tolerance_failures(np.asarray(backend.infer(x)), want)
        speed = {}
        for b in BATCHES:
            batch = _inputs(b, manifest.preprocess.size, seed=b)
            backend.infer(batch)
            start = time.perf_counter()
            runs = max(3, 64 // b)
            for _ in range(runs):
                backend.infer(batch)
            speed[b] = round(b * runs / (time.perf_counter() - start), 1)
        figures.update(backend=backend.name, img_per_s=speed)
        figures.update(
            {"graph_captured": backend.graph_captured} if hasattr(backend, "graph_captured") else {}
        )
    finally:
        backend.close()
    if figures["over_tolerance"]:
        raise CheckFailed("logits outside 0.05 + 2% of ONNX Runtime FP32 on the CPU", figures)
    return figures


def runtime_tensorrt(model: str, layer: int) -> dict[str, Any]:
    from i2p.runtime.backends.tensorrt import TensorRTBackend

    return _runtime(model, layer, lambda a, m: TensorRTBackend(a, m, max_batch=64, cuda_graph_batch=8))


def runtime_ort(model: str, layer: int, provider: str) -> dict[str, Any]:
    from i2p.runtime.backends.onnxruntime import CPU_EP, OnnxRuntimeBackend, auto_providers, model_input_shape

    def make(artifact: Path, manifest: Any) -> Any:
        if provider == "CUDAExecutionProvider":
            return OnnxRuntimeBackend(artifact / "model.fp16.onnx", [(provider, {"device_id": 0}), CPU_EP],
                                      precision="fp16")  # fmt: skip
        shape = model_input_shape(artifact / "model.onnx", 64)
        providers = auto_providers(0, "fp16", [provider, CPU_EP], input_shape=shape)
        return OnnxRuntimeBackend(artifact / "model.onnx", providers, precision="fp16")

    return _runtime(model, layer, make)


def detect_gpu_preprocessing(model: str, layer: int) -> dict[str, Any]:
    """The Detector over 64 generated JPEGs on TensorRT, with GPU preprocessing on and off."""
    from PIL import Image

    from i2p.runtime import Detector

    artifact = _artifact(model, layer)
    folder = Path(tempfile.mkdtemp(prefix="i2p_gpu_check_images_"))
    rng = np.random.default_rng(5)
    paths = []
    for i in range(64):
        w, h = int(rng.integers(200, 1600)), int(rng.integers(200, 1600))
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    figures, probs = {}, {}
    for gpu in (True, False):
        with Detector(artifact, backend="tensorrt", batch_size=32, gpu_preprocessing=gpu) as det:
            det.predict(paths[:8])
            start = time.perf_counter()
            probs[gpu] = np.asarray([r.probability for r in det.predict(paths)], np.float64)
            figures[f"img_per_s_gpu_preprocessing_{'on' if gpu else 'off'}"] = round(
                len(paths) / (time.perf_counter() - start), 1
            )
    figures["max_abs_dprob_on_vs_off"] = float(np.max(np.abs(probs[True] - probs[False])))
    if figures["max_abs_dprob_on_vs_off"] > 1e-6:
        raise CheckFailed("GPU and CPU preprocessing gave different probabilities", figures)
    return figures


def runners(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    m, layer = args.model, args.layer
    return {
        "kernel-pycuda": kernel_pycuda,
        "kernel-cupy": kernel_cupy,
        "torch-fp16-numerics": lambda: torch_fp16_numerics(m, layer),
        "throughput-torch": lambda: throughput_torch(m, layer),
        "runtime-tensorrt": lambda: runtime_tensorrt(m, layer),
        "runtime-ort-cuda": lambda: runtime_ort(m, layer, "CUDAExecutionProvider"),
        "runtime-ort-tensorrt": lambda: runtime_ort(m, layer, "TensorrtExecutionProvider"),
        "detect-gpu-preprocessing": lambda: detect_gpu_preprocessing(m, layer),
    }
