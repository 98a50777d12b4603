"""The generated torch-free artifact: shared with ``benchmarks.leak_check``, so it lives in
``benchmarks/support/fake_artifact.py``; re-exported here for the tests."""

from benchmarks.support.fake_artifact import CHANNELS, PATCH, build_model, detector_graph, make_artifact

__all__ = ["CHANNELS", "PATCH", "build_model", "detector_graph", "make_artifact"]
