"""Dictionary matching: exhaustive inner-product search and SVD-compressed matching.

The classic MRF reconstruction (Ma et al., Nature 2013): every measured fingerprint is compared
with every simulated dictionary atom and assigned the parameters of the atom with the largest
normalised inner product. The score of a block of signals against a block of atoms is one GEMM
(``signals @ atoms.T``) followed by an argmax, so matching runs at the speed of the matrix
multiply; signals and atoms are processed in blocks so the temporary score matrix stays bounded.

Two similarity measures:

* magnitude (default, the baseline of Oksuz et al. 2019): ``<|d|/||d||, |s|/||s||>``;
* complex (``complex_matching=True``): ``|<d, s>| / (||d|| ||s||)`` with complex atoms (the
  Hermitian inner product; insensitive to a global phase of the signal).

Real-valued signals are magnitudes: non-negative. A real signal with a negative value (e.g. the
real part of complex data) is refused (:func:`check_magnitude`) rather than matched as if it were
a magnitude, and complex matching needs complex signals.

With ``rank=k`` (or ``energy=e``) atoms and signals are first projected onto the leading ``k``
right singular vectors of the dictionary (McGivney et al. 2014) and matched there, which cuts the
cost by ``T / k``.

The search is exact in float64 at about the GEMM's cost: the GEMM's float32 scores give each
signal's best score up to a round-off bound ``eps``, every atom within ``eps`` of it is re-scored
in float64 (a few dozen of the dictionary's atoms), and the float64 best is returned.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch

from mrflight.physics._device import check_device
from mrflight.physics.checks import all_finite, count
from mrflight.physics.noise import row_norms, unit_rows

__all__ = ["DictionaryMatcher", "svd_basis", "float32_matmul", "check_magnitude",
           "NOT_A_MAGNITUDE"]

#: why a real series with negative values is refused, and what to pass instead
NOT_A_MAGNITUDE = (
    "it is not a magnitude image (a real-valued series is taken as the magnitude |x|, which is "
    "never negative: the real or imaginary part alone would be matched wrongly); pass the "
    "complex series (a complex .npy/.npz/.mat/.h5/NIfTI, or an .h5/.mat with real and imag "
    "parts) or its magnitude np.abs(x)")


def check_magnitude(minimum: float, what: str = "the signals") -> None:
    """Refuse real-valued data whose smallest value ``minimum`` is negative (not a magnitude).

    Raises:
        ValueError: ``minimum < 0``, with :data:`NOT_A_MAGNITUDE` as advice.
    """
    if minimum < 0:
        raise ValueError(f"negative values in {what} (minimum {minimum:.4g}): "
                         f"{NOT_A_MAGNITUDE}")

#: default bound on the bytes of one temporary score block (signals x atoms)
DEFAULT_BLOCK_BYTES = 256 * 2**20


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        arr = np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be an array or tensor: {e}") from None
    if arr.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got dtype object")
    return torch.from_numpy(np.ascontiguousarray(arr))


@contextlib.contextmanager
def float32_matmul(device, mode: str = "ieee"):
    """Run the block with float32 matrix products in ``mode`` on CUDA (``"ieee"``: full float32;
    ``"tf32"``: TF32 tensor cores), restoring the previous setting on exit. No-op elsewhere.

    The matcher uses ``"ieee"``: TF32 (on when a program called
    ``torch.set_float32_matmul_precision("high")`` or set
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``) rounds the inputs to 10-bit mantissas,
    score errors ~1e-4, far above the ~1e-7 gaps between neighbouring atoms of a fine grid, so the
    float64 re-scoring would need far more candidates (its error bound assumes full float32).
    """
    if torch.device(device).type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    # torch >= 2.9 has the new API; reading the legacy flag after it was used raises
    name = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"
    prev = getattr(m, name)
    setattr(m, name, mode if name == "fp32_precision" else mode == "tf32")
    try:
        yield
    finally:
        setattr(m, name, prev)


def svd_basis(atoms: torch.Tensor, rank: int | None = None, energy: float | None = None,
              chunk_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading right singular vectors of a dictionary, from the eigen-decomposition of ``A^H A``.

    The ``(T, T)`` Gram matrix is accumulated block by block in float64 (the blocks are multiplied
    in the atoms' precision), then diagonalised in float64: no full ``M x T`` SVD is formed.

    Args:
        atoms: ``(M, T)`` real or complex dictionary (typically L2-normalised rows).
        rank: number of singular vectors to keep (``1 <= rank <= T``).
        energy: alternatively, keep the smallest rank whose singular values squared sum to at
            least this fraction (0 < energy <= 1) of the total.
        chunk_size: atoms per block for the Gram accumulation.

    Returns:
        ``(basis, sv2)``: basis ``(T, k)`` with orthonormal columns (same dtype family and device as
        ``atoms``), and all squared singular values ``(T,)`` in descending order (float64).

    References:
        McGivney et al., SVD compression for magnetic resonance fingerprinting in the time
        domain, IEEE TMI 2014;33:2311 (doi:10.1109/TMI.2014.2337321).
    """
    m, t = atoms.shape
    acc_dtype = torch.complex128 if atoms.is_complex() else torch.float64
    gram = torch.zeros(t, t, dtype=acc_dtype, device=atoms.device)
    for s in range(0, m, chunk_size):
        blk = atoms[s: s + chunk_size]
        gram += (blk.mH @ blk).to(acc_dtype)
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals = evals.flip(0).clamp_min(0)
    evecs = evecs.flip(1)
    if energy is not None:
        if not (0 < energy <= 1):
            raise ValueError(f"energy must lie in (0, 1], got {energy}; e.g. energy=0.999")
        frac = torch.cumsum(evals, 0) / evals.sum().clamp_min(torch.finfo(torch.float64).tiny)
        rank = int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype,
                                                         device=frac.device) - 1e-12)) + 1
        rank = min(rank, t)
    if rank is None or not (1 <= rank <= t):
        raise ValueError(f"rank must be an integer in [1, {t}] (the fingerprint length), "
                         f"got {rank}")
    work = atoms.dtype
    return evecs[:, :rank].to(work), evals


