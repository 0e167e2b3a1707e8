"""Atomic file writing, SHA-256 digests, and MATLAB ``.mat`` I/O (v7 via scipy, v7.3 via h5py).

Every file mrflight writes goes through :func:`atomic_path`: the data is written to a temporary
file in the destination folder, flushed to disk, and renamed over the destination, so a killed
process leaves either the old file or the new one, never a half-written file. The temporary file
is hidden and names its writer (``.NAME.<pid>@<host>.XXXXXXXX<suffix>.tmp``), so that
:func:`remove_stale_temp_files` can delete those a killed writer left behind. The file gets the
permissions a plain ``open(dest, "w")`` would give it: those of the file it replaces, else
``0o666`` minus the process umask (``0o644`` under the usual umask 022), not the ``0o600`` of a
temporary file.

MATLAB v7.3 files written by :func:`save_mat` carry a SHA-256 checksum of their variables (root
attribute ``mrflight_sha256`` of the HDF5 container, ignored by MATLAB) that :func:`load_mat`
verifies; any damaged or truncated file is reported as a ``ValueError`` naming it. That checksum,
the dictionary files' checksums and the dictionary cache keys are all computed by :class:`Digest`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["atomic_path", "remove_stale_temp_files", "output_folder", "held_results", "lock_folder",
           "RUN_RESULTS", "FINISHED", "load_mat", "save_mat", "is_mat_v73", "file_mode",
           "damaged_error", "Digest", "DISK_FULL"]

#: the errors of a write that found no room: a full disk, and a user's exhausted quota (the
#: usual one on a cluster's shared file systems)
DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

#: root attribute of a v7.3 file holding the SHA-256 checksum of its variables
_CHECKSUM_ATTR = "mrflight_sha256"


class Digest:
    """A SHA-256 digest fed with text and with the raw bytes of arrays.

    ``Digest().text("a").array(x).hexdigest()`` hashes the UTF-8 bytes of ``"a"`` followed by
    the bytes of ``x`` in C order (as stored in memory: a C-contiguous array is not copied).
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def text(self, s: str) -> Digest:
        """Feed the UTF-8 bytes of ``s``."""
        self._sha.update(s.encode())
        return self

    def array(self, a, dtype=None) -> Digest:
        """Feed the bytes of ``a`` in C order, converted to ``dtype`` first when given."""
        self._sha.update(np.ascontiguousarray(a, dtype=dtype).reshape(-1).view(np.uint8))
        return self

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-and-restore
    os.umask(mask)
    return mask


