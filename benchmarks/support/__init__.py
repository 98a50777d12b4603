"""What the benchmarks and the tests both build: tiny checkpoints, a generated artifact, hostile images and a
local ``tritonserver``. The tests re-export it from ``tests.support``; benchmarks never import the tests."""
