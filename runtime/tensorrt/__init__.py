"""TensorRT pieces behind ``i2p.runtime.backends.tensorrt``, one job per module.

- ``api``: importing tensorrt lazily, its logger, version checks, the errors
- ``cache``: engine file names, JSON sidecars, verification, where engines are looked up and built
- ``build``: ONNX -> serialized engine (precision rules per TensorRT version, timing cache)
- ``layernorm``: the ONNX rewrite TensorRT 8.5 needs (no LayerNormalization importer before 8.6)
- ``graph``: capture and replay of enqueued work as a CUDA graph (driver API through ctypes)

Every module imports on a machine without TensorRT, pycuda or a GPU.
"""
