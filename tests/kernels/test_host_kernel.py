"""The CUDA kernel's own source, compiled for the CPU with g++ and run on the batches GpuPreprocessor uploads.

``kernels/preprocess.cu`` is integer arithmetic on host-built tables plus one float32 normalization, so
its result is fully determined. ``host_emulation.h`` maps ``__global__``/``__device__`` away and walks
the grid; the PTX FP16 store's ``#ifdef __CUDA_ARCH__`` twin rounds to nearest even like
``cvt.rn.f16.f32``. The batch is packed by the same ``i2p.kernels.plan_batch``/``pack_sources`` and
launched with the same ``launch_shape`` as on the GPU.

Every preprocessing mode (resize shortest/squash, crop fraction, bicubic/bilinear) goes through the same
kernel with its own tables; each is tested here.

Tolerance: none. float32 output equals ``preprocess_reference`` bit for bit; float16 output equals the
reference cast by numpy (round to nearest even) bit for bit; every output element is written.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from i2p import kernels
from i2p.runtime.preprocess import PreprocessSpec, normalize
from i2p.runtime.resample import (
    kernel_batch,
    pillow_version,
    preprocess_reference,
    resize_crop_reference,
)

HERE = Path(__file__).parent
CXX = shutil.which("g++") or shutil.which("c++")
SPEC = PreprocessSpec(size=224)

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++ or c++) on PATH")


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """``preprocess.cu`` built for the host as a shared library (a few seconds of g++)."""
    lib = tmp_path_factory.mktemp("host_kernel") / "libi2p_preprocess_host.so"
    cmd = [
        CXX, "-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Werror",
        "-I", str(kernels.SOURCE.parent), "-o", str(lib), str(HERE / "host_launch.cpp"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    dll = ctypes.CDLL(str(lib))
    p, f = ctypes.c_void_p, ctypes.c_float
    for name in kernels.KERNELS.values():
        getattr(dll, f"host_{name}").argtypes = [p, p, p, p, p, p, ctypes.c_int, f, f, f, f, f, f]
    return dll


def run_host_kernel(
    dll: ctypes.CDLL,
    images: Sequence[np.ndarray],
    tables: Sequence[kernels.ImageTables],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: type,
) -> np.ndarray:
    """Pack and launch exactly as ``GpuPreprocessor`` does, on the host; return [N, 3, S, S] of ``dtype``."""
    layout = kernels.plan_batch([img.shape for img in images], tables, size)
    src = np.zeros(max(layout.src_bytes, 1), np.uint8)
    kernels.pack_sources(images, layout, src)
    out = np.full((len(images), 3, size, size), np.nan, dtype)  # unwritten elements stay NaN
    grid, block = (np.asarray(a, np.int32) for a in kernels.launch_shape(size, len(images)))
    descs, tables_flat = np.ascontiguousarray(layout.descs), np.ascontiguousarray(layout.tables)
    fn = getattr(dll, f"host_{kernels.KERNELS[np.dtype(dtype)]}")
    fn(  # every array stays referenced for the call: ctypes gets bare addresses
        grid.ctypes.data,
        block.ctypes.data,
        src.ctypes.data,
        descs.ctypes.data,
        tables_flat.ctypes.data,
        out.ctypes.data,
        size,
        *(float(np.float32(v)) for v in (*mean, *std)),
    )
    return out


def _images(sizes: Sequence[tuple[int, int]], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for w, h in sizes]


def _check(dll: ctypes.CDLL, images: list[np.ndarray], spec: PreprocessSpec = SPEC) -> np.ndarray:
    """Both output types against the reference, bit for bit; returns the descriptors launched."""
    fitted, tables = kernel_batch(images, spec)
    expected = np.stack([preprocess_reference(img, spec) for img in images])
    for dtype in (np.float32, np.float16):
        got = run_host_kernel(dll, fitted, tables, spec.size, spec.mean, spec.std, dtype)
        assert not np.isnan(got).any(), "some output elements were never written"
        want = expected.astype(dtype)
        for i, img in enumerate(images):
            if not np.array_equal(got[i].view(np.uint8), want[i].view(np.uint8)):
                bad = int(np.sum(got[i] != want[i]))
                pytest.fail(f"{np.dtype(dtype).name}, image {i} {img.shape}: {bad} elements differ")
    return kernels.plan_batch([img.shape for img in fitted], tables, spec.size).descs


# Mixed sizes: 1x1, thin, odd, exact, tall (vertical pass first on Pillow >= 13), upscales, elongated.
MIXED = [
    (1, 1), (20, 30), (3, 47), (47, 3), (224, 224), (225, 223), (7, 9), (640, 480), (57, 913), (913, 57),
    (300, 1400), (120, 1900), (1000, 1400), (333, 777), (3, 500), (1500, 2),
]  # fmt: skip


def test_mixed_sizes_in_one_batch_are_bit_exact(host_kernels: ctypes.CDLL) -> None:
    descs = _check(host_kernels, _images(MIXED, seed=1))
    if pillow_version() >= (13, 0):  # both branches of the kernel ran in this batch
        assert descs[:, 7].any() and not descs[:, 7].all()


# Every preprocessing mode the backbone families use (README, "Backbone families"), and their mixes.
MODES = {
    "siglip2: squash, bicubic": PreprocessSpec(size=224, resize="squash", mean=(0.5,) * 3, std=(0.5,) * 3),
    "pe-core: squash, bilinear": PreprocessSpec(size=224, resize="squash", interpolation="bilinear"),
    "eva02: shortest, crop_pct 0.9": PreprocessSpec(size=224, crop_pct=0.9),
    "shortest, bilinear, crop_pct 0.875": PreprocessSpec(size=97, interpolation="bilinear", crop_pct=0.875),
    "squash, bilinear, crop_pct 0.95": PreprocessSpec(size=33, resize="squash", interpolation="bilinear", crop_pct=0.95),
}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_every_preprocessing_mode_is_bit_exact_on_mixed_sizes(host_kernels: ctypes.CDLL, mode: str) -> None:
    """The kernel's tables carry the mode: one batch of mixed sizes and aspect ratios per mode, both
    output types equal to the numpy reference (itself Pillow's bytes, ``test_resample.py``)."""
    descs = _check(host_kernels, _images(MIXED, seed=7), MODES[mode])
    if pillow_version() >= (13, 0):  # both branches of the kernel ran
        assert descs[:, 7].any() and not descs[:, 7].all()


@pytest.mark.slow
def test_extreme_downscale_and_upscale(host_kernels: ctypes.CDLL) -> None:
    _check(host_kernels, _images([(8000, 6000), (20, 30)], seed=2))


@pytest.mark.slow
def test_a_batch_of_64(host_kernels: ctypes.CDLL) -> None:
    rng = np.random.default_rng(3)
    sizes = [(int(rng.integers(1, 700)), int(rng.integers(1, 700))) for _ in range(64)]
    _check(host_kernels, _images(sizes, seed=4))


@pytest.mark.parametrize("size", [1, 33, 97])
def test_other_output_sizes(host_kernels: ctypes.CDLL, size: int) -> None:
    """Sizes that are not multiples of the 32x8 block: the bounds check keeps threads off the edge."""
    _check(
        host_kernels,
        _images([(1, 1), (size, size), (size + 5, 3 * size + 1), (640, 480)], seed=size),
        PreprocessSpec(size=size),
    )


def test_half_rounding_covers_subnormals_and_overflow(host_kernels: ctypes.CDLL) -> None:
    """Normalization constants no manifest would allow, to reach FP16 subnormals, zero and infinity."""
    fitted, tables = kernel_batch(_images([(64, 64), (31, 200)], seed=5), PreprocessSpec(size=32))
    resized = np.stack([resize_crop_reference(img, PreprocessSpec(size=32)) for img in fitted])
    cases = {
        "subnormal": ((0.5, 0.0, 1.0), (3.0e4, 1.0e5, 7.0e3)),
        "overflow": ((0.0, 0.5, 0.25), (1.0e-5, 2.0e-5, 3.1e-6)),
    }
    for case, (mean, std) in cases.items():
        with np.errstate(over="ignore"):  # the overflow to infinity is the point
            want = np.stack([normalize(r, SimpleNamespace(mean=mean, std=std)) for r in resized])
            want = want.astype(np.float16)
        got = run_host_kernel(host_kernels, fitted, tables, 32, mean, std, np.float16)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=case)
        tiny = (want != 0) & (np.abs(want) < np.finfo(np.float16).tiny)
        assert tiny.any() if case == "subnormal" else np.isinf(want).any(), case


