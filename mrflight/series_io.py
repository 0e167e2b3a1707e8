"""Lazy reading of MRF image series (one image per time point) from NIfTI, NumPy, MATLAB and HDF5.

:func:`open_series` returns a :class:`SeriesSource`: the array's shape and dtype, the NIfTI
affine and header when there is one, and :meth:`SeriesSource.read` that returns one block of the
array. Nothing is read before :meth:`~SeriesSource.read` is called, and each call reads only its
block wherever the format allows it:

========================  ====================================================================
format                    how a block is read
========================  ====================================================================
``.nii`` / ``.nii.gz``    nibabel's array proxy (``img.dataobj``): only the block's bytes are
                          read (a ``.nii.gz`` is decompressed up to the block)
``.npy``                  ``np.load(mmap_mode="r")``: memory-mapped
``.h5`` / ``.hdf5``       h5py dataset slicing
``.mat`` v7.3             h5py dataset slicing (MATLAB's column-major order is undone)
``.mat`` v7, ``.npz``     the chosen variable is loaded whole in its stored dtype (these formats
                          cannot be sliced on disk); blocks are then views
========================  ====================================================================

Which variable of a multi-variable file (``.npz``, ``.mat``, ``.h5``) is the series: the one named
by ``dataset`` (an HDF5 path such as ``"recon/images"`` or a MATLAB struct field ``"s.images"``),
else the only array with at least two dimensions (and with an axis of the sequence length when
that is known); several candidates are an error that lists them.

Complex data: native complex dtypes, HDF5 compounds with ``r``/``i`` or ``real``/``imag`` fields
(h5py's and MATLAB's layouts). Real data is a magnitude image, never negative:
:mod:`mrflight.maps` refuses a real series with a negative value (the real part of complex data
is not a magnitude) and asks for the complex series or its magnitude.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from mrflight.fileio import damaged_error, is_mat_v73, load_mat

__all__ = ["SeriesSource", "open_series", "series_stem", "SERIES_SUFFIXES"]

#: file name endings understood by :func:`open_series`
SERIES_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz", ".mat", ".h5", ".hdf5")


def series_stem(path: str | os.PathLike) -> str:
    """File name without its series suffix (``sub-01_mrf.nii.gz`` -> ``sub-01_mrf``)."""
    name = Path(path).name
    for suf in sorted(SERIES_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def _complex_from_compound(arr: np.ndarray) -> np.ndarray:
    names = arr.dtype.names or ()
    for re_, im_ in (("real", "imag"), ("r", "i")):
        if re_ in names and im_ in names:
            real, imag = arr[re_], arr[im_]
            out_dtype = np.complex64 if real.dtype.itemsize <= 4 else np.complex128
            out = np.empty(real.shape, dtype=out_dtype)
            out.real, out.imag = real, imag
            return out
    return arr


class SeriesSource:
    """A lazily read image series: spatial axes plus one time axis, in any order.

    Args:
        array: an object with ``shape``, ``dtype`` and numpy-style basic indexing (a numpy array,
            a memory map, a nibabel array proxy, an h5py dataset).
        path: the file it came from (``None`` for in-memory arrays).
        affine: ``(4, 4)`` voxel-to-world matrix of a NIfTI input, else ``None``.
        header: the NIfTI header of a NIfTI input, else ``None``.
        image_class: the nibabel image class of a NIfTI input (``Nifti1Image``/``Nifti2Image``).
        reversed_axes: the array is stored transposed (MATLAB v7.3 through h5py): ``read`` reverses
            the index and transposes the block so callers see MATLAB's axis order.
        order: ``"C"`` or ``"F"``: which end of the axes varies slowest on disk (used to choose
            the slice axis that gives contiguous reads).
        closer: called by :meth:`close` (closes an HDF5 file).
        name: the variable/dataset name inside the file, if any.
        option: the option that named the file (``input``, ``mask``, ``b1map``), for errors.
    """

    def __init__(self, array, *, path=None, affine=None, header=None, image_class=None,
                 reversed_axes: bool = False, order: str = "C", closer=None,
                 name: str | None = None, option: str = "input") -> None:
        self._array = array
        self.path = None if path is None else Path(path)
        self.affine = None if affine is None else np.asarray(affine, dtype=np.float64)
        self.header = header
        self.image_class = image_class
        self._reversed = bool(reversed_axes)
        self.order = order
        self._closer = closer
        self.name = name
        self.option = option
        shape = tuple(int(s) for s in array.shape)
        self.shape = shape[::-1] if self._reversed else shape
        dt = np.dtype(array.dtype)
        if dt.names:
            probe = _complex_from_compound(np.zeros(1, dtype=dt))
            dt = probe.dtype
        self.dtype = dt
        if self.dtype.kind not in "biufc":
            raise ValueError(f"the series {self.describe()} has dtype {self.dtype}; expected a "
                             "real or complex numeric array")

    # ------------------------------------------------------------------ properties
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_complex(self) -> bool:
        """True for complex data (read as complex64), False for magnitude/real (float32)."""
        return self.dtype.kind == "c"

    @property
    def is_nifti(self) -> bool:
        return self.header is not None

    def describe(self) -> str:
        where = str(self.path) if self.path is not None else "<array>"
        return where + (f" [{self.name}]" if self.name else "")

    # ------------------------------------------------------------------ reading
    def read(self, index: tuple) -> np.ndarray:
        """Read one block, converted to complex64 (complex data) or float32 (real data).

        Args:
            index: one ``int`` or ``slice`` per axis, in the source's axis order.

        Returns:
            The block; integer indices drop their axis, as in numpy.

        Raises:
            ValueError: the file is truncated or damaged (naming the file and its option).
        """
        index = tuple(index)
        if len(index) != self.ndim:
            raise ValueError(f"index needs {self.ndim} entries, got {len(index)}")
        try:  # a cut-short file fails only here: nibabel and h5py read lazily
            raw = np.asarray(self._array[index[::-1] if self._reversed else index])
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise damaged_error(f"{self.option}={self.describe()}", e) from None
        raw = _complex_from_compound(raw) if raw.dtype.names else raw
        raw = raw.T if self._reversed else raw
        target = np.complex64 if raw.dtype.kind == "c" else np.float32
        return np.asarray(raw, dtype=target)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> SeriesSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SeriesSource({self.describe()}, shape={self.shape}, dtype={self.dtype}, "
                f"nifti={self.is_nifti})")


# ---------------------------------------------------------------------------------- choosing
def _choose(candidates: dict[str, tuple[int, ...]], dataset: str | None, path: Path,
            length: int | None, option: str = "input") -> str:
    """Pick the variable holding the series (or the ``option=`` file's array) among
    ``name -> shape``."""
    if dataset is not None:
        if dataset not in candidates:
            raise ValueError(f"dataset={dataset!r} (maps.dataset on the command line) is not in "
                             f"{path}; it holds {_listing(candidates)}")
        return dataset
    multi = _images(candidates)
    if length is not None and len(multi) > 1:
        with_t = {k: s for k, s in multi.items() if length in s}
        multi = with_t or multi
    if len(multi) == 1:
        return next(iter(multi))
    series = option == "input"
    if not multi:
        raise ValueError(f"{option}={path} holds no array with at least 2 dimensions "
                         f"({_listing(candidates)}); "
                         + ("an image series needs space and time axes" if series
                            else "give an array of the image grid"))
    raise ValueError(f"{option}={path} holds several arrays ({_listing(multi)}); "
                     + ("choose the image series with dataset=NAME (maps.dataset=NAME on the "
                        "command line)" if series else
                        f"save the one meant alone (e.g. np.save('{option}.npy', arr), or as "
                        f"NIfTI) and pass that file as {option}="))


def _images(candidates: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The arrays of at least 2 axes; where some have 2 axes longer than one, only those: a
    MATLAB file stores a scalar as 1 x 1 and a vector (flip angles, TRs) as 1 x N, which are
    not images beside the series, mask or B1 map."""
    multi = {k: s for k, s in candidates.items() if len(s) >= 2}
    wide = {k: s for k, s in multi.items() if sum(int(n) > 1 for n in s) >= 2}
    return wide or multi


def _listing(c: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {tuple(s)}" for k, s in c.items()) or "nothing"


def _flatten(d: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, np.ndarray) and v.dtype.kind in "biufc":
            out[prefix + k] = v
    return out


def _h5_datasets(f) -> dict:
    import h5py

    found = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and not name.split("/")[-1].startswith("#"):
            found[name] = obj

    f.visititems(visit)
    return found


# ---------------------------------------------------------------------------------- opening
def open_series(path: str | os.PathLike, *, dataset: str | None = None,
                length: int | None = None, option: str = "input",
                what: str = "image series") -> SeriesSource:
    """Open an image series file (or another array file on its grid) lazily.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.npy``, ``.npz``, ``.mat`` (v7 or v7.3), ``.h5``/``.hdf5``.
        dataset: the variable/dataset holding the series in a multi-variable file (see the module
            docstring); ignored for NIfTI and ``.npy``.
        length: the expected number of time points (the sequence length), used only to choose
            among several candidate arrays.
        option, what: the option that names the file and what it holds, for error messages
            (``"input"``, ``"image series"``; ``"b1map"``, ``"B1 map"``).

    Returns:
        A :class:`SeriesSource` (close it, or use it as a context manager, to release HDF5 files).

    Raises:
        ValueError: missing file, unknown suffix, unreadable (truncated or damaged) file, or
            no/ambiguous variable; each names ``option``.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{option}={str(path)!r} does not exist; pass the {what} file")
    if path.is_dir():
        raise ValueError(f"{option}={str(path)!r} is a folder: give the {what} file in it "
                         f"({', '.join(SERIES_SUFFIXES)})")
    name = path.name.lower()
    given = f"{option}={path}"
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as e:
            raise damaged_error(given, e, "NIfTI file") from None
        return SeriesSource(_nifti_time_in_4th(img.dataobj), path=path, affine=img.affine,
                            header=img.header, image_class=type(img), order="F", option=option)
    if name.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise damaged_error(given, e, ".npy file") from None
        order = "F" if (arr.flags.f_contiguous and not arr.flags.c_contiguous) else "C"
        return SeriesSource(arr, path=path, order=order, option=option)
    if name.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                shapes = {k: z[k].shape for k in z.files}
                key = _choose(shapes, dataset, path, length, option)
                arr = z[key]
        except ValueError:
            raise
        except Exception as e:
            raise damaged_error(given, e, ".npz file") from None
        return SeriesSource(arr, path=path, name=key, option=option)
    if name.endswith(".mat") and path.is_file() and is_mat_v73(path):
        return _open_h5(path, dataset, length, option, matlab=True)
    if name.endswith(".mat"):
        try:
            data = _flatten(load_mat(path, squeeze=False))
        except ValueError as e:  # "<path> is not a readable MATLAB file ...": name the option
            raise ValueError(f"{option}={e}") from None
        key = _choose({k: v.shape for k, v in data.items()}, dataset, path, length, option)
        return SeriesSource(data[key], path=path, name=key, option=option)
    if name.endswith((".h5", ".hdf5")):
        return _open_h5(path, dataset, length, option, matlab=False)
    raise ValueError(f"{option}={str(path)!r} has an unknown suffix; use one of "
                     f"{', '.join(SERIES_SUFFIXES)}")


def _nifti_time_in_4th(proxy):
    """A NIfTI array of more than 4 dimensions whose axes beyond the third are all singletons
    but one, e.g. ``(X, Y, Z, 1, T)`` as some converters write a series, seen as
    ``(X, Y, Z, T)`` (a lazy reshape of nibabel's proxy: nothing is read)."""
    shape = tuple(int(s) for s in proxy.shape)
    if len(shape) <= 4 or not hasattr(proxy, "reshape"):
        return proxy
    rest = [s for s in shape[3:] if s != 1]
    if len(rest) != 1:
        return proxy  # several non-singleton axes beyond space: refused by the time-axis check
    return proxy.reshape(shape[:3] + (rest[0],))


def _open_h5(path: Path, dataset: str | None, length: int | None, option: str,
             matlab: bool) -> SeriesSource:
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise damaged_error(f"{option}={path}", e, "HDF5 file") from None
    try:
        dsets = _h5_datasets(f)
        if matlab:
            dsets = {k.replace("/", "."): v for k, v in dsets.items()
                     if v.attrs.get("MATLAB_class", b"") not in (b"char", b"struct")}
            shapes = {k: tuple(v.shape[::-1]) for k, v in dsets.items()}
        else:
            shapes = {k: tuple(v.shape) for k, v in dsets.items()}
        key = _choose(shapes, dataset.lstrip("/") if dataset else None, path, length, option)
        return SeriesSource(dsets[key], path=path, reversed_axes=matlab,
                            order="F" if matlab else "C", closer=f.close, name=key,
                            option=option)
    except Exception:
        f.close()
        raise
