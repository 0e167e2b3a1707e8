"""Every method of a group on every test set and noise level, beside the Cramér–Rao bound:
:func:`evaluate_group`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from mrflight.evaluation.methods import errors, estimates_b1, noisy, predictors
from mrflight.evaluation.phantom_maps import phantom_maps
from mrflight.evaluation.settings import EvalSettings
from mrflight.evaluation.testdata import Group

__all__ = ["evaluate_group"]

log = logging.getLogger("mrflight")


def evaluate_group(group: Group, settings: EvalSettings, figures: dict,
                   arrays: dict) -> list[dict]:
    """Evaluate every method of a group on every test set and noise level; returns the rows.

    Figures go into ``figures`` (``"_groups"`` lists the groups, whose order is the group's
    :attr:`~mrflight.evaluation.testdata.Group.index`: its rows' ``group`` and the suffix of the
    names of the second and later groups) and phantom arrays into ``arrays``.
    """
    preds = predictors(group, settings)
    first_set = next(iter(group.test))
    lat_signals = noisy(group.test[first_set][1][:64], settings.noise_levels[0],
                        settings.noise_seed)
    for p in preds:
        p.measure_latency(lat_signals, settings.latency_repeats)
    group.index = len(figures.setdefault("_groups", []))
    figures["_groups"].append(group.key)
    tag = group.tag
    # held to the bound of B1-free methods (B1 = 1 known): said beside the table
    group.description["b1_networks"] = [[r.method, r.label] for r in group.runs
                                        if estimates_b1(r.module)]
    rows = []
    for si, (set_name, (params, clean)) in enumerate(group.test.items()):
        unit = _unit_bound(group, settings, set_name, si, params) if settings.bound else None
        for li, std in enumerate(settings.noise_levels):
            signals = noisy(clean, std, settings.noise_seed * 1000 + 10 * si + li)
            level = _Level(set_name, std, params, None if unit is None else _Bound(*unit, std),
                           _bound_kind(group, settings, set_name))
            rows += _level_rows(group, settings, preds, level, signals, figures, tag)
    if settings.phantoms:
        phantom_maps(group, preds, settings, figures, arrays, tag)
    return rows


def _unit_bound(group: Group, settings: EvalSettings, set_name: str, si: int,
                params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(signals, bound)``: the test signals the bound is computed on (all, or a seeded subset
    of ``bound_signals``) and their Cramér–Rao bound on std(T1), std(T2) at unit noise; where
    the set's atoms have their own B1 (:attr:`Group.test_b1`), the bound at that B1 with B1
    unknown, as it is to the networks and to matching."""
    from mrflight.physics.crb import crb

    n = len(params)
    rng = np.random.default_rng(settings.noise_seed + 1000 + si)
    nb = n if settings.bound_signals is None else min(int(settings.bound_signals), n)
    bsel = np.sort(rng.choice(n, size=nb, replace=False)) if nb < n else np.arange(n)
    t0 = time.perf_counter()
    b1 = group.test_b1.get(set_name)
    unit = crb(group.seq, torch.from_numpy(params[bsel, 0]), torch.from_numpy(params[bsel, 1]),
               1.0, None if b1 is None else torch.from_numpy(b1[bsel]),
               magnitude=settings.bound_magnitude,
               estimate_b1=b1 is not None).cpu().numpy()[:, :2]
    log.info("bound on %d %s signals: %.1f s", len(bsel), set_name, time.perf_counter() - t0)
    return bsel, unit


def _bound_kind(group: Group, settings: EvalSettings, set_name: str) -> str:
    """What the bound of a test set assumes (the ``bound`` of its ``crb`` row)."""
    data = "magnitude" if settings.bound_magnitude else "complex"
    b1 = ("B1 unknown, at each atom's B1" if group.test_b1.get(set_name) is not None
          else "B1 = 1 known")
    return f"{data} data, {b1}"


