"""Simulating dictionaries: :func:`generate` (in memory, optionally cached on disk) and
:func:`generate_to_file` (streamed to an ``.h5`` file chunk by chunk, for dictionaries larger
than memory)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch

from mrflight.dictionary.cache import cache_file, check_b1, check_params, load_cached, store
from mrflight.dictionary.core import Dictionary
from mrflight.dictionary.files import check_destination
from mrflight.dictionary.h5 import write_header
from mrflight.dictionary.layout import PayloadDigest, file_format, header_json
from mrflight.fileio import atomic_path
from mrflight.physics import EPG_VERSION, Sequence, simulate
from mrflight.physics.epg import DEFAULT_TOL, truncation_rate

__all__ = ["generate", "generate_to_file"]


def generate(
    seq: Sequence,
    params,
    *,
    b1=None,
    cache_dir=None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    tol: float = DEFAULT_TOL,
) -> Dictionary:
    """Simulate a dictionary with :func:`mrflight.physics.simulate`, optionally cached on disk.

    Args:
        seq: the pulse train.
        params: ``(M, 2)`` T1 and T2 in ms (e.g. :func:`paper_grid`).
        b1: flip-angle scale: ``None`` (1), a scalar (stored in ``meta["b1"]``), or shape
            ``(M,)`` (appended to the parameters as a third column ``"b1"``, unit ``"1"``).
        cache_dir: ``None`` or ``False``: no cache. ``True``: :func:`default_cache_dir`
            (``$MRFLIGHT_CACHE_DIR/dictionaries`` or ``~/.cache/mrflight/dictionaries``).
            A path: that folder. The file is ``<cache_dir>/<cache_key>.h5``; it is written
            atomically with a SHA-256 checksum of the payload and verified on load; a corrupt or
            truncated file is reported with a ``RuntimeWarning`` and rebuilt, never used.
            Temporary files that killed writers left in the folder are removed
            (:func:`mrflight.fileio.remove_stale_temp_files`).
        progress: show a progress bar (rich) while simulating.
        dtype: simulation precision, ``torch.float32`` (complex64 atoms) or ``torch.float64``.
        tol: EPG truncation tolerance passed to ``simulate``.

    Returns:
        A :class:`Dictionary` with complex atoms ``(M, T)``, ``sequence=seq.to_dict()`` and the
        simulation settings in ``meta``.

    Memory: the atoms are held once (complex64: 8 bytes per sample, 1.6 GB for the paper grid
    with 1750 pulses) plus ``simulate``'s transient real buffer (half that); no float64 copy.
    """
    _check_request(seq, dtype)
    p = check_params(params)
    b = check_b1(b1, len(p))
    key = path = None
    if cache_dir is not None and cache_dir is not False:
        key, path = cache_file(cache_dir, seq, p, b, dtype, tol)
        cached = load_cached(path, key, p)
        if cached is not None:
            return cached
        damaged = path.exists()  # there but not usable: rebuilt and replaced
    with _progress_bar(len(p), progress) as cb:
        t1 = torch.from_numpy(p[:, 0].astype(np.float64))
        t2 = torch.from_numpy(p[:, 1].astype(np.float64))
        bt = None if b is None else torch.from_numpy(np.array(b, dtype=np.float64))
        atoms = simulate(seq, t1, t2, bt, dtype=dtype, tol=tol, progress=cb)
    atoms = atoms.detach().cpu().numpy()  # shares memory with the tensor: no copy

    names, units, out_params, meta = _layout(p, b, dtype, tol)
    d = Dictionary(atoms, out_params.astype(np.float64), names, units, seq.to_dict(), meta)
    _warn_zero_atoms(int(np.sum(d.norms() == 0)), len(d))
    if path is not None:
        store(d, path, key, damaged)
    return d


def generate_to_file(
    seq: Sequence,
    params,
    path,
    *,
    b1=None,
    chunk_atoms: int = 8192,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    tol: float = DEFAULT_TOL,
    overwrite: bool = False,
) -> Path:
    """Simulate a dictionary chunk by chunk straight into an ``.h5`` file (bounded memory).

    The file has the layout of ``save(generate(seq, params, b1=b1, dtype=dtype, tol=tol),
    path)`` (same datasets, attributes and SHA-256 checksum, computed as the chunks stream by),
    so :func:`load` and :func:`open_h5` read it, but only ``chunk_atoms`` fingerprints are ever
    in memory: use it for dictionaries larger than RAM. With ``chunk_atoms >= M`` the atoms are
    bit-identical to :func:`generate`'s; with smaller chunks they differ from them only by EPG
    truncation, at the level of ``tol`` (the truncation rate is fixed from the whole grid, but
    the SIMD kernel shares one state count among 16 neighbouring atoms of a chunk, so an atom
    may keep a few more states than in one big call, never fewer). The HDF5 dataset ``atoms`` is
    pre-allocated and filled chunk by chunk in a temporary file beside ``path`` that is renamed
    to ``path`` at the end (:func:`mrflight.fileio.atomic_path`): a killed run leaves any older
    file at ``path`` untouched and never a partial one. As :func:`save`, it refuses an existing
    ``path`` unless ``overwrite=True``, before simulating anything.

    Args:
        seq: the pulse train.
        params: ``(M, 2)`` T1 and T2 in ms.
        path: destination ``.h5`` file.
        b1: as in :func:`generate`.
        chunk_atoms: fingerprints simulated and written per chunk (memory: about
            ``chunk_atoms * T * 12`` bytes in float32).
        progress: show a progress bar.
        dtype: ``torch.float32`` (complex64 atoms) or ``torch.float64``.
        tol: EPG truncation tolerance.
        overwrite: replace a file already at ``path`` (default: refuse).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: bad sequence, parameters, B1, chunk size, dtype or a non-``.h5`` path; a
            ``path`` that exists (without ``overwrite=True``), is a folder or is in a folder
            that does not exist.
    """
    import h5py

    _check_request(seq, dtype)
    if isinstance(chunk_atoms, bool) or not isinstance(chunk_atoms, (int, np.integer)) \
            or chunk_atoms < 1:
        raise ValueError(f"chunk_atoms must be a positive integer, got {chunk_atoms!r}")
    path = Path(path)
    if file_format(path, None) != "h5":
        raise ValueError(f"generate_to_file writes HDF5: give a .h5 path, got {path}")
    check_destination(path, overwrite)
    p = check_params(params)
    b = check_b1(b1, len(p))
    m, t = len(p), len(seq)
    cdtype = np.dtype(np.complex64 if dtype == torch.float32 else np.complex128)
    names, units, out_params, meta = _layout(p, b, dtype, tol)
    out_params = np.ascontiguousarray(out_params, dtype="<f8")
    header = header_json(names, units, seq.to_dict(), meta)
    # the truncation rate depends on the parameter range: fix it from the whole grid so every
    # chunk keeps the states ``generate`` would keep (identical atoms, not just within tol)
    rate = truncation_rate(seq, tol, float(p[:, 1].max()), float(p[:, 0].max()),
                           (1.0, 1.0) if b is None else (float(b.min()), float(b.max())))
    digest = PayloadDigest(cdtype, (m, t), out_params.shape)
    with atomic_path(path, replace=overwrite) as tmp, _progress_bar(m, progress) as cb:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("atoms", shape=(m, t), dtype=cdtype)
            chunks = _simulate_chunks(seq, p, b, int(chunk_atoms), cdtype,
                                      dict(dtype=dtype, tol=tol, _rate=rate))
            zero = _write_atoms(ds, chunks, digest, cb)
            f.create_dataset("params", data=out_params)
            write_header(f, header, digest.finish(out_params, None, header))
    _warn_zero_atoms(zero, m)
    return path


def _check_request(seq, dtype) -> None:
    if not isinstance(seq, Sequence):
        raise ValueError(f"seq must be a mrflight.physics.Sequence, got {type(seq).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _simulate_chunks(seq: Sequence, p: np.ndarray, b, chunk_atoms: int, cdtype: np.dtype,
                     sim_kwargs: dict):
    """Yield ``(rows, atoms)`` chunk by chunk: ``atoms`` contiguous ``cdtype``, all finite."""
    m = len(p)
    for start in range(0, m, chunk_atoms):
        sl = slice(start, min(start + chunk_atoms, m))
        bt = None if b is None else torch.from_numpy(
            np.array(b if b.ndim == 0 else b[sl], dtype=np.float64))
        chunk = simulate(seq, torch.from_numpy(p[sl, 0].copy()),
                         torch.from_numpy(p[sl, 1].copy()), bt,
                         **sim_kwargs).detach().cpu().numpy()
        chunk = np.ascontiguousarray(chunk, dtype=cdtype)
        if not np.all(np.isfinite(chunk.view(chunk.real.dtype))):
            raise ValueError("simulation produced NaN or Inf atoms")
        yield sl, chunk
        del chunk


def _write_atoms(ds, chunks, digest: PayloadDigest, cb) -> int:
    """Write the chunks into the dataset ``ds``, feeding ``digest`` and the progress callback
    ``cb``; the number of all-zero atoms."""
    zero = 0
    for sl, chunk in chunks:
        ds[sl] = chunk
        digest.rows(chunk)
        zero += int(np.sum(~np.any(chunk != 0, axis=1)))
        del chunk
        if cb is not None:
            cb(sl.stop)
    return zero


def _warn_zero_atoms(zero: int, m: int) -> None:
    """Warn (naming the caller of generate / generate_to_file) about all-zero atoms."""
    if zero:
        warnings.warn(f"{zero} of {m} atoms are identically zero (T2 ~ 0 at TE > 0) and "
                      "cannot be normalised; drop them from params", RuntimeWarning,
                      stacklevel=3)


def _progress_bar(total: int, enabled: bool):
    """A context manager yielding a ``callback(n_done)`` (or ``None`` when disabled)."""
    if not enabled:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        from mrflight.progress import progress_bar

        with progress_bar("simulating dictionary", transient=True) as prog:
            task = prog.add_task("atoms", total=total)
            yield lambda n: prog.update(task, completed=int(n))

    return bar()


def _layout(p: np.ndarray, b, dtype, tol):
    """Parameter names, units, parameter table (B1 as a third column when per atom) and meta."""
    names, units, out_params = ("t1_ms", "t2_ms"), ("ms", "ms"), p
    meta = {"epg_version": EPG_VERSION, "tol": float(tol), "dtype": str(dtype).split(".")[-1],
            "b1": None if b is None or b.ndim == 1 else float(b), "generator": "mrflight"}
    if b is not None and b.ndim == 1:
        names, units = names + ("b1",), units + ("1",)
        out_params = np.concatenate([p, b[:, None]], axis=1)
    return names, units, out_params, meta
