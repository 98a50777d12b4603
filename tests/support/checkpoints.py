"""Tiny random-weight checkpoints: shared with ``benchmarks.gpu_runners``, so they live in
``benchmarks/support/checkpoints.py``; re-exported here for the tests."""

from benchmarks.support.checkpoints import TINY, make_checkpoint, tiny_model

__all__ = ["TINY", "make_checkpoint", "tiny_model"]
