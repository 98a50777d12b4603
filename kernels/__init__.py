"""GPU preprocessing: the CUDA kernel in ``preprocess.cu``, compiled with nvcc on first use, driven by pycuda.

``GpuPreprocessor`` turns a batch of decoded uint8 HWC RGB images of any sizes into the engine's NCHW
input, written straight to a device pointer (the TensorRT input binding), with the same result as
``i2p.runtime.resample.preprocess_reference`` bit for bit: the host builds Pillow's fixed-point filter
tables (``crop_coefficients``) and the kernel does only integer arithmetic on them, then one IEEE
float32 normalization per channel (``preprocess.cu`` explains the arithmetic).

pycuda is optional and imported lazily: this module imports anywhere, and ``available()`` says whether
the GPU path can run. The CUDA context is always the device's *primary* context (never
``pycuda.autoinit``), so the runtime shares the GPU with TensorRT, ONNX Runtime or PyTorch in one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from i2p.base.files import cache_root

from ..runtime.preprocess import PreprocessSpec, resize_plan
from ..runtime.resample import AxisCoefficients, crop_coefficients, vertical_first

log = logging.getLogger("i2p")

SOURCE = Path(__file__).with_name("preprocess.cu")
KERNELS = {np.dtype(np.float32): "i2p_preprocess_f32", np.dtype(np.float16): "i2p_preprocess_f16"}
BLOCK = (32, 8, 1)  # matches __launch_bounds__(256) in preprocess.cu
DESC_FIELDS = 8  # int64 fields of ImageDesc in preprocess.cu


class KernelBuildError(RuntimeError):
    """nvcc is missing or failed; the message says which and how to fix it."""


# ----------------------------------------------------------------------------------------------------
# Compilation


def find_nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME / $CUDA_PATH, or /usr/local/cuda (where JetPack puts it, off PATH)."""
    candidates = [shutil.which("nvcc")]
    candidates += [
        os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ
    ]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def nvcc_compile(arch: str | Sequence[str], out: str | os.PathLike, extra_flags: Sequence[str] = ()) -> str:
    """Compile ``preprocess.cu`` to a cubin (one ``sm_XY``) or a fatbin (several); return ptxas's report.

    ``-Xptxas -v`` makes ptxas print registers, stack and spills per kernel and architecture
    (``parse_ptxas_report`` reads it). No fast-math: the normalization must round like numpy.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError(
            "nvcc not found (looked on PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin); "
            "install the CUDA toolkit (on Jetson it ships with JetPack) or set CUDA_HOME"
        )
    archs = [arch] if isinstance(arch, str) else list(arch)
    if not archs or not all(re.fullmatch(r"sm_\d+[a-z]?", a) for a in archs):
        raise ValueError(f"expected architectures like 'sm_87', got {arch!r}")
    if len(archs) == 1:
        target = ["-cubin", f"-arch={archs[0]}"]
    else:
        target = ["-fatbin"] + [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    cmd = [nvcc, *target, "-Xptxas", "-v", *extra_flags, "-o", os.fspath(out), os.fspath(SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{report[-4000:]}")
    return report


@dataclass(frozen=True)
class KernelResources:
    """One kernel on one architecture, as ptxas reports it."""

    kernel: str
    arch: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_report(report: str) -> list[KernelResources]:
    """Every (kernel, architecture) block of a ``-Xptxas -v`` report; raises if a block is incomplete."""
    found = []
    blocks = _ENTRY.split(report)  # [preamble, name, arch, body, name, arch, body, ...]
    for name, arch, body in zip(blocks[1::3], blocks[2::3], blocks[3::3], strict=True):
        frame, regs = _FRAME.search(body), _REGS.search(body)
        if frame is None or regs is None:
            raise ValueError(f"ptxas report for {name} on {arch} has no stack/spill or register line")
        stack, stores, loads = map(int, frame.groups())
        found.append(KernelResources(name, arch, int(regs.group(1)), stack, stores, loads))
    return found


def source_sha256() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def cache_dir() -> Path:
    """Where compiled kernels are cached: ``cache_root() / "kernels"``."""
    return cache_root() / "kernels"


def compile_kernels(arch: str) -> Path:
    """The cubin for ``arch`` (e.g. ``"sm_87"``), compiled once and cached by architecture and source hash."""
    directory = cache_dir()
    path = directory / f"preprocess_{arch}_{source_sha256()[:16]}.cubin"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        report = nvcc_compile(arch, tmp)
        os.replace(tmp, path)  # concurrent builders each write a whole file; the last one wins
    finally:
        Path(tmp).unlink(missing_ok=True)
    for r in parse_ptxas_report(report):
        log.debug(
            "compiled %s for %s: %d registers, %d B spilled", r.kernel, r.arch, r.registers, r.spill_stores
        )
    log.info("compiled the GPU preprocessing kernel for %s into %s", arch, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Host-side batch layout (pure numpy: what the kernel reads, testable without a GPU)


@dataclass(frozen=True)
class BatchLayout:
    """Where each image's pixels go in the packed source buffer, and the descriptors and tables to upload."""

    offsets: np.ndarray  # int64 [B]: byte offset of each image in the packed source buffer
    src_bytes: int  # total size of the packed source buffer
    descs: np.ndarray  # int64 [B, 8], ImageDesc in preprocess.cu
    tables: np.ndarray  # int32 [T]: per image, the column table then the row table