class _Bound:
    """The bound at one noise level on the signals ``sel``: its finite rows, RMS and the MAE of
    an efficient unbiased estimator with Gaussian errors (``sqrt(2/pi)`` x mean bound)."""

    def __init__(self, sel: np.ndarray, unit: np.ndarray, std: float) -> None:
        self.sel, self.values = sel, unit * std
        self.fin = np.isfinite(self.values).all(1)
        self.rms = np.sqrt(np.mean(self.values[self.fin] ** 2, axis=0))
        self.mae = np.sqrt(2 / np.pi) * np.mean(self.values[self.fin], axis=0)

    def ratio(self, pred: np.ndarray, params: np.ndarray, i: int) -> float | None:
        """A method's RMSE of parameter ``i`` over the RMS bound, on the same signals."""
        if not self.rms[i] > 0:
            return None
        e = pred[self.sel][self.fin, i] - params[self.sel][self.fin, i]
        # a NaN estimate makes the ratio NaN (nanmean would drop the method's failures)
        return float(np.sqrt(np.mean(e**2)) / self.rms[i])


@dataclass
class _Level:
    """One test set at one noise level."""

    set_name: str
    std: float
    params: np.ndarray
    bound: _Bound | None
    bound_kind: str = ""


def _level_rows(group, settings, preds, level: _Level, signals, figures: dict,
                tag: str) -> list[dict]:
    """The rows of every method (and of the bound) at one level; its figures."""
    n = len(level.params)
    base = {"group": group.index, "test_set": level.set_name, "noise_std": level.std,
            "n_signals": n, "sequence": group.seq.name,
            "dictionary_atoms": group.description["dictionary_atoms"]}
    rows, estimates = [], {}
    for p in preds:
        pred, dt = p(signals)
        estimates[p.key] = pred
        log.info("%s: %s test set, noise %g, %d signals in %.2f s", p.key, level.set_name,
                 level.std, n, dt)
        err = errors(pred, level.params)
        if err["n_nonfinite"]:
            log.warning("%s: %d of %d estimates on the %s test set at noise %g are not finite: "
                        "its errors there are NaN (not computed over the rest)", p.key,
                        err["n_nonfinite"], n, level.set_name, level.std)
        row = {"method": p.method, "run": p.run, "checkpoint": p.checkpoint, **base, **err,
               "ms_per_signal": 1e3 * dt / n,
               "latency_ms_mean": p.latency[0], "latency_ms_std": p.latency[1],
               "latency_repeats": settings.latency_repeats}
        for i, q in enumerate(("t1", "t2")):
            row[f"{q}_rmse_over_crb"] = (None if level.bound is None else
                                         level.bound.ratio(pred, level.params, i))
        rows.append(row)
    if level.bound is not None:
        rows.append(_bound_row(base, level.bound, level.bound_kind))
    if settings.plots and level.std == settings.plot_noise_std:
        _level_figures(group, level, estimates, figures, tag)
    return rows


def _bound_row(base: dict, b: _Bound, kind: str) -> dict:
    return {"method": "crb", "run": "", "checkpoint": None, **base, "bound": kind,
            "n_signals": int(b.fin.sum()),
            "t1_mae_ms": float(b.mae[0]), "t1_rmse_ms": float(b.rms[0]),
            "t2_mae_ms": float(b.mae[1]), "t2_rmse_ms": float(b.rms[1]),
            "ms_per_signal": None, "latency_ms_mean": None,
            "latency_ms_std": None, "latency_repeats": None,
            "t1_rmse_over_crb": 1.0, "t2_rmse_over_crb": 1.0}


def _level_figures(group, level: _Level, estimates: dict, figures: dict, tag: str) -> None:
    """Predicted vs true, and error and RMSE/bound vs T1 and T2."""
    from mrflight import plots

    set_name, std, params = level.set_name, level.std, level.params
    title = (f"{set_name} test set ({len(params)} signals), noise std {std:g}, "
             f"{group.seq.name} ({len(group.seq)} time points)")
    figures[f"scatter_{set_name}_noise{std:g}{tag}"] = plots.scatter_true_vs_pred(
        params, estimates, title=title)
    bound = None
    if level.bound is not None:
        # bound at every test signal is not computed: bin the subset instead
        bound = np.full_like(params, np.nan)
        bound[level.bound.sel] = level.bound.values
    figures[f"error_vs_t1_t2_{set_name}_noise{std:g}{tag}"] = plots.error_vs_parameter(
        params, estimates, bound, title=title)
