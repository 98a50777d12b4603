"""Evaluation (no torch): metrics, degradations, labelled-data reading, robustness sweeps, ``i2p eval``.

Sits between the runtime, which serves a model, and training, which uses these to pick layers and
thresholds. Layer: imports ``i2p.base``, ``i2p.kernels`` and ``i2p.runtime`` only (tests/test_layers.py).
"""