def _table(coeffs: AxisCoefficients) -> np.ndarray:
    return np.concatenate([coeffs.start, coeffs.count, coeffs.weights.ravel()])


def plan_batch(shapes: Sequence[tuple[int, ...]], spec: PreprocessSpec) -> BatchLayout:
    """Lay out a batch of HxWx3 uint8 images for one kernel launch."""
    offsets, descs, tables = [], [], []
    src_pos = table_pos = 0
    for h, w, *_ in shapes:
        plan = resize_plan(w, h, spec.size)
        cols = crop_coefficients(w, plan.out_w, plan.left, spec.size)
        rows = crop_coefficients(h, plan.out_h, plan.top, spec.size)
        x_table, y_table = _table(cols), _table(rows)
        flag = int(vertical_first(w, h, plan.out_w, plan.out_h))
        y_pos = table_pos + x_table.size
        descs.append((src_pos, w, h, table_pos, cols.ksize, y_pos, rows.ksize, flag))
        tables += [x_table, y_table]
        offsets.append(src_pos)
        src_pos += h * w * 3
        table_pos = y_pos + y_table.size
    return BatchLayout(
        offsets=np.asarray(offsets, np.int64),
        src_bytes=src_pos,
        descs=np.asarray(descs, np.int64).reshape(-1, DESC_FIELDS),
        tables=np.concatenate(tables) if tables else np.zeros(0, np.int32),
    )


