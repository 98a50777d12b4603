"""Export: checkpoint -> merged, truncated network -> ONNX FP32/FP16 (+ TensorRT engine) -> artifact.

Modules, in the order ``i2p-export`` uses them:

- ``options``: ``ExportOptions`` (and the command's defaults); ``probes``: inputs and the PyTorch reference
- ``build``: load, merge, truncate, write the ONNX files (``network``, ``onnx_export``, ``fp16``)
- ``network``: ``DeployedDetector`` (deltas merged, blocks after L* dropped, head folded) and checks
- ``onnx_export``: ONNX export (opset 17, dynamic batch, MHA fast path off) and graph structure checks
- ``fp16``: the FP16 copy with float32 I/O, and the FP16 weight-range check
- ``ort_run``: ONNX Runtime in a child process (a crashing execution provider becomes a result)
- ``parity_runs``: each produced model run and compared; ``parity``: ``Comparison`` / ``ParityReport``
- ``produced``: what a model step returns (the catalogue rows it kept, their comparisons, notes)
- ``optional_models``: produce → check → keep ``model.cpu.onnx`` (``cpu_optimize`` +
  ``attention_fusion``), ``model.int8.onnx`` (``quantize``) and the TensorRT engine
- ``engine``: the TensorRT engine, built by the runtime's own backend
- ``manifest``: manifest.json and parity.json, written once, last
- ``artifact``: staged, all-or-nothing output directories and file hashes
- ``triton``: a Triton Inference Server model repository
- ``pipeline``: the steps end to end (``run_export``); ``cli``: the ``i2p-export`` command
"""
