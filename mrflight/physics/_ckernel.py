"""Build and call the fused C kernel of the real-arithmetic EPG (``epg_kernel.c``).

The kernel is compiled once per machine with the system C compiler (``cc``/``gcc``, POSIX threads,
``-march=native``) into ``kernels/`` of :func:`mrflight.physics._cache.cache_root`
(``$MRFLIGHT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mrflight``, else ``~/.cache/mrflight``),
written atomically, and loaded with ctypes; where that folder cannot be written (a read-only home
directory), into a private per-user folder of the system's temporary directory instead, with a
warning naming ``MRFLIGHT_CACHE_DIR`` (:func:`build_path`). ``CC`` may carry arguments
(``CC="ccache gcc"``). The file name is a hash of the sources, the
architecture and the CPU's instruction-set features (:func:`cpu_features`), so a cache directory
shared by machines with different CPUs (a cluster's home directory) never hands one CPU a binary
built for instructions it lacks. Where no compiler is found, or ``MRFLIGHT_NO_KERNEL=1`` is set,
:func:`kernel` returns ``None`` and the simulator falls back to its pure-torch path (same
results).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from mrflight.physics._cache import cache_root

_SRC = Path(str(resources.files("mrflight.physics") / "epg_kernel.c"))
_SRC_JAC = Path(str(resources.files("mrflight.physics") / "epg_jac_kernel.c"))
_SRC_THREADS = Path(str(resources.files("mrflight.physics") / "epg_threads.h"))
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet


def cache_dir() -> Path:
    return cache_root() / "kernels"


def _compiler() -> list[str] | None:
    """The compiler command: ``$CC`` split like a shell (``ccache gcc``), else ``cc``/``gcc``."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        try:
            return shlex.split(cc)
        except ValueError as e:  # an unclosed quote: named like a missing compiler
            raise RuntimeError(f"CC={cc!r} is not a command ({e}): set CC to a compiler, "
                               "quoted as in a shell, or unset it to use cc/gcc on PATH") from None
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def private_tmp_dir() -> Path:
    """``<tmp>/mrflight-<uid>/kernels``, created mode 700; a folder there that another user owns
    or others may write is refused (``OSError``): a library planted in it would be loaded."""
    top = Path(tempfile.gettempdir()) / f"mrflight-{os.getuid()}"
    top.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(top)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{top} is not a private folder of this user (a link, another owner, or "
                      "writable by others); remove it or set MRFLIGHT_CACHE_DIR")
    folder = top / "kernels"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def build_path() -> Path:
    """:func:`kernel_path` when the kernel is there or its folder can be written, else the same
    file name in :func:`private_tmp_dir` (with a warning naming ``MRFLIGHT_CACHE_DIR``)."""
    path = kernel_path()
    if path.exists() or _writable(path.parent):
        return path
    alt = private_tmp_dir() / path.name
    warnings.warn(f"mrflight: {path.parent} cannot be written; the fused EPG kernel is kept in "
                  f"{alt.parent} instead (set MRFLIGHT_CACHE_DIR to a writable folder to keep it "
                  "across reboots)", RuntimeWarning, stacklevel=4)
    return alt