def check_images(images: Sequence[Any]) -> list[np.ndarray]:
    """The batch as uint8 HxWx3 arrays, or a ValueError naming the first bad item."""
    for i, img in enumerate(images):
        if not (
            isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        ):
            what = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}".strip()
            raise ValueError(f"image {i}: expected a uint8 HxWx3 RGB array, got {what}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"image {i}: empty image {img.shape}")
    return list(images)


# ----------------------------------------------------------------------------------------------------
# pycuda: primary context, availability


def driver() -> Any:
    """``pycuda.driver``, initialized; ImportError with install advice when pycuda is missing."""
    try:
        import pycuda.driver as cuda  # lazy: pycuda is an optional dependency
    except ImportError as e:
        raise ImportError(
            f"GPU preprocessing needs pycuda ({e}): pip install pycuda with the CUDA toolkit's nvcc on PATH "
            "(on Jetson: export PATH=/usr/local/cuda/bin:$PATH first)"
        ) from e

    cuda.init()
    return cuda


@lru_cache(maxsize=1)
def available() -> bool:
    """pycuda imports and at least one CUDA GPU is visible."""
    try:
        return driver().Device.count() > 0
    except Exception as e:  # ImportError, or pycuda's driver errors when no GPU/driver is present
        log.debug("GPU preprocessing unavailable: %s", e)
        return False


_contexts: dict[int, Any] = {}
_contexts_lock = threading.Lock()


def primary_context(device: int = 0) -> Any:
    """The device's primary context, retained once per process (the CUDA runtime and TensorRT use it too)."""
    with _contexts_lock:
        if device not in _contexts:
            _contexts[device] = driver().Device(device).retain_primary_context()
        return _contexts[device]


@contextlib.contextmanager
def activated(context: Any) -> Iterator[None]:
    """Make ``context`` current on this thread for the block (push/pop, so callers' contexts survive)."""
    context.push()
    try:
        yield
    finally:
        context.pop()


def compute_capability(device: int = 0) -> tuple[int, int]:
    major, minor = driver().Device(device).compute_capability()
    return int(major), int(minor)


# ----------------------------------------------------------------------------------------------------
# The preprocessor


class _Buffers:
    """A pinned host buffer and a device buffer of one byte size, grown geometrically."""

    def __init__(self) -> None:
        self.host: np.ndarray | None = None
        self.device: Any = None
        self.capacity = 0

    def ensure(self, cuda: Any, nbytes: int, stream: Any) -> None:
        if nbytes <= self.capacity:
            return
        stream.synchronize()  # nothing in flight may still read the old buffers
        self.free()
        self.capacity = max(nbytes, 2 * self.capacity, 1 << 16)
        self.host = cuda.pagelocked_empty(self.capacity, np.uint8)
        self.device = cuda.mem_alloc(self.capacity)

    def upload(self, cuda: Any, data: np.ndarray, stream: Any) -> None:
        view = data.view(np.uint8).ravel()
        self.host[: view.size] = view
        cuda.memcpy_htod_async(self.device, self.host[: view.size], stream)

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
        self.host, self.device, self.capacity = None, None, 0


class GpuPreprocessor:
    """Decoded uint8 HWC images of any sizes -> normalized NCHW batch in device memory, on one stream.

    ``launch(images, out_ptr)`` enqueues the copies and the kernel and returns at once; work queued
    on the same ``stream`` afterwards (e.g. TensorRT's ``execute_async_v3``) sees the result. The
    staging buffers are pinned and reused; a launch waits for the previous batch's uploads before
    overwriting them. Thread-safe.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        device: int = 0,
        max_batch: int = 32,
        out_dtype: Any = np.float16,
        stream: Any = None,
    ) -> None:
        self.spec = spec
        self.max_batch = max_batch
        self.out_dtype = np.dtype(out_dtype)
        if self.out_dtype not in KERNELS:
            raise ValueError(f"out_dtype must be float32 or float16, not {self.out_dtype}")
        self._cuda = driver()
        self.context = primary_context(device)
        self._lock = threading.Lock()
        self._mean = [np.float32(m) for m in spec.mean]
        self._std = [np.float32(s) for s in spec.std]
        cc = compute_capability(device)
        cubin = compile_kernels(f"sm_{cc[0]}{cc[1]}")
        with activated(self.context):
            self.stream = stream if stream is not None else self._cuda.Stream()
            self._module = self._cuda.module_from_file(str(cubin))
            self._kernel = self._module.get_function(KERNELS[self.out_dtype]).prepare("PPPPiffffff")
            self._src, self._descs, self._tables = _Buffers(), _Buffers(), _Buffers()
            self._uploaded = self._cuda.Event()
            self._uploaded.record(self.stream)
            self._out: Any = None  # device output of __call__, allocated on first use
            self._out_host: np.ndarray | None = None

    def launch(self, images: Sequence[np.ndarray], out_ptr: int) -> None:
        """Enqueue preprocessing of ``images`` into the ``[len(images), 3, S, S]`` buffer at ``out_ptr``."""
        images = check_images(images)
        if not images:
            return
        if len(images) > self.max_batch:
            raise ValueError(f"batch of {len(images)} images exceeds max_batch={self.max_batch}")
        layout = plan_batch([img.shape for img in images], self.spec)
        cuda, stream = self._cuda, self.stream
        with self._lock, activated(self.context):
            self._uploaded.synchronize()  # the pinned staging buffers are free again
            self._src.ensure(cuda, layout.src_bytes, stream)
            self._descs.ensure(cuda, layout.descs.nbytes, stream)
            self._tables.ensure(cuda, max(layout.tables.nbytes, 4), stream)
            for img, offset in zip(images, layout.offsets, strict=True):
                np.copyto(self._src.host[offset : offset + img.size].reshape(img.shape), img)
            cuda.memcpy_htod_async(self._src.device, self._src.host[: layout.src_bytes], stream)
            self._descs.upload(cuda, layout.descs, stream)
            self._tables.upload(cuda, layout.tables, stream)
            self._uploaded.record(stream)
            size = self.spec.size
            grid = (-(-size // BLOCK[0]), -(-size // BLOCK[1]), len(images))
            self._kernel.prepared_async_call(
                grid,
                BLOCK,
                stream,
                int(self._src.device),
                int(self._descs.device),
                int(self._tables.device),
                int(out_ptr),
                np.int32(size),
                *self._mean,
                *self._std,
            )

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Preprocess to a host array ``[N, 3, S, S]`` of ``out_dtype`` (for tests and benchmarks)."""
        images = check_images(images)
        size = self.spec.size
        shape = (len(images), 3, size, size)
        if not images:
            return np.zeros(shape, self.out_dtype)
        nbytes = int(np.prod(shape)) * self.out_dtype.itemsize
        with self._lock, activated(self.context):
            if self._out is None:
                full = self.max_batch * 3 * size * size * self.out_dtype.itemsize
                self._out = self._cuda.mem_alloc(full)
                self._out_host = self._cuda.pagelocked_empty(full, np.uint8)
        self.launch(images, int(self._out))
        with self._lock, activated(self.context):
            self._cuda.memcpy_dtoh_async(self._out_host[:nbytes], self._out, self.stream)
            self.stream.synchronize()
            return self._out_host[:nbytes].view(self.out_dtype).reshape(shape).copy()

    def close(self) -> None:
        """Free device memory now (otherwise it lives as long as the primary context)."""
        with self._lock, activated(self.context):
            self.stream.synchronize()
            for buffers in (self._src, self._descs, self._tables):
                buffers.free()
            if self._out is not None:
                self._out.free()
                self._out = None
