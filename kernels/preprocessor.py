"""``GpuPreprocessor``: decoded uint8 images of any sizes -> the network's normalized NCHW input, on the GPU.

The host packs pixels, descriptors and the caller's filter tables (``layout``) into pinned staging
buffers, uploads them and launches ``preprocess.cu`` on one stream, writing straight to a device
pointer (e.g. the TensorRT input binding).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .compiler import compile_kernels
from .cuda import activated, compute_capability, driver, free_pinned, primary_context
from .layout import KERNELS, ImageTables, check_images, launch_shape, pack_sources, plan_batch


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
        if self.host is not None:
            free_pinned(self.host)
        self.host, self.device, self.capacity = None, None, 0


class GpuPreprocessor:
    """Resize, crop and normalize a batch on one stream; every public method is thread-safe.

    ``launch(images, tables, out_ptr)`` enqueues the copies and the kernel and returns at once; work
    queued on the same ``stream`` afterwards (e.g. TensorRT's ``execute_async_v3``) sees the result.
    The staging buffers are pinned and reused; a launch waits for the previous batch's uploads
    before overwriting them. ``close()`` frees everything it allocated, with the context current.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: int = 0,
        max_batch: int = 32,
        out_dtype: Any = np.float16,
        stream: Any = None,
    ) -> None:
        self.size = int(size)
        self.max_batch = int(max_batch)
        launch_shape(self.size, self.max_batch)  # validates max_batch against gridDim.z
        self.out_dtype = np.dtype(out_dtype)
        if self.out_dtype not in KERNELS:
            raise ValueError(f"out_dtype must be float32 or float16, not {self.out_dtype}")
        self._mean = [np.float32(m) for m in mean]
        self._std = [np.float32(s) for s in std]
        self._cuda = driver()
        self.context = primary_context(device)
        self._lock = threading.Lock()
        cc = compute_capability(device)
        cubin = compile_kernels(f"sm_{cc[0]}{cc[1]}")
        with activated(self.context):
            self._own_stream = stream is None
            self.stream = self._cuda.Stream() if stream is None else stream
            self._module = self._cuda.module_from_file(str(cubin))
            self._kernel = self._module.get_function(KERNELS[self.out_dtype]).prepare("PPPPiffffff")
            self._src, self._descs, self._tables = _Buffers(), _Buffers(), _Buffers()
            self._uploaded = self._cuda.Event()
            self._uploaded.record(self.stream)
            self._out: Any = None  # device output of __call__, allocated on first use
            self._out_host: np.ndarray | None = None
        self._closed = False

    def launch(self, images: Sequence[np.ndarray], tables: Sequence[ImageTables], out_ptr: int) -> None:
        """Enqueue preprocessing of ``images`` into the ``[len(images), 3, S, S]`` buffer at ``out_ptr``."""
        images = check_images(images)
        if images:
            with self._lock, activated(self.context):
                self._enqueue(images, tables, out_ptr)

    def _enqueue(self, images: list[np.ndarray], tables: Sequence[ImageTables], out_ptr: int) -> None:
        """The launch itself; the caller holds the lock with the context current."""
        if self._closed:
            raise RuntimeError("GpuPreprocessor is closed")
        if len(images) > self.max_batch:
            raise ValueError(f"batch of {len(images)} images exceeds max_batch={self.max_batch}")
        layout = plan_batch([img.shape for img in images], tables, self.size)
        cuda, stream = self._cuda, self.stream
        self._uploaded.synchronize()  # the pinned staging buffers are free again
        self._src.ensure(cuda, layout.src_bytes, stream)
        self._descs.ensure(cuda, layout.descs.nbytes, stream)
        self._tables.ensure(cuda, max(layout.tables.nbytes, 4), stream)
        pack_sources(images, layout, self._src.host)
        cuda.memcpy_htod_async(self._src.device, self._src.host[: layout.src_bytes], stream)
        self._descs.upload(cuda, layout.descs, stream)
        self._tables.upload(cuda, layout.tables, stream)
        self._uploaded.record(stream)
        grid, block = launch_shape(self.size, len(images))
        self._kernel.prepared_async_call(
            grid,
            block,
            stream,
            int(self._src.device),
            int(self._descs.device),
            int(self._tables.device),
            int(out_ptr),
            np.int32(self.size),
            *self._mean,
            *self._std,
        )

    def __call__(self, images: Sequence[np.ndarray], tables: Sequence[ImageTables]) -> np.ndarray:
        """Preprocess to a host array ``[N, 3, S, S]`` of ``out_dtype`` (for tests and benchmarks).

        The lock is held from the launch through the copy back: the device output buffer is shared.
        """
        images = check_images(images)
        shape = (len(images), 3, self.size, self.size)
        if not images:
            return np.zeros(shape, self.out_dtype)
        nbytes = int(np.prod(shape)) * self.out_dtype.itemsize
        with self._lock, activated(self.context):
            if self._closed:
                raise RuntimeError("GpuPreprocessor is closed")
            if self._out is None:
                full = self.max_batch * 3 * self.size * self.size * self.out_dtype.itemsize
                self._out = self._cuda.mem_alloc(full)
                self._out_host = self._cuda.pagelocked_empty(full, np.uint8)
            self._enqueue(images, tables, int(self._out))
            self._cuda.memcpy_dtoh_async(self._out_host[:nbytes], self._out, self.stream)
            self.stream.synchronize()
            return self._out_host[:nbytes].view(self.out_dtype).reshape(shape).copy()

    def close(self) -> None:
        """Free device and pinned memory, the module and (if this object made it) the stream, now.

        Dropping the last references with the context current lets pycuda release them on this
        thread, instead of warning and leaking when the collector runs elsewhere.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with activated(self.context):
                self.stream.synchronize()
                for buffers in (self._src, self._descs, self._tables):
                    buffers.free()
                if self._out is not None:
                    self._out.free()
                    free_pinned(self._out_host)
                self._out = self._out_host = None
                self._kernel = self._module = self._uploaded = None
                if self._own_stream:
                    self.stream = None
