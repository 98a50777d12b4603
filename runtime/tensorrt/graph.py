"""Work enqueued on a stream, captured once as a CUDA graph and replayed with a single launch.

pycuda has no graph API, so this goes through the driver API with ctypes. A capture that fails
midway destroys what it made; ``close()`` is idempotent.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


class CudaGraph:
    """Work enqueued on a stream, captured once and replayed with a single launch."""

    THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: other threads' CUDA calls stay legal

    def __init__(self, stream_handle: int, enqueue: Callable[[], None]) -> None:
        self._lib = ctypes.CDLL("libcuda.so.1")
        stream = ctypes.c_void_p(stream_handle)
        self._graph, self._exec = ctypes.c_void_p(), ctypes.c_void_p()
        self._check("cuStreamBeginCapture_v2", self._lib.cuStreamBeginCapture_v2(stream, self.THREAD_LOCAL))
        try:
            try:
                enqueue()
            finally:  # capture must end (and its graph be freed) whatever enqueue did
                ended = self._lib.cuStreamEndCapture(stream, ctypes.byref(self._graph))
            self._check("cuStreamEndCapture", ended)
            flags = ctypes.c_ulonglong(0)
            made = self._lib.cuGraphInstantiateWithFlags(ctypes.byref(self._exec), self._graph, flags)
            self._check("cuGraphInstantiateWithFlags", made)
        except BaseException:
            self.close()
            raise

    def _check(self, call: str, status: int) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(status, ctypes.byref(name))
            raise RuntimeError(f"{call} failed: {(name.value or b'?').decode()} ({status})")

    def launch(self, stream_handle: int) -> None:
        self._check("cuGraphLaunch", self._lib.cuGraphLaunch(self._exec, ctypes.c_void_p(stream_handle)))

    def close(self) -> None:
        """Destroy the executable graph and the graph; safe to call twice."""
        if self._exec.value:
            self._lib.cuGraphExecDestroy(self._exec)
        if self._graph.value:
            self._lib.cuGraphDestroy(self._graph)
        self._graph, self._exec = ctypes.c_void_p(), ctypes.c_void_p()
