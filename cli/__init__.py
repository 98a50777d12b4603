"""I2P synthetic-image detector.

Layers, each importing only those before it: ``i2p.base`` (files, tables), ``i2p.kernels`` (CUDA
preprocessing), ``i2p.runtime`` (no torch: manifest, Detector), ``i2p.train`` (torch), ``i2p.export``
(torch + onnx), and this package: the ``i2p`` command group (``cli``) and ``i2p demo`` (``demo``).
"""

__version__ = "0.1.0"
