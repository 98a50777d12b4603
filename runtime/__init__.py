"""The lean runtime: load an exported artifact and score images with numpy, Pillow and one backend.

Never imports torch, nor anything from ``i2p.train`` / ``i2p.export``; the inference backends load
only when a Detector is created.
"""

from .detector import BackendUnavailableError, Detector, Prediction
from .manifest import ArtifactError
from .preprocess import ImageError, PreprocessSpec

__all__ = [
    "ArtifactError",
    "BackendUnavailableError",
    "Detector",
    "ImageError",
    "Prediction",
    "PreprocessSpec",
]