def cpu_features() -> str:
    """The instruction-set features ``-march=native`` compiles for, as one string.

    Linux: the ``flags`` (x86) or ``Features`` (ARM) line of ``/proc/cpuinfo``. Elsewhere, the
    compiler's own expansion of ``-march=native`` (``cc -march=native -Q --help=target``), else
    the processor name.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    try:
        cc = _compiler()
    except RuntimeError:
        cc = None
    if cc is not None:
        try:
            r = subprocess.run(cc + ["-march=native", "-Q", "--help=target"], capture_output=True,
                               text=True, timeout=60)
            if r.returncode == 0 and r.stdout:
                return r.stdout
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def kernel_path() -> Path:
    """Where the kernel library for these sources and this CPU is (or will be) cached."""
    tag = hashlib.sha256(_SRC.read_bytes() + _SRC_JAC.read_bytes() + _SRC_THREADS.read_bytes()
                         + os.uname().machine.encode()
                         + b"\0" + cpu_features().encode()).hexdigest()[:16]
    return cache_dir() / f"epg_{tag}.so"


def _compile(dest: Path) -> None:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc/gcc on PATH): install one (e.g. gcc) or "
                           "name it in CC")
    if shutil.which(cc[0]) is None:
        raise RuntimeError(f"the C compiler {cc[0]!r} (from CC) cannot be run: set CC to an "
                           "installed compiler, or unset it to use cc/gcc on PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=_BUILD_PREFIX, dir=dest.parent) as tmp:
        objs = []
        variants = [("float", 16, "epg_fisp_f32"), ("double", 8, "epg_fisp_f64")]
        base = cc + ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-std=c11", "-pthread"]
        for omp in (["-fopenmp-simd"], []):  # OpenMP SIMD hints when the compiler has them
            try:
                objs = []
                for real, lanes, fn in variants:
                    obj = os.path.join(tmp, f"{fn}.o")
                    subprocess.run(
                        base + omp + [f"-DREAL={real}", f"-DLANES={lanes}", f"-DFN={fn}",
                                      "-c", str(_SRC), "-o", obj],
                        check=True, capture_output=True, text=True,
                    )
                    objs.append(obj)
                for b1, fn in ((0, "epg_fisp_jac_f64"), (1, "epg_fisp_jac_b1_f64")):
                    obj = os.path.join(tmp, f"{fn}.o")
                    subprocess.run(base + omp + [f"-DWITH_B1={b1}", f"-DJFN={fn}", "-c",
                                                 str(_SRC_JAC), "-o", obj],
                                   check=True, capture_output=True, text=True)
                    objs.append(obj)
                so_tmp = os.path.join(tmp, "k.so")
                subprocess.run(cc + ["-shared", "-pthread"] + objs + ["-o", so_tmp, "-lm"],
                               check=True, capture_output=True, text=True)
                _publish(so_tmp, dest)
                return
            except subprocess.CalledProcessError as e:
                last = e.stderr
        raise RuntimeError(f"compiling {_SRC.name} failed:\n{last}")


#: the build folders of :func:`_compile` (earlier versions: ``tmp...``)
_BUILD_PREFIX = ".build."


def _remove_killed_builds(folder: Path, max_age_s: float = 3600.0) -> None:
    """Remove the build folders a killed compile left (untouched for ``max_age_s``: a compile
    takes seconds, and one running on another host sharing the folder is left alone)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for e in entries:
        if not e.name.startswith((_BUILD_PREFIX, "tmp")) or not e.is_dir(follow_symlinks=False):
            continue
        try:
            if now - e.stat(follow_symlinks=False).st_mtime > max_age_s:
                shutil.rmtree(e.path)
        except OSError:
            continue