def _check_inputs(a: torch.Tensor, p: torch.Tensor, dtype, complex_matching: bool, rank,
                  energy, max_candidates, chunk_size) -> torch.Tensor:
    """Check the matcher's arguments; returns ``params`` as ``(M, P)``."""
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"atoms must have shape (M, T) with M, T >= 1, got {tuple(a.shape)}")
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or p.shape[0] != a.shape[0]:
        raise ValueError(f"params must have shape (M, P) with M = {a.shape[0]} (one row per "
                         f"atom), got {tuple(p.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if complex_matching and not a.is_complex():
        raise ValueError("complex_matching=True needs complex atoms; pass the complex "
                         "dictionary or use magnitude matching")
    if rank is not None and energy is not None:
        raise ValueError("give either rank or energy, not both")
    count(max_candidates, "max_candidates", hint=" (atoms re-scored in float64 per signal and "
          "atom block), e.g. 1024")
    if chunk_size is not None:
        count(chunk_size, "chunk_size", hint=" (atoms per block) or None")
    return p


class DictionaryMatcher:
    """Match fingerprints against a dictionary by the largest normalised inner product.

    The normalised atoms are stored once, in ``dtype`` (real for magnitude matching, complex for
    complex matching), projected onto the SVD basis when ``rank``/``energy`` is given.
    Memory: the paper's grid (115k atoms x 1750 points) is 0.8 GB in float32.

    Args:
        atoms: dictionary fingerprints ``(M, T)``, numpy or torch, complex or real, at any scale.
        params: their parameters ``(M, P)``; T1 and T2 in ms first (more columns, e.g. B1, are
            carried along).
        rank: ``None`` for exhaustive matching, or an integer ``k >= 2`` to match in the
            rank-``k`` SVD basis of the dictionary (in one renormalised coordinate all atoms
            tie, so rank 1 is refused).
        energy: alternatively choose the rank as the smallest one retaining this fraction of the
            dictionary's energy (sum of squared singular values), e.g. ``0.999``.
        complex_matching: use ``|<d, s>|`` with complex normalised atoms instead of the inner
            product of magnitudes. Needs complex atoms.
        chunk_size: atoms per block (default: chosen so that one score block of signals x atoms
            stays within 256 MB). Results do not depend on it (except for signals that
            ``max_candidates`` warns about).
        device: where atoms live and matching runs (default: the atoms' device for a tensor,
            else CPU). CPU and CUDA are supported.
        dtype: real working precision, ``torch.float32`` (default) or ``torch.float64``.
        max_candidates: the most atoms per signal (and block of ``chunk_size`` atoms) re-scored
            in float64. Every atom whose GEMM score (in ``dtype``) lies within the GEMM's
            round-off bound ``eps`` of the signal's best GEMM score is re-scored in float64 and
            the best of them returned, which is the float64-best atom of the whole dictionary
            (neighbouring atoms of a fine grid differ by ~1e-7 in normalised inner product, e.g.
            T2 = 362 vs 364 ms on the paper's grid, about one float32 step near a score of 1,
            so dozens can tie or swap in float32). On the paper grid (magnitude, 5000 atoms,
            ``benchmarks/gpu_check.py`` on an H100): 51 per signal on average, 345 at most;
            complex matching keeps more. A signal with more than ``max_candidates`` keeps its
            best by GEMM score and the call warns that those signals may not be exact. On CUDA
            the GEMM runs in full float32 (TF32 off for the call, see :func:`float32_matmul`)
            and exact float64 ties go to the lowest atom index, so the GPU returns the CPU's
            answers.
        scan: how compressed matching finds its candidates: ``"auto"`` (the fused Triton
            kernels of :mod:`mrflight.match_kernels` on CUDA where Triton works: the scores are
            computed tile by tile in 3xTF32 and never stored, and their round-off bound widens
            the candidate set; otherwise the GEMM blocks), ``"gemm"`` (always the GEMM blocks)
            or ``"kernels"`` (always the kernels: their torch reference on a CPU, for tests).
            The kernels apply no ``max_candidates`` cap. Exhaustive matching always scans with
            the GEMM.

    Attributes:
        rank: the rank used (``None`` for exhaustive).
        basis: ``(T, rank)`` SVD basis or ``None``.
        singular_values2: squared singular values of the dictionary (``(T,)``) when a basis was
            computed, else ``None``.
        n_atoms, length: ``M`` and ``T``.
        last_candidates: ``(N,)`` atoms re-scored in float64 per signal in the last call.

    Raises:
        ValueError: empty or mismatched dictionary, non-finite atoms or parameters, a bad rank
            (rank 1, given or chosen by ``energy``, for more than one atom).

    References:
        Ma et al., Magnetic resonance fingerprinting, Nature 2013;495:187 (matching);
        McGivney et al., IEEE TMI 2014;33:2311 (SVD compression).
    """

    def __init__(self, atoms, params, rank: int | None = None, *, energy: float | None = None,
                 complex_matching: bool = False, chunk_size: int | None = None, device=None,
                 dtype: torch.dtype = torch.float32, max_candidates: int = 1024,
                 scan: str = "auto") -> None:
        a = _as_tensor(atoms, "atoms")
        if scan not in ("auto", "gemm", "kernels"):
            raise ValueError(f"scan must be 'auto', 'gemm' or 'kernels', got {scan!r}")
        self.scan = scan
        self._kernels_failed = False
        p = _check_inputs(a, _as_tensor(params, "params"), dtype, complex_matching, rank,
                          energy, max_candidates, chunk_size)
        self.max_candidates = int(max_candidates)
        self.last_candidates = None
        if device is None:
            device = a.device if isinstance(atoms, torch.Tensor) else torch.device("cpu")
        self.device = check_device(device)
        self.dtype = dtype
        self.complex_matching = bool(complex_matching)
        self._cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.n_atoms, self.length = int(a.shape[0]), int(a.shape[1])
        a = a.to(self.device)
        if not all_finite(a):
            raise ValueError("atoms contain NaN or Inf values; regenerate the dictionary")
        if not a.is_complex() and a.numel():  # real atoms are matched as magnitudes
            check_magnitude(float(a.min()), "the real-valued atoms")
        pf = p.to(self.device, torch.float64 if p.dtype == torch.float64 else torch.float32)
        if not bool(torch.isfinite(pf).all()):
            raise ValueError("params contain NaN or Inf values")
        self.params = pf
        self._blk = chunk_size
        store = self._normalised(a)
        self.rank = None
        self.basis = None
        self.singular_values2 = None
        if rank is not None or energy is not None:
            if rank is not None and (not isinstance(rank, (int, np.integer)) or isinstance(
                    rank, bool) or not 1 <= rank <= self.length):
                raise ValueError(f"rank must be an integer in [1, {self.length}] (the fingerprint "
                                 f"length) or None for exhaustive matching, got {rank!r}")
            store = self._compressed(store, rank, energy)
        self.atoms = store  # (M, T) or (M, rank), unit rows (zero rows for all-zero atoms)
        self._inv_norms = self._inverse_norms()

    _STEP = 65536  # atoms per block of the normalisation and the projection

    def _normalised(self, a: torch.Tensor) -> torch.Tensor:
        """Unit-norm atoms in the working dtype (norms kept in ``atom_norms``), normalised block
        by block in the atoms' own precision, at any scale (:func:`unit_rows`; all-zero atoms
        stay zero rows): never a second full-size copy in higher precision."""
        work = self._cdtype if self.complex_matching else self.dtype
        norms = torch.empty(self.n_atoms, dtype=torch.float64, device=self.device)
        store = torch.empty(self.n_atoms, self.length, dtype=work, device=self.device)
        for s in range(0, self.n_atoms, self._STEP):
            blk = a[s: s + self._STEP]
            if not self.complex_matching and blk.is_complex():
                blk = blk.abs()
            unit, n = unit_rows(blk)
            unit[n == 0] = 0
            store[s: s + self._STEP], norms[s: s + self._STEP] = unit, n
            del blk, unit  # not alive beside the next block's abs (1.3 GiB at its peak)
        if not bool((norms > 0).any()):
            raise ValueError("every atom is all-zero: the dictionary cannot match anything")
        self.atom_norms = norms
        return store

    def _compressed(self, store: torch.Tensor, rank, energy) -> torch.Tensor:
        """The atoms' unit-norm coefficients in their SVD basis (``basis``, ``rank``)."""
        basis, sv2 = svd_basis(store, rank=None if rank is None else int(rank), energy=energy)
        if basis.shape[1] == 1 and self.n_atoms > 1:
            # one coordinate, renormalised: every atom is the same point (magnitude) or differs
            # only by a phase (complex), so every score ties and atom 0 would win for all
            what = "rank=1" if energy is None else f"energy={energy} chose rank 1 and"
            raise ValueError(f"{what} cannot tell atoms apart (each normalised atom has one "
                             "coordinate, of unit size): use rank >= 2, a higher energy, or "
                             "exhaustive matching")
        self.basis, self.singular_values2 = basis, sv2
        self.rank = int(basis.shape[1])
        coeffs = torch.empty(self.n_atoms, self.rank, dtype=store.dtype, device=self.device)
        self._proj_norms = torch.empty(self.n_atoms, dtype=self.dtype, device=self.device)
        for s in range(0, self.n_atoms, self._STEP):
            c = store[s: s + self._STEP] @ basis.conj()
            cn = torch.linalg.vector_norm(c, dim=1)
            self._proj_norms[s: s + self._STEP] = cn
            coeffs[s: s + self._STEP] = c / torch.where(cn > 0, cn, torch.ones_like(cn))[:, None]
        return coeffs

    def _inverse_norms(self) -> torch.Tensor:
        """``1 / ||atom||`` of every stored atom in float64 (0 for a zero atom)."""
        hi = torch.complex128 if self.atoms.is_complex() else torch.float64
        inv = torch.empty(self.n_atoms, dtype=torch.float64, device=self.device)
        for s in range(0, self.n_atoms, self._STEP):
            n = row_norms(self.atoms[s: s + self._STEP].to(hi))
            inv[s: s + self._STEP] = torch.where(n > 0, 1 / n, 0.0)
        return inv

    @classmethod
    def from_dictionary(cls, dictionary, **kwargs) -> DictionaryMatcher:
        """Build from an object with ``.atoms (M, T)`` and ``.params (M, P)`` (a Dictionary)."""
        return cls(dictionary.atoms, dictionary.params, **kwargs)

    def __repr__(self) -> str:
        mode = "complex" if self.complex_matching else "magnitude"
        kind = "exhaustive" if self.rank is None else f"rank {self.rank}"
        return (f"DictionaryMatcher({self.n_atoms} atoms x {self.length} points, {kind}, {mode}, "
                f"{self.dtype}, {self.device})")

    # ------------------------------------------------------------------ helpers
    def _prepare_signals(self, signals) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Signals in the working dtype, each divided by its peak (the power of two at or above
        its largest real or imaginary part: exact, and no scale under- or overflows), their
        norms after that division, and the peaks (float64)."""
        s = _as_tensor(signals, "signals")
        if s.ndim == 1:
            s = s[None]
        if s.ndim != 2:
            raise ValueError(f"signals must have shape (N, T), got {tuple(s.shape)}")
        if s.shape[1] != self.length:
            raise ValueError(f"signals have {s.shape[1]} time points but the dictionary atoms "
                             f"have {self.length}; simulate both with the same sequence")
        if not (s.is_complex() or s.is_floating_point()):
            s = s.to(self.dtype)
        if not s.is_complex() and self.complex_matching:
            raise ValueError("complex_matching=True needs complex signals, got real ones: "
                             "pass the complex series, or match magnitudes with "
                             "complex_matching=False")
        s = s.to(self.device)
        real_input = not s.is_complex()
        if not self.complex_matching and s.is_complex():
            s = s.abs()
        # on the real view (re, im pairs): torch's complex abs, division and norm cost several
        # times more on the CPU
        r = torch.view_as_real(s.resolve_conj()).flatten(1) if s.is_complex() else s
        exp = torch.zeros(s.shape[0], dtype=torch.int32, device=self.device)
        peak = torch.zeros(s.shape[0], dtype=torch.float64, device=self.device)
        if r.shape[1]:
            lo, hi = torch.aminmax(r, dim=1)  # NaN propagates: both finite iff every value is
            if not (all_finite(lo) and all_finite(hi)):
                raise ValueError("signals contain NaN or Inf values; mask those voxels out first")
            if real_input and lo.numel():
                check_magnitude(float(lo.min()), "the real-valued signals")
            # the scale of a signal: the power of two at or above its largest |re| or |im|, so
            # that the scaling is exact and the match is that of the signal as given
            top = torch.maximum(hi, -lo)
            most = int(math.log2(torch.finfo(r.dtype).max))  # 2**-exp stays a number
            exp = torch.where(top > 0, torch.frexp(top).exponent, 0).clamp(-most, most)
            peak = torch.where(top > 0, torch.ldexp(torch.ones_like(peak), exp), peak)
        r = r * torch.ldexp(torch.ones_like(exp, dtype=r.dtype), -exp)[:, None]
        s = (torch.view_as_complex(r.unflatten(1, (-1, 2))) if s.is_complex() else r).to(
            self._cdtype if self.complex_matching else self.dtype)
        return s, row_norms(s), peak

    def _blocks(self, n_signals: int) -> tuple[int, int]:
        item = torch.empty((), dtype=self.atoms.dtype).element_size()
        # larger blocks on a GPU: fewer launches and candidate merges
        budget = (DEFAULT_BLOCK_BYTES * (4 if self.device.type == "cuda" else 1)) // item
        atom_blk = self._blk or max(1, min(self.n_atoms, budget // min(max(n_signals, 1), 1024)))
        sig_blk = max(1, min(n_signals, budget // atom_blk))
        return sig_blk, atom_blk

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def match_indices(self, signals) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Index of the best atom for every signal.

        Args:
            signals: ``(N, T)`` (or ``(T,)``) fingerprints, complex or real, at any scale.

        Returns:
            ``(index, score, signal_norm)``: ``index`` ``(N,)`` int64 (-1 for all-zero signals),
            ``score`` ``(N,)`` the inner product of the normalised atom with the *unnormalised*
            signal (magnitude, or complex for complex matching), and ``signal_norm`` ``(N,)``
            float64 (computed without under- or overflow at any scale).
        """
        s, snorm, peak = self._prepare_signals(signals)
        n = s.shape[0]
        if self.basis is not None:
            s = s @ self.basis.conj()
        sig_blk, atom_blk = self._blocks(n)
        best = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        best_raw = torch.zeros(n, dtype=s.dtype, device=self.device)
        counts = torch.zeros(n, dtype=torch.int64, device=self.device)
        inexact = torch.zeros(n, dtype=torch.bool, device=self.device)
        bufs = self._buffers(min(n, sig_blk) * min(self.n_atoms, atom_blk), s.dtype)
        if self._use_kernels():
            sig_blk = min(max(n, 1), self._KERNEL_SIGNALS)
        for i in range(0, n, sig_blk):
            si = s[i: i + sig_blk]
            pairs = self._kernel_candidates(si) if self._use_kernels() else None
            if pairs is not None:
                rows, cols = pairs
            else:
                with float32_matmul(self.device, "ieee"):
                    rows, cols, inexact[i: i + len(si)] = self._candidates(si, atom_blk, bufs)
            best[i: i + len(si)], best_raw[i: i + len(si)] = self._rescore(si, rows, cols)
            counts[i: i + len(si)] = torch.bincount(rows, minlength=len(si))
        self.last_candidates = counts
        if bool(inexact.any()):
            warnings.warn(
                f"{int(inexact.sum())} signal(s) had more than max_candidates="
                f"{self.max_candidates} atoms (in one block of {atom_blk}) within the float32 "
                "error bound of their best score: each got the float64 best of its "
                f"{self.max_candidates} best float32 scores, which may not be the exact float64 "
                "best (raise max_candidates or use dtype=torch.float64)", RuntimeWarning,
                stacklevel=3)
        zero = peak == 0
        if bool(zero.any()):
            warnings.warn(f"{int(zero.sum())} all-zero signal(s): their parameters are NaN",
                          RuntimeWarning, stacklevel=3)
        # back to the signals' own scale (the scores are linear in the signal)
        return best, best_raw * peak.to(best_raw.real.dtype), snorm.to(torch.float64) * peak

    _KERNEL_SIGNALS = 65536  # signals per call of the fused candidate kernels

    def _use_kernels(self) -> bool:
        """Whether compressed matching finds its candidates with the fused Triton kernels
        (:mod:`mrflight.match_kernels`): ``scan="auto"`` on CUDA where Triton works, or
        ``scan="kernels"``."""
        if self.basis is None or self.scan == "gemm" or self._kernels_failed:
            return False
        if self.scan == "kernels":
            return True
        from mrflight import match_kernels

        return self.device.type == "cuda" and match_kernels.triton_available(self.device)

    def _kernel_candidates(self, si):
        """Candidate pairs from the fused kernels (scores in 3xTF32, never stored; the kernels'
        own round-off bound added to ``eps``), or ``None`` after a kernel failure, which warns
        once and leaves this matcher on the GEMM scan."""
        from mrflight import match_kernels
        from mrflight.physics._triton_glue import guarded_kernel

        eps = float(self._tolerance(si).max()) if si.shape[0] else 0.0
        # first guess of the pairs: 128 per signal (72 on average for the paper grid at rank
        # 25, measured on an H100), so that the candidate pass seldom runs twice
        pairs = guarded_kernel(
            lambda: match_kernels.candidate_pairs(si, self.atoms, eps,
                                                  complex_=self.complex_matching,
                                                  precision="tf32x3",
                                                  capacity=128 * si.shape[0] + 1024),
            "the fused matching kernels", "using the GEMM scan")
        if pairs is None:
            self._kernels_failed = True
            return None
        return pairs.rows, pairs.cols

    def _buffers(self, size: int, dtype) -> dict:
        """Score and magnitude buffers reused for every block: a fresh 256 MB allocation
        per block costs page faults comparable to the GEMM itself on CPU."""
        dev = self.device
        real = torch.empty((), dtype=dtype).real.dtype
        score = torch.empty(size, dtype=dtype, device=dev)
        mag = torch.empty(size, dtype=real, device=dev) if dtype.is_complex else score
        return {"score": score, "mag": mag}

    def _tolerance(self, s: torch.Tensor) -> torch.Tensor:
        """``eps`` per signal: twice a bound on |GEMM score - float64 score| of one atom.

        The GEMM's dot of length ``d`` (``T``, or the rank; doubled for complex data) rounds
        ``d`` partial sums, each at most ``||s||`` (the atoms have unit norm), by a relative
        ``|delta| <= u``, the unit round-off (``2^-24`` in float32): worst case ``d u ||s||``.
        With independent mean-zero roundings (Higham & Mary, SIAM J Sci Comput 2019;41:A2815)
        it exceeds ``lambda sqrt(d) u ||s||`` with probability at most ``2 exp(-lambda^2 / 2)``
        (Hoeffding's inequality). The atom's float32 normalisation, ``|.|`` and the
        few roundings of a short dot (the SVD's, whose first coefficient carries most of the
        score) add a few ``u ||s||``, taken as ``48 u ||s||``. One atom's error is taken as
        ``(4 sqrt(d) + 48) u ||s||`` (``lambda >= 4.8`` for ``d <= 3500``, ``>= 10`` for
        ``d <= 50``), doubled as both the float64-best atom and the GEMM's maximum may be off:
        ``eps = 8 (sqrt(d) + 12) u ||s||``. ``tests/test_matching.py`` checks that the largest
        measured error stays 5x below ``eps`` (magnitude, complex and SVD matching).
        """
        d = self.atoms.shape[1] * (2 if self.atoms.is_complex() else 1)
        u = torch.finfo(self.dtype).eps / 2
        return 8 * (math.sqrt(d) + 12) * u * torch.linalg.vector_norm(s, dim=1)

    _GROUP = 64  # atoms per group of the coarse maximum (as fast as a row maximum on CPU)
    _PAIRS = 2**20  # hit groups expanded at a time (bounds the pairs' memory)

    def _candidates(self, si, atom_blk, bufs):
        """Every (signal, atom) pair whose GEMM score lies within ``eps`` (:meth:`_tolerance`)
        of the signal's largest GEMM score, at most ``max_candidates`` per signal.

        Block by block of atoms: the maximum of every group of ``_GROUP`` consecutive scores
        (one pass over the block; its row maximum updates the running maximum per signal), the
        groups whose maximum reaches the running maximum less ``eps``, their pairs at or above
        it, and the pairs of earlier blocks that fell below it dropped.

        Returns:
            ``(rows, cols, inexact)``: the pairs' signal rows and atom indices, and per signal
            whether :meth:`_cap` dropped a pair that still qualifies.
        """
        n, g = si.shape[0], self._GROUP
        eps = self._tolerance(si)
        live = eps > 0  # all-zero signals get no candidates
        run = torch.full((n,), -math.inf, dtype=eps.dtype, device=self.device)
        dropped = run.clone()  # the best GEMM score of a pair dropped by the cap
        rows = cols = torch.empty(0, dtype=torch.int64, device=self.device)
        vals = torch.empty(0, dtype=eps.dtype, device=self.device)
        for j in range(0, self.n_atoms, atom_blk):
            mag = self._block_scores(si, j, atom_blk, bufs)
            w = mag.shape[1]
            gmax = mag[:, : w - w % g].view(n, -1, g).amax(2)
            if w % g:
                gmax = torch.cat([gmax, mag[:, w - w % g:].amax(1, keepdim=True)], 1)
            torch.maximum(run, gmax.amax(1), out=run)
            thr = torch.where(live, run - eps, math.inf)
            keep = vals >= thr[rows]
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
            gr, gc = (gmax >= thr[:, None]).nonzero(as_tuple=True)
            for k in range(0, len(gr), self._PAIRS):
                idx = (gc[k: k + self._PAIRS, None] * g
                       + torch.arange(g, device=self.device)).clamp_max(w - 1)
                r = gr[k: k + self._PAIRS, None].expand_as(idx)
                v = mag[r, idx]
                hit = v >= thr[r]  # a clamped tail index repeats the last atom: drop repeats
                hit[:, 1:] &= idx[:, 1:] != idx[:, :-1]
                rows, cols, vals = self._cap(torch.cat([rows, r[hit]]),
                                             torch.cat([cols, idx[hit] + j]),
                                             torch.cat([vals, v[hit]]), n, dropped)
        return rows, cols, dropped >= thr

    def _block_scores(self, si, j, atom_blk, bufs) -> torch.Tensor:
        """GEMM scores (magnitudes) of the signals ``si`` against atoms ``j : j + atom_blk``."""
        blk = self.atoms[j: j + atom_blk]
        size = si.shape[0] * blk.shape[0]
        score = bufs["score"][:size].view(si.shape[0], blk.shape[0])
        # <a, s> = conj(a) . s  ->  s @ a^H
        torch.matmul(si, blk.mH if self.complex_matching else blk.T, out=score)
        if not score.is_complex():
            return score
        mag = bufs["mag"][:size].view(score.shape)
        if score.device.type != "cpu":
            return torch.abs(score, out=mag)
        # on the CPU sqrt(re^2 + im^2) of the real view: 3x faster than torch's complex abs
        # (within an ulp of it, as the tolerance allows: 0 in 16 M scores measured)
        pairs = torch.view_as_real(score)
        re, im = pairs[..., 0], pairs[..., 1]
        return torch.mul(re, re, out=mag).addcmul_(im, im).sqrt_()

    def _cap(self, rows, cols, vals, n, dropped):
        """Keep at most ``max_candidates`` pairs per signal: a signal with more keeps its best
        by GEMM score (ties to the lowest atom index) and records the best score it dropped in
        ``dropped`` (in place)."""
        k = self.max_candidates
        count = torch.bincount(rows, minlength=n)
        if not bool((count > k).any()):
            return rows, cols, vals
        order = torch.sort(cols, stable=True).indices  # lexicographic: row, -score, atom
        order = order[torch.sort(vals[order], descending=True, stable=True).indices]
        order = order[torch.sort(rows[order], stable=True).indices]
        rank = torch.arange(len(rows), device=self.device) - (count.cumsum(0) - count)[rows[order]]
        out = order[rank >= k]
        dropped.scatter_reduce_(0, rows[out], vals[out], "amax")
        order = order[rank < k]
        return rows[order], cols[order], vals[order]

    def _rescore(self, si, rows, cols):
        """The best candidate of every signal by its float64 score (exact ties to the lowest
        atom index, so every device picks the same atom): ``(index, raw score)``, index -1 for a
        signal without candidates. The products of float32 values are exact in float64 and
        each stored atom is renormalised in float64 (``_inv_norms``): its float32 norm is off
        by ~1e-7, as much as the gap between grid neighbours."""
        from mrflight import match_kernels

        n = si.shape[0]
        sc = match_kernels.pair_scores(si, self.atoms, rows, cols)
        sc *= self._inv_norms[cols]
        mag = sc.abs() if sc.is_complex() else sc
        top = torch.full((n,), -math.inf, dtype=torch.float64, device=self.device)
        top.scatter_reduce_(0, rows, mag, "amax")
        on_top = mag == top[rows]
        best = torch.full((n,), self.n_atoms, dtype=torch.int64, device=self.device)
        best.scatter_reduce_(0, rows[on_top], cols[on_top], "amin")
        pick = on_top & (cols == best[rows])
        raw = torch.zeros(n, dtype=si.dtype, device=self.device)
        raw[rows[pick]] = sc[pick].to(si.dtype)
        return torch.where(best < self.n_atoms, best, -1), raw

    @torch.no_grad()
    def match(self, signals, return_m0: bool = False):
        """Parameters of the best-matching atom for every signal.

        Args:
            signals: ``(N, T)`` (or ``(T,)``) fingerprints, complex, or real and non-negative
                (a magnitude), at any scale.
            return_m0: also return the proton-density scale ``M0``: the least-squares factor with
                ``signal ~ M0 * atom`` (``<atom, signal> / ||atom||^2``, in the units of the
                signal per unit of the atom; real for magnitude matching, complex with the
                signal's phase for complex matching).

        Returns:
            ``(N, P)`` tensor of parameters (T1, T2 in ms first) on the matcher's device; NaN rows
            for all-zero signals (with a warning). With ``return_m0``, ``(params, m0)`` with
            ``m0`` of shape ``(N,)``.

        Raises:
            ValueError: signals of the wrong length, not 1-D/2-D, with NaN/Inf values, real
                with negative values (not a magnitude), or real with ``complex_matching``.
        """
        idx, raw, _ = self.match_indices(signals)
        ok = idx >= 0
        out = self.params[idx.clamp_min(0)].clone()
        out[~ok] = float("nan")
        if not return_m0:
            return out
        # raw = <a/||a||, s> in the (possibly compressed) space; M0 = <a, s>/||a||^2
        safe = idx.clamp_min(0)
        norms = self.atom_norms[safe].to(self.dtype)
        if self.basis is not None:
            # compressed atoms were renormalised: undo with the norm of their projection
            raw = raw / self._proj_norms[safe].clamp_min(torch.finfo(self.dtype).tiny)
        m0 = raw / norms.clamp_min(torch.finfo(self.dtype).tiny)
        m0 = torch.where(ok, m0, torch.full_like(m0, float("nan")))
        return out, m0