def test_malformed_tables_are_refused() -> None:
    fitted, tables = kernel_batch(_images([(10, 10)], seed=6), PreprocessSpec(size=8))
    x, y, vertical = tables[0]
    with pytest.raises(ValueError, match="image 0 column table"):
        kernels.plan_batch([fitted[0].shape], [(x[:-1], y, vertical)], 8)
    with pytest.raises(ValueError, match="1 images but 2 table sets"):
        kernels.plan_batch([fitted[0].shape], [tables[0], tables[0]], 8)
    with pytest.raises(ValueError, match="gridDim.z"):
        kernels.launch_shape(224, kernels.MAX_BATCH + 1)


@pytest.mark.slow  # the GPU check's corpus: an 8000x6000 image and a timed batch of 64, on the host
def test_the_gpu_check_compares_every_family_mode_and_passes_on_the_host_kernel(
    host_kernels: ctypes.CDLL,
) -> None:
    """``benchmarks.gpu_runners``' bit-exactness check, run through the host build of the same source: the
    first lent GPU then only swaps the launcher, and its report covers every preprocessing mode."""
    from benchmarks import gpu_runners

    spec = gpu_runners.SPEC
    figures = gpu_runners._compare_kernel(
        lambda images, tables, dtype: run_host_kernel(
            host_kernels, images, tables, spec.size, spec.mean, spec.std, dtype
        )
    )
    counts = {k: v for k, v in figures.items() if k.endswith("_mismatched_bytes")}
    for mode in gpu_runners.FAMILY_SPECS:
        assert f"mixed_{mode}_float16_mismatched_bytes" in counts
    assert counts and not any(counts.values()), counts
