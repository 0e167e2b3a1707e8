"""MRF dictionaries: parameter grids, simulation with an on-disk cache, and file I/O.

A :class:`Dictionary` holds simulated fingerprints (*atoms*, complex, shape ``(M, T)``) and the
tissue parameters they were simulated for (``(M, P)``, T1 and T2 in ms first), together with the
parameter names, their units, the pulse train (``Sequence.to_dict()``) and free-form metadata.

Modules:

* :mod:`~mrflight.dictionary.grids` -- :func:`paper_grid` (Oksuz et al. 2019),
  :func:`regular_grid`, :func:`random_params`: ``(M, 2)`` float64 arrays of T1 ms, T2 ms.
* :mod:`~mrflight.dictionary.core` -- the :class:`Dictionary` container;
  :mod:`~mrflight.dictionary.columns` -- parameter columns identified by name, never by
  position (``("T2", "T1")`` columns are reordered to T1, T2[, B1][, others] in ms).
* :mod:`~mrflight.dictionary.generation` -- :func:`generate` (simulated with
  :func:`mrflight.physics.simulate`, optionally cached) and :func:`generate_to_file` (streamed
  to an ``.h5`` file chunk by chunk, for dictionaries larger than memory);
  :mod:`~mrflight.dictionary.cache` -- :func:`cache_key`, :func:`default_cache_dir` (the cache
  is keyed by the sequence, the parameters, B1, precision, truncation tolerance and
  ``EPG_VERSION``; written atomically and verified by a SHA-256 checksum on every load).
* :mod:`~mrflight.dictionary.files` -- :func:`save` / :func:`load` of ``.h5`` (HDF5), ``.npz``
  and MATLAB ``.mat`` (v7 and v7.3; :mod:`~mrflight.dictionary.matlab`) files;
  :mod:`~mrflight.dictionary.h5` -- :func:`open_h5` reads an ``.h5`` file lazily;
  :mod:`~mrflight.dictionary.layout` -- formats, header and checksum of the files.

References:
    Oksuz I, et al. Magnetic resonance fingerprinting using recurrent neural networks.
    ISBI 2019 (dictionary grid). Ma D, et al. Magnetic resonance fingerprinting. Nature 2013
    (the ``dict.D`` / ``dict.lut`` / ``dict.normD`` MATLAB layout).
"""

from mrflight.dictionary.cache import cache_key, default_cache_dir
from mrflight.dictionary.core import Dictionary
from mrflight.dictionary.files import load, save
from mrflight.dictionary.generation import generate, generate_to_file
from mrflight.dictionary.grids import paper_grid, random_params, regular_grid
from mrflight.dictionary.h5 import open_h5
from mrflight.dictionary.layout import FORMATS

__all__ = [
    "Dictionary",
    "paper_grid",
    "regular_grid",
    "random_params",
    "generate",
    "generate_to_file",
    "open_h5",
    "save",
    "load",
    "default_cache_dir",
    "cache_key",
    "FORMATS",
]
