"""The evaluated methods as predictors ``(N, T) complex -> (N, 2) ms``: each network of a group,
exhaustive and SVD dictionary matching; their errors against the truth."""

from __future__ import annotations

import time
import weakref

import numpy as np
import torch

from mrflight.evaluation.settings import EvalSettings
from mrflight.evaluation.testdata import Group

__all__ = ["Predictor", "predictors", "estimators", "estimates_b1", "noisy", "errors", "method_key",
           "b1_dictionary", "b1_matching", "B1_MATCHING", "FIT_SUFFIX"]

#: the name of (T1, T2, B1) dictionary matching in the bound reports
B1_MATCHING = "matching (T1, T2, B1)"


def method_key(method: str, run: str = "") -> str:
    """A method's name in figures, phantom maps and reports: ``method`` or ``method [run]``."""
    return method if not run else f"{method} [{run}]"


def estimates_b1(module) -> bool:
    """A network that estimates B1 besides T1 and T2 (its ``targets``)."""
    return "b1" in getattr(module, "targets", ())


def noisy(clean: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """``clean`` plus complex Gaussian noise of ``std``, seeded."""
    from mrflight.physics import add_noise

    return add_noise(clean, std, generator=torch.Generator().manual_seed(seed))


def errors(pred: np.ndarray, true: np.ndarray) -> dict:
    """MAE and RMSE of T1 and T2 (ms) over every test signal, and ``n_nonfinite``: the signals
    whose T1 or T2 estimate is NaN or infinite. A method with such estimates gets NaN errors
    (``None`` in ``metrics.json``, "–" in the tables) rather than errors over the signals it
    did estimate, which would leave out its failures and rank it above methods that estimated
    every signal."""
    from torchmetrics.functional import mean_absolute_error, mean_squared_error

    p, t = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(true, dtype=torch.float64)
    bad = ~torch.isfinite(p[:, :2]).all(dim=1)
    out = {"n_nonfinite": int(bad.sum())}
    for i, name in enumerate(("t1", "t2")):
        if out["n_nonfinite"]:
            out[f"{name}_mae_ms"] = out[f"{name}_rmse_ms"] = float("nan")
            continue
        out[f"{name}_mae_ms"] = float(mean_absolute_error(p[:, i], t[:, i]))
        out[f"{name}_rmse_ms"] = float(mean_squared_error(p[:, i], t[:, i], squared=False))
    return out


class Predictor:
    """One method: a callable ``(N, T) complex -> (N, 2) ms numpy`` plus timing."""

    def __init__(self, method: str, fn, run: str = "", checkpoint: str | None = None):
        self.method, self.fn, self.run, self.checkpoint = method, fn, run, checkpoint
        self.latency = (float("nan"), float("nan"))

    @property
    def key(self) -> str:
        return method_key(self.method, self.run)

    def __call__(self, signals: torch.Tensor) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = self.fn(signals)
        dt = time.perf_counter() - t0
        return np.asarray(out, dtype=np.float64)[:, :2], dt

    def measure_latency(self, signals: torch.Tensor, repeats: int) -> None:
        self.fn(signals[:8])  # warm-up
        times = []
        for r in range(repeats):
            s = signals[r % len(signals)][None]
            t0 = time.perf_counter()
            self.fn(s)
            times.append(1e3 * (time.perf_counter() - t0))
        self.latency = (float(np.mean(times)), float(np.std(times, ddof=1)))


def predictors(group: Group, settings: EvalSettings) -> list[Predictor]:
    """The group's networks, exhaustive matching and (with ``svd_rank``) SVD matching on the
    group's training dictionary."""
    from mrflight.matching import DictionaryMatcher

    dev = torch.device(settings.device)
    preds = []
    for r in group.runs:
        module = r.module

        def net_fn(s, module=module):
            return module.predict_parameters(s, batch_size=settings.batch_size).cpu().numpy()

        preds.append(Predictor(r.method, net_fn, r.label, str(r.ckpt)))
    kw = dict(complex_matching=settings.complex_matching, device=dev)
    exh = DictionaryMatcher(group.dictionary_atoms, group.dictionary_params, **kw)
    preds.append(Predictor("matching", lambda s: exh.match(s.to(dev)).cpu().numpy()))
    if settings.svd_rank is not None:
        rank = min(int(settings.svd_rank), exh.length)
        svd = DictionaryMatcher(group.dictionary_atoms, group.dictionary_params, rank=rank, **kw)
        preds.append(Predictor("matching_svd", lambda s: svd.match(s.to(dev)).cpu().numpy()))
    return preds


def b1_dictionary(seq, cache_dir=None) -> tuple[np.ndarray, torch.Tensor]:
    """A (T1, T2, B1) dictionary for matching where B1 varies: ``(M, 3)`` parameters and
    ``(M, T)`` complex64 atoms. T1: 100 values log-spaced in 80-5000 ms; T2: 80 in 8-600 ms
    (T2 <= T1); B1: 0.70-1.30 in steps of 0.05 (91 884 atoms); cached in ``cache_dir``."""
    from mrflight.dictionary import generate, regular_grid

    pairs = regular_grid(80.0, 5000.0, 100, 8.0, 600.0, 80, spacing="log")
    b1 = np.round(np.arange(0.70, 1.30 + 1e-9, 0.05), 2)
    params = np.column_stack([np.repeat(pairs, len(b1), axis=0), np.tile(b1, len(pairs))])
    d = generate(seq, params[:, :2], b1=params[:, 2], cache_dir=cache_dir, progress=False)
    return params, torch.from_numpy(np.ascontiguousarray(d.atoms)).to(torch.complex64)


def b1_matching(seq, rank: int | None = 25, device="cpu", cache_dir=None):
    """Complex matching against :func:`b1_dictionary` as an estimator ``(N, T) -> (N, 3)``
    numpy (T1 ms, T2 ms, B1), in a rank-``rank`` SVD basis (``None``: exhaustive)."""
    from mrflight.matching import DictionaryMatcher

    dev = torch.device(device)
    params, atoms = b1_dictionary(seq, cache_dir)
    m = DictionaryMatcher(atoms, torch.from_numpy(params),
                          rank=None if rank is None else int(rank), complex_matching=True,
                          device=dev)
    del atoms
    return lambda s: m.match(torch.as_tensor(s).to(dev)).cpu().numpy()


def estimators(group: Group, settings: EvalSettings, cache_dir=None) -> tuple[dict, dict]:
    """Networks of a group as estimators ``(N, T) -> (N, P)``, and their training noise; with
    ``settings.matching_b1`` also (T1, T2, B1) dictionary matching (noise: 0.01); with
    ``settings.fit`` also each of them followed by the maximum-likelihood fit
    (``NAME + fit``)."""
    est, noise = {}, {}
    for r in group.runs:
        name = method_key(r.method, r.label)

        def fn(s, module=r.module):
            return module.predict_parameters(s, batch_size=settings.batch_size).numpy()

        est[name] = fn
        ns = r.module.hparams.get("noise_std")
        lo, hi = (ns, ns) if not isinstance(ns, (list, tuple)) else ns
        noise[name] = (float(lo or 0.01), float(hi or 0.01))
    if settings.matching_b1 and est:
        est[B1_MATCHING] = b1_matching(group.seq, settings.svd_rank, settings.device, cache_dir)
        noise[B1_MATCHING] = (0.01, 0.01)
    if settings.fit:
        for name in list(est):
            est[name] = _Remembered(est[name])  # the fit starts from the same call's estimates
            est[name + FIT_SUFFIX] = _fitted(est[name], group.seq, settings.fit_iterations)
            noise[name + FIT_SUFFIX] = noise[name]
    return est, noise


class _Remembered:
    """An estimator that remembers its last answer: called again with the same signals (the
    reports call ``NAME`` and then ``NAME + fit`` on one tensor) it does not estimate twice."""

    def __init__(self, estimator):
        self.estimator, self._last, self._out = estimator, None, None

    def __call__(self, s):
        if self._last is None or self._last() is not s:
            self._out = self.estimator(s)
            self._last = weakref.ref(s)
        return self._out


#: appended to a method's name for its estimates refined by the maximum-likelihood fit
FIT_SUFFIX = " + fit"


def _fitted(estimator, seq, iterations: int):
    """``estimator`` followed by the maximum-likelihood fit (:func:`mrflight.physics.fit.fit`)
    started at its estimates; B1 is fitted where the estimator gives it, else held at 1."""
    from mrflight.physics.fit import fit

    def fn(s):
        start = np.asarray(estimator(s), dtype=np.float64)
        return fit(seq, s, start, estimate_b1=start.shape[1] > 2,
                   max_iter=iterations).numpy()

    return fn
