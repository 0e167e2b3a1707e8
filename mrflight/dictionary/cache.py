"""The on-disk dictionary cache: ``<cache_dir>/<cache_key>.h5``, keyed by everything that
changes the atoms (sequence, parameters, B1, precision, truncation tolerance, ``EPG_VERSION``),
written atomically and verified by its SHA-256 checksum on every load."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from mrflight.dictionary.core import Dictionary
from mrflight.dictionary.files import load, save
from mrflight.dictionary.layout import LAYOUT_VERSION
from mrflight.fileio import Digest, remove_stale_temp_files
from mrflight.physics import EPG_VERSION, Sequence
from mrflight.physics._cache import cache_root
from mrflight.physics.epg import DEFAULT_TOL

__all__ = ["default_cache_dir", "cache_key"]


def default_cache_dir() -> Path:
    """``dictionaries/`` of :func:`mrflight.physics._cache.cache_root`:
    ``$MRFLIGHT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mrflight``, else ``~/.cache/mrflight``."""
    return cache_root() / "dictionaries"


def check_params(params) -> np.ndarray:
    """``params`` as a contiguous little-endian float64 ``(M, 2)`` array (T1 ms, T2 ms)."""
    p = np.asarray(params, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] == 0:
        raise ValueError(f"params must have shape (M, 2) (T1 ms, T2 ms) with M >= 1, "
                         f"got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("params must be finite and non-negative (T1, T2 in ms)")
    return np.ascontiguousarray(p, dtype="<f8")


def check_b1(b1, m: int):
    """``None``, a 0-d or an ``(m,)`` little-endian float64 array of flip-angle scales."""
    if b1 is None:
        return None
    b = np.asarray(b1, dtype=np.float64)
    if b.ndim > 1 or (b.ndim == 1 and b.shape[0] not in (1, m)):
        raise ValueError(f"b1 must be None, a scalar, or shape (M,) = ({m},), got {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b < 0):
        raise ValueError("b1 must be finite and non-negative (a flip-angle scale factor)")
    if b.ndim == 1 and b.shape[0] == 1:
        b = b.reshape(())
    return np.array(b, dtype="<f8")  # (ascontiguousarray would turn a 0-d array into 1-d)


def cache_key(seq: Sequence, params, b1=None, dtype=torch.float32, tol=DEFAULT_TOL) -> str:
    """The cache key of a dictionary: SHA-256 over everything that changes the atoms.

    Hashes the sequence fingerprint, the parameter bytes (float64, little-endian), B1, the
    precision, the truncation tolerance, ``EPG_VERSION`` and the cache layout version.
    """
    p = check_params(params)
    b = check_b1(b1, len(p))
    digest = Digest().text(f"mrflight-dictionary/{LAYOUT_VERSION}/epg{EPG_VERSION}/")
    digest.text(seq.fingerprint()).text(repr(p.shape)).array(p)
    if b is None:
        digest.text("b1:none")
    else:
        digest.text(repr(b.shape)).array(b)
    return digest.text(f"/{dtype}/{float(tol)!r}").hexdigest()[:32]


def cache_file(cache_dir, seq: Sequence, p: np.ndarray, b, dtype, tol) -> tuple[str, Path]:
    """``(key, file)`` of a dictionary in ``cache_dir`` (``True``: :func:`default_cache_dir`);
    temporary files that killed writers left in that folder are removed first."""
    folder = default_cache_dir() if cache_dir is True else Path(cache_dir).expanduser()
    remove_stale_temp_files(folder)  # what killed writers left (up to GBs per file)
    key = cache_key(seq, p, b, dtype, tol)
    return key, folder / f"{key}.h5"


def load_cached(path: Path, key: str, p: np.ndarray) -> Dictionary | None:
    """The cached dictionary, or ``None`` when there is none or it is damaged (warned about:
    the warning names the caller of :func:`~mrflight.dictionary.generate`)."""
    if not path.exists():
        return None
    try:
        d = load(path, verify=True, require_checksum=True)
        if d.meta.get("cache_key") != key or not np.array_equal(d.params[:, :2], p):
            raise ValueError("its key or parameters do not match the request")
        return d
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild
        warnings.warn(f"dictionary cache {path} is corrupt or unreadable ({e}); "
                      "rebuilding it", RuntimeWarning, stacklevel=3)
    return None


def store(d: Dictionary, path: Path, key: str, damaged: bool = False) -> None:
    """Write ``d`` to the cache under ``key`` (making the folder); a failed write is only warned
    about. A file at ``path`` is replaced only when it was found ``damaged``: one that another
    process stored meanwhile (the same dictionary, by its key) is kept, so no reader on another
    host of a shared cache sees it replaced."""
    d.meta["cache_key"] = key
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not damaged and path.exists():
            return  # stored by another process since we looked
        save(d, path, format="h5", overwrite=damaged)
    except FileExistsError:
        pass  # stored by another process while we wrote: theirs is kept
    except (OSError, ValueError) as e:  # ValueError: a read-only file
        warnings.warn(f"could not write the dictionary cache {path}: {e}", RuntimeWarning,
                      stacklevel=3)
