"""Training (torch + open_clip): stage 1 picks the critical layer L*, stage 2 tunes a low-sensitivity subspace.

The checkpoint it writes is the contract export reads: ``metadata`` (typed, versioned) and ``checkpoint``.
Layer: imports ``i2p.base``, ``i2p.kernels`` and ``i2p.runtime`` only (tests/test_layers.py).
"""
