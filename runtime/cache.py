"""The per-user cache for what is built on this machine (engines, compiled kernels, ORT engine caches).

Artifacts are verified read-only, so anything derived from them on a device lives here instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$I2P_CACHE_DIR``, else ``$XDG_CACHE_HOME/i2p``, else ``~/.cache/i2p``."""
    if os.environ.get("I2P_CACHE_DIR"):
        return Path(os.environ["I2P_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "i2p"
