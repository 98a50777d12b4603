"""Export: checkpoint -> merged, truncated network -> ONNX FP32/FP16 (+ TensorRT engine) -> artifact.

Modules, in the order ``i2p-export`` uses them:

- ``network``: ``DeployedDetector`` (deltas merged, blocks after L* dropped, head folded) and checks
- ``onnx_export``: ONNX export (opset 17, dynamic batch, MHA fast path off) and graph structure checks
- ``fp16``: the FP16 copy with float32 I/O, and the FP16 weight-range check
- ``ort_run``: ONNX Runtime in a child process (a crashing execution provider becomes a result)
- ``parity``: ``Comparison`` / ``ParityReport`` against the PyTorch model
- ``engine``: the TensorRT engine, built by the runtime's own backend
- ``artifact``: staged, all-or-nothing output directories and file hashes
- ``triton``: a Triton Inference Server model repository entry
- ``pipeline``: the steps end to end (``run_export``); ``cli``: the ``i2p-export`` command
"""
