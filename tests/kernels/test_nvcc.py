"""The CUDA preprocessing kernel: compiled with nvcc for every target GPU this nvcc knows, its host-side
layout, and (on a GPU) its output against the numpy reference. ``test_host_kernel.py`` runs the same
source on the CPU.

Tolerance on a GPU: float32 output equals ``preprocess_reference`` exactly (0 difference), float16 output
equals the reference cast to float16 exactly; every output element is written.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from i2p import kernels
from i2p.runtime.preprocess import PreprocessSpec
from i2p.runtime.resample import (
    AxisCoefficients,
    _resample,
    kernel_batch,
    pillow_version,
    preprocess_reference,
    resize_crop_reference,
)

# Turing .. Hopper, sm_87 = Jetson Orin; each compiled where this nvcc supports it (11.4 stops at sm_87).
WANTED = ("sm_75", "sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
SPEC = PreprocessSpec(size=224)
MODES = [  # the families' preprocessing modes: SigLIP 2, PE-Core, EVA-02
    SPEC,
    PreprocessSpec(size=224, resize="squash"),
    PreprocessSpec(size=224, resize="squash", interpolation="bilinear"),
    PreprocessSpec(size=224, crop_pct=0.9),
]
MODE_IDS = ["shortest-bicubic", "squash-bicubic", "squash-bilinear", "crop_pct-0.9"]
MIXED = [(1, 1), (3, 500), (500, 3), (224, 224), (224, 300), (640, 480), (57, 913), (1000, 1400), (300, 1400)]

needs_nvcc = pytest.mark.skipif(kernels.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")


def _images(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for w, h in sizes]


@needs_nvcc
def test_nvcc_lists_the_architectures_it_supports() -> None:
    archs = kernels.supported_archs()
    assert archs and all(a.startswith("sm_") for a in archs)


@pytest.mark.slow
@needs_nvcc
def test_every_target_compiles_without_register_spills(tmp_path: Path) -> None:
    supported = set(kernels.supported_archs())
    archs = [a for a in WANTED if a in supported]
    assert "sm_87" in archs, f"this nvcc cannot build for Jetson Orin (supports {sorted(supported)})"
    start = time.perf_counter()
    report = kernels.nvcc_compile(archs, tmp_path / "preprocess.fatbin")
    seconds = time.perf_counter() - start
    resources = kernels.parse_ptxas_report(report)
    assert {(r.kernel, r.arch) for r in resources} == {
        (k, a) for k in kernels.KERNELS.values() for a in archs
    }
    for r in resources:
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.kernel} spills on {r.arch}: {r}"
        assert r.stack_bytes == 0, f"{r.kernel} uses a stack frame on {r.arch}: {r}"
    print(f"\nnvcc, {len(archs)} targets: {seconds:.1f} s")
    for r in resources:
        print(f"  {r.arch} {r.kernel}: {r.registers} registers, 0 B spilled")


@needs_nvcc
def test_a_compile_error_names_the_command_and_the_error(tmp_path: Path) -> None:
    with pytest.raises(kernels.KernelBuildError, match=r"nvcc.*-arch=sm_10.*failed") as info:
        kernels.nvcc_compile("sm_10", tmp_path / "x.cubin")  # an architecture CUDA 13 does not know
    assert "sm_10" in str(info.value).split("failed", 1)[1]
    with pytest.raises(ValueError, match="architectures like 'sm_87'"):
        kernels.nvcc_compile("87", tmp_path / "x.cubin")


@needs_nvcc
def test_compiled_cubins_are_cached_by_arch_and_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("I2P_CACHE_DIR", str(tmp_path))
    first = kernels.compile_kernels("sm_87")
    assert first.parent == tmp_path / "kernels" and first.stat().st_size > 0
    assert "sm_87" in first.name and kernels.source_sha256()[:16] in first.name
    stamp = first.stat().st_mtime_ns
    assert kernels.compile_kernels("sm_87") == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert not list(first.parent.glob(".*.tmp"))


def test_ptxas_report_parsing() -> None:
    report = (
        "ptxas info    : Compiling entry function 'k1' for 'sm_87'\n"
        "ptxas info    : Function properties for k1\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers, 412 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function 'k2' for 'sm_90'\n"
        "ptxas info    : Function properties for k2\n"
    )
    with pytest.raises(ValueError, match="k2 on sm_90"):
        kernels.parse_ptxas_report(report)
    (k1,) = kernels.parse_ptxas_report(report.rsplit("ptxas info    : Compiling", 1)[0])
    assert k1 == kernels.KernelResources("k1", "sm_87", 255, 8, 4, 4)


def _emulate_kernel_reads(layout: kernels.BatchLayout, src: np.ndarray, size: int) -> np.ndarray:
    """Read the packed buffers the way preprocess.cu does (descriptor -> tables -> pixels), in numpy."""
    out = []
    for d in layout.descs:
        offset, w, h, x_table, x_ksize, y_table, y_ksize, vertical = (int(v) for v in d)
        img = src[offset : offset + h * w * 3].reshape(h, w, 3)

        def axis(table: int, ksize: int) -> AxisCoefficients:
            t = layout.tables[table:]
            return AxisCoefficients(
                t[:size], t[size : 2 * size], t[2 * size : 2 * size + size * ksize].reshape(size, ksize)
            )

        cols, rows = axis(x_table, x_ksize), axis(y_table, y_ksize)
        first = _resample(img, rows, axis=0) if vertical else _resample(img, cols, axis=1)
        out.append(_resample(first, cols, axis=1) if vertical else _resample(first, rows, axis=0))
    return np.stack(out)


@pytest.mark.parametrize("spec", MODES, ids=MODE_IDS)
def test_batch_layout_is_what_the_kernel_expects(spec: PreprocessSpec) -> None:
    """Packed source offsets, descriptors and tables reproduce the reference for a mixed-size batch."""
    images, tables = kernel_batch(_images(MIXED), spec)
    layout = kernels.plan_batch([img.shape for img in images], tables, spec.size)
    assert layout.descs.shape == (len(images), kernels.DESC_FIELDS) and layout.descs.dtype == np.int64
    assert layout.tables.dtype == np.int32
    src = np.zeros(layout.src_bytes, np.uint8)
    for img, offset in zip(images, layout.offsets, strict=True):
        src[offset : offset + img.size] = img.ravel()
    if pillow_version() >= (13, 0):  # Pillow 13 resamples 300x1400 rows first, the rest columns first
        assert layout.descs[:, 7].any() and not layout.descs[:, 7].all()
    got = _emulate_kernel_reads(layout, src, spec.size)
    for i, img in enumerate(images):
        np.testing.assert_array_equal(
            got[i], resize_crop_reference(img, spec), err_msg=f"image {i} {img.shape}"
        )


def test_bad_images_are_named() -> None:
    with pytest.raises(ValueError, match="image 1: expected a uint8 HxWx3"):
        kernels.check_images([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="image 0: empty image"):
        kernels.check_images([np.zeros((0, 4, 3), np.uint8)])


def test_module_imports_and_reports_unavailable_without_pycuda() -> None:
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        assert kernels.available() is False
        with pytest.raises(ImportError, match="GPU preprocessing needs pycuda"):
            kernels.GpuPreprocessor(SPEC.size, SPEC.mean, SPEC.std)
    else:
        pytest.skip("pycuda is installed here")


# --------------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not kernels.available(), reason="needs pycuda and an NVIDIA GPU")
@pytest.mark.parametrize("spec", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kernel_matches_the_reference_on_a_gpu(dtype: type, spec: PreprocessSpec) -> None:
    cuda = kernels.driver()
    images = _images(MIXED + [(4000, 3000), (120, 1900)], seed=1)
    fitted, tables = kernel_batch(images, spec)
    pre = kernels.GpuPreprocessor(spec.size, spec.mean, spec.std, max_batch=len(images), out_dtype=dtype)
    n, s = len(images), spec.size
    nbytes = n * 3 * s * s * np.dtype(dtype).itemsize
    with kernels.activated(pre.context):
        out = cuda.mem_alloc(nbytes)
        cuda.memset_d8(out, 0xFF, nbytes)  # NaN in both float16 and float32: unwritten elements show
    pre.launch(fitted, tables, int(out))
    host = np.empty((n, 3, s, s), dtype)
    with kernels.activated(pre.context):
        pre.stream.synchronize()
        cuda.memcpy_dtoh(host, out)
        start, end = cuda.Event(), cuda.Event()
        start.record(pre.stream)
    for _ in range(10):
        pre.launch(fitted, tables, int(out))
    with kernels.activated(pre.context):
        end.record(pre.stream)
        end.synchronize()
        ms = start.time_till(end) / 10
        out.free()
    via_call = pre(fitted, tables)
    pre.close()
    pre.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pre(fitted, tables)
    assert not np.isnan(host).any(), "some output elements were never written"
    expected = np.stack([preprocess_reference(img, spec) for img in images]).astype(dtype)
    worst = float(np.max(np.abs(host.astype(np.float64) - expected)))
    print(
        f"\n{cuda.Device(0).name()} {np.dtype(dtype).name}: max |gpu - reference| = {worst}, {ms:.2f} ms/batch of {n}"
    )
    np.testing.assert_array_equal(host, expected)
    np.testing.assert_array_equal(via_call, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not kernels.available(), reason="needs pycuda and an NVIDIA GPU")
def test_concurrent_calls_each_get_their_own_batch() -> None:
    """__call__ holds the lock from launch to copy-back: threads sharing one preprocessor never mix outputs."""
    from concurrent.futures import ThreadPoolExecutor

    pre = kernels.GpuPreprocessor(SPEC.size, SPEC.mean, SPEC.std, max_batch=4, out_dtype=np.float32)
    batches = [kernel_batch(_images([(100 + 37 * i, 80 + 11 * i)] * 3, seed=i), SPEC) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: pre(*b), batches * 4))
    pre.close()
    for (fitted, _), got in zip(batches * 4, results, strict=True):
        want = np.stack([preprocess_reference(img, SPEC) for img in fitted])
        np.testing.assert_array_equal(got, want)


def test_max_batch_is_bounded_by_the_grid() -> None:
    with pytest.raises(ValueError, match="gridDim.z"):
        kernels.GpuPreprocessor(SPEC.size, SPEC.mean, SPEC.std, max_batch=kernels.MAX_BATCH + 1)