def _publish(built: str, dest: Path) -> None:
    """Move the finished library to ``dest`` unless another process put one there meanwhile.

    Processes that start together (a joblib multirun, the jobs of an array on a shared home
    directory) all compile; the first library to arrive is kept, as the others may have
    loaded it already: replacing a mapped library on a network file system can leave its
    pages unreadable on the other hosts (stale file handle, SIGBUS). The check and the move
    are one step (a hard link), so a reader never sees a half-written library either.
    """
    try:
        os.link(built, dest)
    except FileExistsError:
        pass  # built the same sources for the same CPU: theirs is as good
    except OSError:  # no hard links on this file system: rename, atomically
        if not dest.exists():
            os.replace(built, dest)


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, compiling it on first use; ``None`` when unavailable."""
    global _lib
    if _lib is not False:
        return _lib  # type: ignore[return-value]
    with _lock:
        if _lib is not False:
            return _lib  # type: ignore[return-value]
        if os.environ.get("MRFLIGHT_NO_KERNEL", "") not in ("", "0"):
            _lib = None
            return None
        try:
            path = build_path()
            _remove_killed_builds(path.parent)
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
        except (OSError, RuntimeError) as e:
            warnings.warn(f"mrflight: the fused EPG kernel is unavailable ({e}); using the "
                          "slower pure-torch path (MRFLIGHT_NO_KERNEL=1 silences this)",
                          RuntimeWarning, stacklevel=3)
            _lib = None
            return None
        d, i64 = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_longlong)
        for fn, real in (("epg_fisp_f32", ctypes.c_float), ("epg_fisp_f64", ctypes.c_double)):
            f = getattr(lib, fn)
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_int, ctypes.c_int, d, d, d, d, d, d, d, i64,
                          ctypes.POINTER(real), ctypes.c_int]
        for fn in ("epg_fisp_jac_f64", "epg_fisp_jac_b1_f64"):
            f = getattr(lib, fn)
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_int, ctypes.c_int] + [d] * 8 + [i64] + [d] * 4 + [ctypes.c_int]
        _lib = lib
        return lib


def run(alpha, sgn, tr, r1, r2, b1, z0, kst, out: np.ndarray, nthreads: int) -> None:
    """Call the kernel on contiguous numpy arrays; ``out`` (n, T) float32/float64 is filled."""
    lib = kernel()
    assert lib is not None
    n, T = out.shape
    f = lib.epg_fisp_f32 if out.dtype == np.float32 else lib.epg_fisp_f64
    real = ctypes.c_float if out.dtype == np.float32 else ctypes.c_double

    def dp(x):
        return np.ascontiguousarray(x, dtype=np.float64).ctypes.data_as(
            ctypes.POINTER(ctypes.c_double))

    keep = [np.ascontiguousarray(x, dtype=np.float64) for x in (alpha, sgn, tr, r1, r2, b1, z0)]
    kk = np.ascontiguousarray(kst, dtype=np.int64)
    rc = f(n, T, *[dp(x) for x in keep], kk.ctypes.data_as(ctypes.POINTER(ctypes.c_longlong)),
           out.ctypes.data_as(ctypes.POINTER(real)), int(nthreads))
    if rc != 0:
        raise MemoryError("the EPG kernel could not allocate its state buffers")


def run_jac(alpha, sgn, tr, r1, r2, b1, z0, dz0, kst, out, d1, d2, nthreads: int,
            db: np.ndarray | None = None) -> None:
    """Call the value-and-derivative kernel; ``out``, ``d1``, ``d2`` (n, T) float64 are filled
    with the signal and its derivatives by T1 and T2, and ``db`` (when given) with d/dB1."""
    lib = kernel()
    assert lib is not None
    n, T = out.shape
    ptr = ctypes.POINTER(ctypes.c_double)
    keep = [np.ascontiguousarray(x, dtype=np.float64)
            for x in (alpha, sgn, tr, r1, r2, b1, z0, dz0)]
    kk = np.ascontiguousarray(kst, dtype=np.int64)
    for a in (out, d1, d2) + (() if db is None else (db,)):
        assert a.dtype == np.float64 and a.flags.c_contiguous and a.shape == (n, T)
    f = lib.epg_fisp_jac_f64 if db is None else lib.epg_fisp_jac_b1_f64
    rc = f(n, T, *[x.ctypes.data_as(ptr) for x in keep],
                              kk.ctypes.data_as(ctypes.POINTER(ctypes.c_longlong)),
                              out.ctypes.data_as(ptr), d1.ctypes.data_as(ptr),
                              d2.ctypes.data_as(ptr),
                              None if db is None else db.ctypes.data_as(ptr), int(nthreads))
    if rc != 0:
        raise MemoryError("the EPG kernel could not allocate its state buffers")