def file_mode(dest: str | os.PathLike) -> int:
    """Permission bits a plain ``open(dest, "w")`` gives: the existing file's, else
    ``0o666 & ~umask``."""
    try:
        return os.stat(dest).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None, *,
                replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is fsynced and renamed to ``dest``.

    On an exception the temporary file is removed and ``dest`` is left untouched; a full disk
    or quota raises ``OSError(ENOSPC)`` (``EDQUOT``) naming ``dest``.

    Args:
        dest: the final file.
        suffix: suffix of the temporary file (default: that of ``dest``, so libraries that infer
            the format from the name keep working).
        replace: replace a file at ``dest``; with ``False`` a file that appeared there while
            this one was written (another process) is kept and ``FileExistsError`` raised, the
            new file being discarded (the check and the rename are one step: a hard link).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}@{_host()}.",
                               suffix=(suffix or dest.suffix) + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, file_mode(dest))
        if replace:
            os.replace(tmp_path, dest)
        else:
            _move_no_replace(tmp_path, dest)
    except OSError as e:
        if e.errno in DISK_FULL and e.filename != str(dest):
            raise OSError(e.errno, os.strerror(e.errno), str(dest)) from e
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _move_no_replace(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` unless ``dest`` exists (``FileExistsError`` naming it)."""
    try:
        os.link(src, dest)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "another process wrote this file meanwhile; it was "
                              "kept and this one discarded", str(dest)) from None
    except OSError:  # no hard links on this file system: check, then rename
        if dest.exists() or dest.is_symlink():
            raise FileExistsError(errno.EEXIST, "another process wrote this file meanwhile; it "
                                  "was kept and this one discarded", str(dest)) from None
        os.replace(src, dest)
        return
    src.unlink()


def _host() -> str:
    """This machine's short host name, and the id of this process's PID namespace where the
    system has them (``node-pid4026531836``): a process id names a writer only within its
    namespace, and containers sharing a cache folder can share a host name. No dots: it is part
    of temporary file names."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"
    try:
        ns = re.search(r"\[(\d+)\]", os.readlink("/proc/self/ns/pid"))
    except OSError:
        ns = None
    return f"{host}-pid{ns.group(1)}" if ns else host


#: the temporary files of :func:`atomic_path` (old ones have no ``<pid>@<host>.`` part)
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.)?"
                   r"[a-z0-9_]{8}(?:\.[^.]+)?\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, max_age_s: float = 3600.0) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_path` writers left in ``folder``.

    A temporary file is stale when its writer process (named in the file name) is gone on this
    host and PID namespace (:func:`_host`), or when nothing wrote to it for ``max_age_s``
    seconds (writers on other hosts or in other containers of a shared folder, and files of
    older versions whose names carry no writer). Other files are never touched. Errors (a file
    removed meanwhile, no permission) are ignored.

    Args:
        folder: a cache or output folder (not searched recursively).
        max_age_s: age of the last write beyond which a temporary file is stale.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now, host = time.time(), _host()
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
            dead = m["pid"] is not None and m["host"] == host and not _alive(int(m["pid"]))
            if old or dead:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


#: the file a finished training run writes last: its metrics
FINISHED = "metrics.json"
#: what a training run leaves in its folder (another run there would overwrite it)
RUN_RESULTS = (FINISHED, "checkpoints")
#: written into a job's output dir when a job of a multirun failed (its error and traceback)
FAILED_FILE = "FAILED.txt"


def read_failure(folder: str | os.PathLike) -> dict | None:
    """The ``FAILED.txt`` of a job's folder (``error``, ``overrides``, ``traceback``), or
    ``None`` where there is none; an unreadable one gives ``{"error": "unreadable FAILED.txt"}``."""
    import json

    f = Path(folder) / FAILED_FILE
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        info = None
    return info if isinstance(info, dict) else {"error": "unreadable FAILED.txt"}


def held_results(folder: str | os.PathLike, names: tuple[str, ...] = RUN_RESULTS) -> list[str]:
    """Those of ``names`` that ``folder`` holds (a folder counts when it holds a file)."""
    out = Path(folder).expanduser()
    return [n for n in names if (out / n).is_file()
            or ((out / n).is_dir() and any(p.is_file() for p in (out / n).rglob("*")))]


def output_folder(path: str | os.PathLike, results: tuple[str, ...] = (),
                  option: str = "paths.output_dir", fix: str | None = None,
                  make: bool = True) -> Path:
    """``path`` made (with its parents) as the folder a command writes into, after checks:
    it is not a file, it can be made, and none of ``results`` (names of an earlier run's
    results, e.g. ``metrics.json``, ``checkpoints``; a folder counts when it holds a file) is
    in it, so that nothing there is overwritten. ``make=False`` checks only (the writer makes
    the folder once its input has passed its own checks).

    Raises:
        ValueError: naming ``option`` and the fix (``fix``, else to give another folder).
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option}={out} is a file, not a folder: give a folder to write into")
    found = held_results(out, results)
    if found:
        raise ValueError(f"{option}={out} already holds the results of another run "
                         f"({', '.join(found)}), which this command would overwrite: "
                         + (fix or f"give another {option} (each run gets a new one by "
                                   "default)"))
    try:
        if make:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option}={out} cannot be made ({e.strerror or e}): give a folder "
                         "you can write into") from None
    return out


#: the lock file a training run holds in its folder while it runs (:func:`lock_folder`)
LOCK_FILE = ".mrflight.lock"


def lock_folder(folder: str | os.PathLike, option: str = "paths.output_dir",
                fix: str | None = None):
    """Hold an exclusive lock on ``folder`` while a run writes into it: the open lock file
    (``<folder>/.mrflight.lock``, empty), to be closed when the run ends; ``None``
    where the file system has no locks. The operating system releases the lock when its
    process dies, so a killed run never leaves the folder locked.

    :func:`output_folder` refuses a folder holding an earlier run's results, but two runs that
    start in the same folder at once (the same ``hydra.run.dir`` given twice, a job started
    again while it still runs, two jobs of an array started in the same microsecond) both find
    it empty: the second to lock it is refused here instead of both writing the same
    checkpoints, ``metrics.csv`` and ``metrics.json``. ``flock`` also locks across the hosts of
    an NFS mount where the mount has locking (Linux emulates it with NFS byte-range locks).

    Raises:
        ValueError: another process holds the lock (naming ``option`` and ``fix``).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here
        return None
    path = Path(folder).expanduser() / LOCK_FILE
    try:  # an empty file: only its lock matters, nothing is written into it
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None  # ENOLCK, EOPNOTSUPP ...: a file system without locks
        raise ValueError(f"{option}={Path(folder).expanduser()} is being written by another "
                         "run that started in the same folder and is still running: "
                         + (fix or f"give another {option}")) from None
    return os.fdopen(fd, "rb")


def is_mat_v73(path: str | os.PathLike) -> bool:
    """True when ``path`` is a MATLAB v7.3 (HDF5-based) file."""
    import h5py

    return bool(h5py.is_hdf5(path))


def _h5_read(obj, digest: Digest | None = None):
    """Read an HDF5 group into nested dicts; ``digest`` is fed every dataset (path, dtype,
    shape, bytes) in name order, the traversal :func:`save_mat` checksums."""
    import h5py

    if isinstance(obj, h5py.Dataset):
        data = obj[()]
        if digest is not None:
            raw = np.ascontiguousarray(data)
            digest.text(f"{obj.name}|{raw.dtype.descr}|{raw.shape}|").array(raw)
        if data.dtype.names and {"real", "imag"} <= set(data.dtype.names):
            data = data["real"] + 1j * data["imag"]
        if obj.attrs.get("MATLAB_class", b"") in (b"char",) and data.dtype.kind in "ui":
            return "".join(chr(c) for c in np.asarray(data).ravel())
        # MATLAB stores column-major: h5py sees the transpose
        return np.asarray(data).T if np.ndim(data) >= 2 else data
    return {k: _h5_read(obj[k], digest) for k in sorted(obj.keys()) if not k.startswith("#")}


def damaged_error(path: Path, e: BaseException, what: str = "file") -> ValueError:
    """The ``ValueError`` for a file whose reader failed on its structure (``e``)."""
    return ValueError(f"{path} is not a readable {what}: the file is truncated or damaged "
                      f"({type(e).__name__}: {e}); copy or export it again")


def load_mat(path: str | os.PathLike, squeeze: bool = True) -> dict:
    """Read a ``.mat`` file (v7 or v7.3) into a dict of numpy arrays / nested dicts (structs).

    A v7.3 file written by :func:`save_mat` is verified against its SHA-256 checksum.
    ``squeeze=False`` keeps the singleton axes of a v7 file's arrays (scipy drops them by
    default: a ``(X, Y, 1, T)`` series would read as ``(X, Y, T)``), as they are in MATLAB
    and in a v7.3 file.

    Raises:
        ValueError: if the file does not exist, is not a MATLAB file, is truncated or damaged
            (unreadable HDF5 structures), or does not match its checksum.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"MATLAB file {path} does not exist")
    import h5py

    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                stored = f.attrs.get(_CHECKSUM_ATTR)
                digest = Digest() if stored is not None else None
                out = {k: _h5_read(f[k], digest) for k in sorted(f.keys())
                       if not k.startswith("#")}
        except Exception as e:  # h5py raises OSError, KeyError, RuntimeError on damage
            raise damaged_error(path, e, "MATLAB file") from None
        if digest is not None:
            stored = stored.decode() if isinstance(stored, bytes) else str(stored)
            if digest.hexdigest() != stored:
                raise ValueError(f"the file is damaged: {path} does not match the SHA-256 "
                                 "checksum it was written with; copy or export it again")
        return out
    import scipy.io

    try:
        raw = scipy.io.loadmat(path, squeeze_me=squeeze, struct_as_record=False)
    except Exception as e:  # scipy raises several types for damaged files
        with open(path, "rb") as fh:
            head = fh.read(128)
        if head.startswith(b"MATLAB 7.3"):  # the HDF5 part is missing: cut short
            raise damaged_error(path, e, "MATLAB file") from None
        raise ValueError(f"{path} is not a readable MATLAB file (or it is truncated or "
                         f"damaged): {e}") from None
    return {k: _from_scipy(v) for k, v in raw.items() if not k.startswith("__")}


def _from_scipy(v):
    import scipy.io.matlab as sm

    if isinstance(v, np.ndarray) and v.dtype == object and v.size == 1:
        v = v.flat[0]  # unsqueezed: a struct (or cell) in a 1 x 1 array
    if isinstance(v, sm.mat_struct):
        return {f: _from_scipy(getattr(v, f)) for f in v._fieldnames}
    return v


def save_mat(path: str | os.PathLike, data: dict, v73: bool = False, *,
             replace: bool = True) -> None:
    """Write ``data`` (name -> array, str, or dict for a struct) as a ``.mat`` file, atomically.

    Args:
        path: destination.
        data: variables; nested dicts become MATLAB structs.
        v73: write the HDF5-based v7.3 format (needed above 2 GB), else v7 via scipy.
        replace: as in :func:`atomic_path`.
    """
    with atomic_path(path, replace=replace) as tmp:
        if not v73:
            import scipy.io

            scipy.io.savemat(tmp, data, do_compression=False, oned_as="column")
            return
        import h5py

        with h5py.File(tmp, "w", userblock_size=512) as f:
            _h5_write(f, data)
            f.flush()
            digest = Digest()
            for k in sorted(f.keys()):  # read back: the checksum covers the stored bytes
                _h5_read(f[k], digest)
            f.attrs[_CHECKSUM_ATTR] = digest.hexdigest()
        # MATLAB recognises v7.3 files by a text header in the 512-byte user block
        header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: mrflight HDF5 schema 1.00 ."
        with open(tmp, "r+b") as fh:
            # 116 bytes of text, 8 of subsystem offset, version 0x0200 and the endian mark 'IM'
            fh.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")


def _h5_write(group, data: dict) -> None:
    for k, v in data.items():
        if isinstance(v, dict):
            sub = group.create_group(k)
            sub.attrs["MATLAB_class"] = np.bytes_("struct")
            _h5_write(sub, v)
        elif isinstance(v, str):
            arr = np.array([ord(c) for c in v], dtype=np.uint16)[:, None]
            ds = group.create_dataset(k, data=arr)
            ds.attrs["MATLAB_class"] = np.bytes_("char")
            ds.attrs["MATLAB_int_decode"] = np.int32(2)
        else:
            arr = np.asarray(v)
            if arr.ndim == 1:
                arr = arr[:, None]  # column vector, as MATLAB would hold it
            if np.iscomplexobj(arr):
                cplx = np.empty(arr.T.shape, dtype=[("real", arr.real.dtype),
                                                    ("imag", arr.real.dtype)])
                cplx["real"], cplx["imag"] = arr.real.T, arr.imag.T
                ds = group.create_dataset(k, data=cplx)
            else:
                ds = group.create_dataset(k, data=arr.T)
            cls = {"f": "double" if arr.dtype == np.float64 else "single", "c": "double",
                   "i": "int64", "u": "uint64", "b": "logical"}.get(arr.dtype.kind, "double")
            if arr.dtype.kind == "c" and arr.real.dtype == np.float32:
                cls = "single"
            ds.attrs["MATLAB_class"] = np.bytes_(cls)
