"""Voxel reconstructors: ``(N, T)`` fingerprints -> T1, T2 (ms)[, B1] and M0.

:class:`MatchingReconstructor` (dictionary matching; M0 is the matcher's least-squares scale of
the best atom), :class:`NetworkReconstructor` (a trained regressor's ``predict_parameters``;
M0 is :func:`least_squares_m0` against the fingerprint simulated at the prediction) and
:class:`FittedReconstructor` (either, refined by the maximum-likelihood fit). The network
reconstructor also estimates every voxel's noise relative to its fingerprint
(:func:`relative_noise`) and compares it with the noise range the network was trained on: a
network is biased outside it (see :meth:`NetworkReconstructor.noise_warning`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from mrflight.checkpoints import checkpoint_sequence
from mrflight.physics import Sequence, simulate
from mrflight.physics.checks import count

__all__ = ["MatchingReconstructor", "NetworkReconstructor", "FittedReconstructor",
           "least_squares_m0", "relative_noise"]


def _to_torch(signals: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(signals)).to(device)


def least_squares_m0(measured: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
    """Least-squares scale between measured and simulated fingerprints: ``|<d, s>| / <d, d>``.

    Args:
        measured: ``(N, T)`` complex or real fingerprints ``s``.
        simulated: ``(N, T)`` complex fingerprints ``d`` in units of M0 (``simulate``'s output);
            taken in magnitude when ``measured`` is real.

    Returns:
        ``(N,)`` float32, ``M0 = |sum conj(d) s| / sum |d|^2`` (the magnitude of the complex
        least-squares factor: a global receive phase does not change it); NaN where ``d = 0``.
    """
    return _m0(*_fit_terms(measured, simulated))


def _m0(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    out = num / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan"))).float()


def _energy(x: torch.Tensor) -> torch.Tensor:
    """``sum |x|^2`` over the last axis (through a real view: faster than complex ops)."""
    if x.is_complex():
        return torch.view_as_real(x).square().sum((-1, -2))
    return x.square().sum(-1)


def _fit_terms(measured: torch.Tensor, simulated: torch.Tensor):
    """``|<d, s>|`` and ``<d, d>`` of the least-squares fit of ``d`` to ``s`` (``d`` in
    magnitude for a real ``s``)."""
    d = simulated
    if not measured.is_complex():
        d = d.abs() if d.is_complex() else d
    d = d.to(device=measured.device, dtype=measured.dtype)
    return torch.linalg.vecdot(d, measured).abs(), _energy(d)


def _noise_from_terms(measured: torch.Tensor, num, den) -> torch.Tensor:
    """:func:`relative_noise` from the fit terms of complex ``measured``."""
    fit = num / torch.sqrt(den)
    resid = (_energy(measured) - fit ** 2).clamp_min(0.0)
    out = torch.sqrt(resid / (2 * measured.shape[-1])) / fit
    return torch.where(fit > 0, out, torch.full_like(out, float("nan"))).float()


def relative_noise(measured: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
    """Every voxel's noise standard deviation relative to its fingerprint's norm, from the
    residual of the least-squares fit of the simulated fingerprint.

    With ``A = |<d, s>| / ||d||`` (the norm of the fitted fingerprint ``M0 d``), the residual
    energy ``||s||^2 - A^2`` of ``T`` complex samples is ``2 T sigma^2`` up to the few fitted
    parameters, so ``sigma / A``, the noise of a unit-norm fingerprint, is in the unit of
    ``data.noise_std`` (a voxel of proton density ``rho`` under noise ``sigma`` reads as
    ``sigma / rho``). The fit's own error (an estimate within its bound) adds the energy of a
    few noise samples out of ``T``: negligible for ``T`` in the hundreds (``tests/test_maps.py``
    checks the mean against the true level within 1.5 % from 0.005 to 0.05). Complex data
    only: a
    magnitude's Rician noise is not additive (at the per-sample SNR of MRF, about 1, the
    residual of a magnitude fit underestimates the noise by up to 3x).

    Args:
        measured: ``(N, T)`` complex fingerprints ``s``.
        simulated: ``(N, T)`` complex fingerprints ``d`` at the estimated parameters.

    Returns:
        ``(N,)`` float32; NaN where the fit is zero.
    """
    if not measured.is_complex():
        raise ValueError("relative_noise needs complex fingerprints: the residual of a "
                         "magnitude fit does not measure its (Rician) noise")
    # single precision is enough: the residual is 2 T sigma^2 / ||s||^2 of the energy, 1e-2
    # at sigma = 0.0017 for T = 1750, far above float32's rounding
    return _noise_from_terms(measured, *_fit_terms(measured, simulated))


class MatchingReconstructor:
    """Dictionary matching of voxel fingerprints.

    Args:
        matcher: a :class:`mrflight.matching.DictionaryMatcher`.
        sequence: the sequence of the dictionary (for the sidecar; may be ``None``).
        source: the dictionary file (for the sidecar).
        dictionary: the dictionary itself, kept only for matching restricted to a measured B1
            (``b1=`` of :meth:`__call__`); ``None`` frees its atoms once the matcher holds them.
    """

    method = "dictionary matching"

    def __init__(self, matcher, sequence: Sequence | None = None, source=None,
                 dictionary=None) -> None:
        self.matcher = matcher
        self.sequence = sequence
        self.source = None if source is None else str(source)
        self.length = int(matcher.length)
        self.dictionary = dictionary
        self._by_b1: dict[int, object] = {}
        self.b1_restricted = False

    @classmethod
    def from_dictionary(cls, dictionary, *, complex_matching: bool = False, rank=None,
                        device=None, source=None, b1_restricted: bool = False
                        ) -> MatchingReconstructor:
        """Build a matcher from a :class:`mrflight.dictionary.Dictionary` (kept when
        ``b1_restricted``: matching at a measured B1 builds one matcher per B1 value)."""
        from mrflight.matching import DictionaryMatcher

        length = np.shape(dictionary.atoms)[-1]
        if isinstance(rank, (int, np.integer)) and not 1 <= rank <= length:
            raise ValueError(f"rank={rank} (maps.rank on the command line) must lie in [1, "
                             f"{length}] (the dictionary's fingerprint length), or be null for "
                             "exhaustive matching")
        matcher = DictionaryMatcher(dictionary.atoms, dictionary.params, rank=rank,
                                    complex_matching=complex_matching, device=device)
        seq = dictionary.get_sequence() if hasattr(dictionary, "get_sequence") else None
        return cls(matcher, seq, source, dictionary if b1_restricted else None)

    def b1_values(self) -> np.ndarray:
        """The distinct B1 values of the dictionary (its third column), sorted."""
        params = self.matcher.params
        if params.shape[1] < 3:
            raise ValueError("b1map=FILE restricts matching to the measured B1, which needs a "
                             "dictionary with a B1 column (T1, T2, B1), e.g. one generated with "
                             "b1=...; this dictionary has none")
        return np.unique(params[:, 2].double().cpu().numpy())

    def _matcher_at(self, j: int):
        """The matcher of the atoms whose B1 is the ``j``-th dictionary value (built once)."""
        from mrflight.matching import DictionaryMatcher

        if self.dictionary is None:
            raise ValueError("matching at a measured B1 needs the dictionary: build the "
                             "reconstructor with from_dictionary(..., b1_restricted=True)")
        if j not in self._by_b1:
            b1 = np.asarray(self.dictionary.params, dtype=np.float64)[:, 2]
            sel = np.isclose(b1, self.b1_values()[j], rtol=0.0, atol=1e-6)
            m = self.matcher
            self._by_b1[j] = DictionaryMatcher(
                np.asarray(self.dictionary.atoms)[sel], np.asarray(self.dictionary.params)[sel],
                rank=m.rank, complex_matching=m.complex_matching, device=m.device)
        return self._by_b1[j]

    def __call__(self, signals: np.ndarray, b1: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T)`` fingerprints -> (``(N, P)`` T1, T2 in ms[, B1], ``(N,)`` M0), float32
        numpy; B1 where the dictionary has a third (B1) column. With a measured ``b1`` ``(N,)``,
        each voxel is matched only against the atoms at the dictionary's B1 nearest to it."""
        if b1 is None:
            return self._match(self.matcher, signals)
        values = self.b1_values()
        self.b1_restricted = True
        b1 = np.asarray(b1, dtype=np.float64)
        _warn_outside_b1_range(b1, values)
        which = np.abs(b1[:, None] - values[None]).argmin(1)
        params = np.full((len(signals), 3), np.nan, np.float32)
        m0 = np.full(len(signals), np.nan, np.float32)
        for j in np.unique(which):
            sel = which == j
            params[sel], m0[sel] = self._match(self._matcher_at(int(j)), signals[sel])
        return params, m0

    @staticmethod
    def _match(matcher, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params, m0 = matcher.match(_to_torch(signals, matcher.device), return_m0=True)
        return params[:, :3].float().cpu().numpy(), m0.abs().float().cpu().numpy()

    def describe(self) -> dict:
        return {"EstimationMethod": self.method,
                "Dictionary": self.source,
                "DictionaryAtoms": int(self.matcher.n_atoms),
                "MatchingRank": self.matcher.rank,
                "ComplexMatching": bool(self.matcher.complex_matching),
                "B1": ("measured (b1map): matched at the dictionary's nearest B1"
                       if self.b1_restricted else "estimated with T1 and T2"
                       if self.matcher.params.shape[1] > 2 else "not modelled (1)"),
                "M0Method": "least-squares scale of the best-matching atom: <d, s> / <d, d>"}


def _warn_outside_b1_range(b1: np.ndarray, values: np.ndarray) -> None:
    """Warn when measured B1 values lie beyond the dictionary's B1 values by more than half
    their edge spacing: matched at the nearest (edge) B1, their T1 and T2 are biased."""
    lo_gap = (values[1] - values[0]) / 2 if len(values) > 1 else 0.05
    hi_gap = (values[-1] - values[-2]) / 2 if len(values) > 1 else 0.05
    if np.any((b1 < values[0] - lo_gap - 1e-9) | (b1 > values[-1] + hi_gap + 1e-9)):
        warnings.warn(f"b1map: the measured B1 of some voxels lies outside the dictionary's "
                      f"B1 range [{values[0]:g}, {values[-1]:g}]; they were matched at its "
                      "nearest B1 (TB1map holds it), so their T1 and T2 are biased: use a "
                      "dictionary whose B1 values cover the measured map", RuntimeWarning,
                      stacklevel=3)


class _NoiseRecord:
    """The relative noise of the voxels reconstructed so far (``self._noise``, a list of arrays)
    against ``self.training_noise`` (``None``: no training range)."""

    training_noise: tuple[float, float] | None = None

    def reset_noise(self) -> None:
        """Forget the relative noise of the voxels reconstructed so far (a new series)."""
        self._noise = []

    def noise_summary(self) -> dict | None:
        """Quantiles of the voxels' relative noise (:func:`relative_noise`) since the last
        :meth:`reset_noise`, and the fractions outside the training range; ``None`` without
        M0 (no fit, no residual), complex data (:func:`relative_noise`) or voxels."""
        v = np.concatenate(self._noise) if self._noise else np.zeros(0, np.float32)
        v = v[np.isfinite(v)]
        if not len(v):
            return None
        q = np.quantile(v, [0.05, 0.5, 0.95])
        lo, hi = self.training_noise or (None, None)
        out = {"Definition": "noise std (of the real and of the imaginary part) / norm of the "
                             "fitted fingerprint, from the fit residual: the unit of the "
                             "training data.noise_std",
               "Voxels": int(len(v)), "Percentile5": round(float(q[0]), 5),
               "Median": round(float(q[1]), 5), "Percentile95": round(float(q[2]), 5)}
        if hi is not None:
            out.update({"TrainingRange": [lo, hi],
                        "FractionBelowTrainingRange": round(float((v < lo).mean()), 4),
                        "FractionAboveTrainingRange": round(float((v > hi).mean()), 4),
                        "FractionAbove1.1xTrainingRange": round(float((v > 1.1 * hi).mean()), 4)})
        return out

    def _m0_and_noise(self, measured: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """M0 of every voxel with finite ``params`` (T1, T2[, B1]) from the least-squares fit
        of the fingerprint simulated there, recording the relative noise of complex data."""
        ok = torch.isfinite(params).all(1)
        m0 = torch.full((len(params),), float("nan"))
        if bool(ok.any()):
            b1 = params[ok, 2] if params.shape[1] > 2 else None
            sim = simulate(self.sequence, params[ok, 0], params[ok, 1], b1)
            measured = measured[ok.to(measured.device)].cpu()
            num, den = _fit_terms(measured, sim)
            m0[ok] = _m0(num, den)
            if measured.is_complex():  # the same fit gives the noise (relative_noise)
                self._noise.append(_noise_from_terms(measured, num, den).numpy())
        return m0


class NetworkReconstructor(_NoiseRecord):
    """A trained regressor (``predict_parameters``) plus the least-squares M0.

    Args:
        module: an object with ``predict_parameters(signals (N, T)) -> (N, 2)`` T1, T2 in ms
            (the LightningModule from :func:`mrflight.load_checkpoint`).
        sequence: the training sequence (needed for M0 and to check the series length); default
            ``module.hparams["sequence"]`` when present.
        compute_m0: simulate the fingerprint at the predicted T1/T2 to estimate M0 (else M0 NaN).
        source: the checkpoint path (for the sidecar).
        training_range: ``{"t1": (lo, hi), "t2": (lo, hi)}`` in ms, the T1/T2 range the network
            was trained on: estimates above it are counted (:meth:`range_warning`). ``None``:
            the range the module records (``hparams["training_range"]``, written by training
            into its checkpoints), else not checked.
    """

    method = "neural network regression"

    def __init__(self, module, sequence: Sequence | None = None, compute_m0: bool = True,
                 source=None, training_range: dict | None = None) -> None:
        self.module = module
        if sequence is None:
            sequence = checkpoint_sequence(module)
        if sequence is None:
            raise ValueError("the network carries no training sequence (hparams['sequence']); "
                             "pass sequence=... so the series length and M0 can be checked")
        self.sequence = sequence
        self.length = len(sequence)
        self.compute_m0 = bool(compute_m0)
        self.source = None if source is None else str(source)
        if hasattr(module, "eval"):
            module.eval()
        noise = (getattr(module, "hparams", None) or {}).get("noise_std")
        noise = [noise, noise] if isinstance(noise, (int, float)) else noise
        #: the training noise range ``(low, high)`` (``None``: not recorded)
        self.training_noise = None if not noise else (float(min(noise)), float(max(noise)))
        self._noise: list[np.ndarray] = []
        if training_range is None:
            training_range = (getattr(module, "hparams", None) or {}).get("training_range")
        #: the T1/T2 range ``{"t1": (lo, hi), "t2": (lo, hi)}`` in ms (``None``: not checked)
        self.training_range = None if training_range is None else {
            k: (float(training_range[k][0]), float(training_range[k][1])) for k in ("t1", "t2")}
        self._beyond = [0, 0, 0]  # voxels estimated, beyond the range in T1, in T2

    def reset_noise(self) -> None:
        super().reset_noise()
        self._beyond = [0, 0, 0]

    def range_summary(self) -> dict | None:
        """The voxels whose T1 or T2 estimate lies above the training range (``None``: no
        range recorded, or no voxel yet)."""
        n, t1, t2 = self._beyond
        if self.training_range is None or not n:
            return None
        return {"TrainingRangeMs": {k: list(v) for k, v in self.training_range.items()},
                "Voxels": n, "FractionT1Above": round(t1 / n, 4),
                "FractionT2Above": round(t2 / n, 4)}

    def range_warning(self, threshold: float = 0.01) -> str | None:
        """A message when more than ``threshold`` of the voxels have a T1 or T2 estimate above
        the training range: tissue the network never saw (CSF's T2 at 3 T is about 1650 ms),
        where it extrapolates and its estimates are far off (the default GRU gave CSF's T2
        53 % too low), else ``None``."""
        s = self.range_summary()
        if s is None:
            return None
        over = [(f"T{i}", s[f"FractionT{i}Above"], self.training_range[f"t{i}"][1])
                for i in (1, 2) if s[f"FractionT{i}Above"] > threshold]
        if not over:
            return None
        what = " and ".join(f"{100 * f:.1f} % of the voxels have {p} estimates above the "
                            f"network's training range ({p} <= {hi:g} ms)" for p, f, hi in over)
        return (f"{what}: tissue the network was not trained on (e.g. CSF, T2 about 1650 ms "
                "at 3 T), where its estimates are extrapolations, typically far too low; refine "
                "them by the maximum-likelihood fit (maps.fit_iterations=15), or train on data "
                "that covers them (data.t1_range, data.t2_range of data=simulated, or a "
                "dictionary that does)")

    def noise_warning(self, threshold: float = 0.05) -> str | None:
        """A message when more than ``threshold`` of the voxels are noisier than 1.1x the top
        of the training noise range (the margin covers the estimate's spread at the edge),
        else ``None``: trained networks extrapolate badly in noise, their estimates there are
        biased."""
        s = self.noise_summary()
        if s is None or "TrainingRange" not in s:
            return None
        frac = s["FractionAbove1.1xTrainingRange"]
        if frac <= threshold:
            return None
        lo, hi = s["TrainingRange"]
        return (f"{100 * frac:.0f} % of the {s['Voxels']} voxels are noisier than the "
                f"network's training range (noise relative to the fingerprint norm: median "
                f"{s['Median']:.3g}, 95th percentile {s['Percentile95']:.3g}; trained on "
                f"{lo:g} to {hi:g}): their T1/T2 are biased. Train with a noise range that "
                f"covers them (data.noise_std=[{lo:g},{s['Percentile95']:.2g}]), refine the "
                "estimates by the maximum-likelihood fit (maps.fit_iterations=15), or use "
                "dictionary matching")

    def _device(self):
        dev = getattr(self.module, "device", None)
        if dev is None:
            try:
                dev = next(self.module.parameters()).device
            except (AttributeError, StopIteration):
                dev = torch.device("cpu")
        return dev

    @torch.no_grad()
    def __call__(self, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T)`` fingerprints -> (``(N, P)`` T1, T2 in ms[, B1], ``(N,)`` M0), float32
        numpy; B1 (ratio to nominal) for networks that estimate it."""
        s = _to_torch(signals, self._device())
        pred = self.module.predict_parameters(s)
        pred = torch.as_tensor(pred).detach().float().cpu()[:, :3].clamp_min(0.0)
        pred[~torch.isfinite(pred)] = float("nan")  # an overflowed output is no estimate
        params = pred.numpy()
        if self.training_range is not None:
            self._beyond[0] += len(params)
            for i, key in ((1, "t1"), (2, "t2")):
                self._beyond[i] += int(np.count_nonzero(params[:, i - 1]
                                                        > self.training_range[key][1]))
        if not self.compute_m0:
            return params, np.full(len(params), np.nan, np.float32)
        return params, self._m0_and_noise(s, pred).numpy()

    def describe(self) -> dict:
        return {"EstimationMethod": self.method,
                "Checkpoint": self.source,
                "Network": type(_network(self.module)).__name__,
                "M0Method": ("least-squares scale |<d, s>| / <d, d> between the measured "
                             "fingerprint s and the EPG fingerprint d simulated at the predicted "
                             "T1, T2" if self.compute_m0 else "not computed"),
                "RelativeNoise": self.noise_summary(),
                "EstimatesAboveTrainingRange": self.range_summary()}


class FittedReconstructor(_NoiseRecord):
    """Another reconstructor's estimates refined voxel by voxel by the maximum-likelihood fit
    (:func:`mrflight.physics.fit.fit`): T1, T2 and B1 where the first estimate has B1, T1 and
    T2 at the measured B1 where a B1 map is given (``b1=`` of :meth:`__call__`), else at B1 = 1.
    Complex series only (a magnitude's Rician noise would bias a least-squares fit).

    Args:
        base: a :class:`NetworkReconstructor` or :class:`MatchingReconstructor` (its sequence
            is the one fitted).
        iterations: Levenberg-Marquardt iterations per voxel (one value-and-Jacobian
            simulation each).
    """

    def __init__(self, base, iterations: int) -> None:
        if getattr(base, "sequence", None) is None:
            raise ValueError("the fit simulates fingerprints, so it needs the sequence: the "
                             "dictionary carries none; pass sequence=... or a dictionary saved "
                             "with its sequence")
        self.base = base
        self.iterations = count(iterations, "maps.fit_iterations", hint=" (0 leaves the fit out)")
        self.sequence, self.length = base.sequence, base.length
        self.method = f"{base.method} refined by a maximum-likelihood fit"
        self._b1 = "fitted"
        self._noise = []

    def reset_noise(self) -> None:
        """A new series: the base's records (its first estimates' range count) too."""
        super().reset_noise()
        if hasattr(self.base, "reset_noise"):
            self.base.reset_noise()

    def _dictionary_has_b1(self) -> bool:
        """Whether the base matches against a (T1, T2, B1) dictionary (then a measured B1
        restricts its matching as well)."""
        params = getattr(getattr(self.base, "matcher", None), "params", None)
        return params is not None and params.shape[1] > 2

    def __call__(self, signals: np.ndarray, b1: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T)`` complex fingerprints -> (``(N, P)`` T1, T2 in ms[, B1], ``(N,)`` M0),
        float32 numpy, as :meth:`MatchingReconstructor.__call__`."""
        from mrflight.physics.fit import fit

        if not np.iscomplexobj(signals):
            raise ValueError("maps.fit_iterations needs a complex series: a magnitude's Rician "
                             "noise would bias a least-squares fit. Pass the complex series, or "
                             "set maps.fit_iterations=0")
        with_dict_b1 = b1 is not None and self._dictionary_has_b1()
        start, _ = self.base(signals, b1=b1) if with_dict_b1 else self.base(signals)
        y = _to_torch(signals, "cpu")
        if b1 is not None:
            b1 = torch.as_tensor(np.asarray(b1, dtype=np.float64))
            est = fit(self.sequence, y, start[:, :2], estimate_b1=False, b1=b1,
                      max_iter=self.iterations)
            est = torch.cat([est, b1[:, None]], 1)
            self._b1 = "measured (b1map): held at the measured B1"
        else:
            est = fit(self.sequence, y, start, estimate_b1=start.shape[1] > 2,
                      max_iter=self.iterations)
            self._b1 = "fitted with T1 and T2" if start.shape[1] > 2 else "not modelled (1)"
        return est.float().numpy(), self._m0_and_noise(y, est).numpy()

    def describe(self) -> dict:
        meta = dict(self.base.describe())
        meta.update({
            "EstimationMethod": self.method,
            "Fit": {"Method": "maximum likelihood of the complex fingerprint: variable-"
                              "projection Levenberg-Marquardt over log T1, log T2 (and B1) "
                              "started at the first estimate, the complex scale eliminated",
                    "Iterations": self.iterations, "B1": self._b1},
            "M0Method": "least-squares scale |<d, s>| / <d, d> of the fingerprint d simulated "
                        "at the fitted parameters",
            "RelativeNoise": self.noise_summary()})
        return meta


def _network(module):
    """The regressor inside a LightningModule (``.net``), else the module itself."""
    for attr in ("net", "model"):
        inner = getattr(module, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return module
