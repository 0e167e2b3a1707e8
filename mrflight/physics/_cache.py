"""The root folder of mrflight's on-disk caches (compiled kernels, simulated dictionaries)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MRFLIGHT_CACHE_DIR`` (``~`` expanded) when that variable is set and not empty, else
    ``$XDG_CACHE_HOME/mrflight`` (the user's cache folder in the XDG convention, when set), else
    ``~/.cache/mrflight``. Kernels go to ``kernels/``, dictionaries to ``dictionaries/``."""
    root = os.environ.get("MRFLIGHT_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() / "mrflight" if xdg else Path.home() / ".cache" / "mrflight"
