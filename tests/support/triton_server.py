"""The local ``tritonserver`` launcher: shared with ``benchmarks.serve``, so it lives in
``benchmarks/support/triton_server.py``; re-exported here for the tests."""

from benchmarks.support.triton_server import (
    HOME_ENV,
    INSTALL,
    TritonServer,
    free_port,
    missing_reason,
    triton_home,
)

__all__ = ["HOME_ENV", "INSTALL", "TritonServer", "free_port", "missing_reason", "triton_home"]
