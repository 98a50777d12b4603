"""I2P synthetic-image detector.

Subpackages: ``i2p.train`` (torch), ``i2p.export`` (torch + onnx), ``i2p.runtime`` (no torch),
``i2p.kernels`` (CUDA preprocessing).
"""

__version__ = "0.1.0"
