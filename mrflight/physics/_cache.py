"""The root folder of mrflight's on-disk caches (compiled kernels, simulated dictionaries)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MRFLIGHT_CACHE_DIR`` (``~`` expanded) when that variable is set and not empty, else
    ``~/.cache/mrflight``. Kernels go to ``kernels/``, dictionaries to ``dictionaries/``."""
    root = os.environ.get("MRFLIGHT_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mrflight"
