"""Evaluation: every method on the same noisy test signals, beside the Cramér–Rao bound.

``python eval.py [ckpt_path=PATH] [evaluation.n_test=...] [evaluation.noise_levels=[...]]``
calls :func:`run`. ``PATH`` may be a checkpoint file, a training run directory or a multirun
directory: every run found is evaluated (its best checkpoint, else ``last.ckpt``) with the run's
own saved ``config.yaml`` (sequence, data grid and split). Without a checkpoint, dictionary
matching and the bound are evaluated for ``cfg.sequence`` and the paper's grid.

Protocol (per group of runs that share sequence, data and split):

* **paper** test set: held-out grid atoms -- the run's own test split (``data.split_seed``,
  ``data.n_test``; reproduced exactly through :class:`mrflight.data.FingerprintDataModule`), of
  which ``n_test`` are evaluated. Dictionary matching uses the *training dictionary* = all grid
  atoms minus the whole test split, so a test atom is never in the dictionary (as in the paper).
* **offgrid** test set: ``n_test`` continuous uniform random T1/T2 (T2 <= T1) over the grid's
  range, which exposes the quantisation error of matching.
* every noise level of ``noise_levels``: the same complex noise draw (seeded per set and level)
  for every method (:func:`mrflight.physics.add_noise`).
* methods: each checkpoint (``lstm``/``gru``/``ann``/``cnn``), exhaustive magnitude matching
  (``matching``), SVD matching (``matching_svd``, McGivney et al. 2014) and the Cramér–Rao bound
  (``crb``, :func:`mrflight.physics.crb.crb`, per test signal, or on a seeded random subset of
  ``bound_signals`` signals per set; its RMSE column is the RMS of the per-signal bound, its MAE
  column ``sqrt(2/pi)`` times the mean bound, i.e. what an efficient unbiased estimator with
  Gaussian errors would reach).

Outputs in ``cfg.paths.output_dir`` (all written atomically): ``metrics.json`` (a list of rows),
``table.md`` and ``table.csv`` (the layout of the paper's Table 1, with the paper's own rows as a
reference), ``figures/*.png`` (predicted vs true, error and RMSE/bound vs T1 and T2, phantom maps)
and ``phantoms/<name>.npz`` (truth and every method's T1/T2 maps in ms). With loggers configured
(``logger=wandb``) the table and figures are logged through the logger objects.

References:
    Oksuz et al., Magnetic resonance fingerprinting using recurrent neural networks, ISBI 2019
    (protocol and Table 1); McGivney et al., IEEE TMI 2014 (SVD matching); Zhao et al., IEEE TMI
    2019 (Cramér–Rao bound for MRF).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrflight.matio import atomic_path

__all__ = ["EvalSettings", "run", "find_checkpoints", "evaluate_group", "PAPER_TABLE1",
           "write_outputs", "METHODS"]

log = logging.getLogger("mrflight")

METHODS = ("lstm", "gru", "ann", "cnn", "matching", "matching_svd", "crb")

#: Oksuz et al. 2019, Table 1 (MAE / RMSE in ms, time per signal in ms), as reported
PAPER_TABLE1 = [
    {"method": "ann", "label": "ANN", "t1_mae_ms": 113.22, "t1_rmse_ms": 119.94,
     "t2_mae_ms": 67.16, "t2_rmse_ms": 86.63, "ms_per_signal": 18.0},
    {"method": "cnn", "label": "1D CNN", "t1_mae_ms": 108.98, "t1_rmse_ms": 112.38,
     "t2_mae_ms": 64.57, "t2_rmse_ms": 113.22, "ms_per_signal": 14.0},
    {"method": "matching", "label": "inner product", "t1_mae_ms": 212.13,
     "t1_rmse_ms": 213.83, "t2_mae_ms": 163.14, "t2_rmse_ms": 83.60, "ms_per_signal": 127.0},
    {"method": "lstm", "label": "LSTM", "t1_mae_ms": 107.89, "t1_rmse_ms": 109.36,
     "t2_mae_ms": 62.20, "t2_rmse_ms": 81.11, "ms_per_signal": 15.0},
    {"method": "gru", "label": "GRU", "t1_mae_ms": 101.81, "t1_rmse_ms": 103.25,
     "t2_mae_ms": 58.91, "t2_rmse_ms": 73.66, "ms_per_signal": 14.0},
]

_LABELS = {"lstm": "LSTM", "gru": "GRU", "ann": "ANN (DRONE)", "cnn": "1D CNN",
           "matching": "dictionary matching (exhaustive)", "matching_svd": "SVD matching",
           "crb": "Cramér–Rao bound"}


@dataclass
class EvalSettings:
    """What ``eval.py`` evaluates (``configs/eval.yaml``, node ``evaluation``).

    Args:
        n_test: test signals per test set (the paper used 5000).
        noise_levels: noise standard deviations (relative to the unit-norm fingerprint).
        test_sets: any of ``"paper"`` (held-out grid atoms) and ``"offgrid"`` (continuous).
        split_seed: grid/test split seed when no run config gives one.
        noise_seed: seed of the test noise (one stream per test set and noise level).
        offgrid_seed: seed of the off-grid parameters.
        svd_rank: rank of SVD matching (``None``: skip SVD matching).
        complex_matching: match complex fingerprints (``|<d, s>|``) instead of magnitudes.
        bound: compute the Cramér–Rao bound rows and RMSE/bound ratios.
        bound_signals: test signals per set on which the bound is computed (a seeded subset;
            ``None``: every test signal).
        bound_magnitude: bound for magnitude data (what the paper's methods see), else complex.
        latency_repeats: single-signal calls timed per method (latency mean ± std over these).
        phantoms: any of ``"brain"`` and ``"nist"``.
        phantom_size: phantom image side in pixels.
        phantom_noise_std: noise of the phantom signals (``None``: the level nearest 0.01).
        plots: write figures.
        batch_size: batch size of network inference.
        device: ``"cpu"`` or ``"cuda"``.
        grid: the dictionary grid used when no run config gives one: a config node
            ``{"_target_": ..., **kwargs}`` returning ``(M, 2)`` T1, T2 in ms (``None``:
            :func:`mrflight.dictionary.paper_grid`).
    """

    n_test: int = 1000
    noise_levels: list = field(default_factory=lambda: [0.005, 0.01, 0.02])
    test_sets: list = field(default_factory=lambda: ["paper", "offgrid"])
    split_seed: int = 0
    noise_seed: int = 7
    offgrid_seed: int = 11
    svd_rank: int | None = 25
    complex_matching: bool = False
    bound: bool = True
    bound_signals: int | None = None
    bound_magnitude: bool = True
    latency_repeats: int = 20
    phantoms: list = field(default_factory=lambda: ["brain", "nist"])
    phantom_size: int = 64
    phantom_noise_std: float | None = None
    plots: bool = True
    batch_size: int = 4096
    device: str = "cpu"
    grid: dict | None = None

    def __post_init__(self) -> None:
        if self.grid is not None:
            from omegaconf import OmegaConf

            if OmegaConf.is_config(self.grid):
                self.grid = OmegaConf.to_container(self.grid, resolve=True)
            if not (isinstance(self.grid, dict) and "_target_" in self.grid):
                raise ValueError("evaluation.grid must be null or a config with _target_ "
                                 "(e.g. mrflight.dictionary.regular_grid)")
        self.noise_levels = [float(x) for x in self.noise_levels]
        self.test_sets = list(self.test_sets)
        self.phantoms = list(self.phantoms)
        if int(self.n_test) < 2:
            raise ValueError(f"evaluation.n_test must be >= 2, got {self.n_test}")
        if not self.noise_levels or any(not (x >= 0 and math.isfinite(x))
                                        for x in self.noise_levels):
            raise ValueError(f"evaluation.noise_levels must be a non-empty list of noise stds "
                             f">= 0, e.g. [0.005, 0.01, 0.02], got {self.noise_levels}")
        bad = set(self.test_sets) - {"paper", "offgrid"}
        if bad or not self.test_sets:
            raise ValueError(f"evaluation.test_sets must be a non-empty subset of ['paper', "
                             f"'offgrid'], got {self.test_sets}")
        bad = set(self.phantoms) - {"brain", "nist"}
        if bad:
            raise ValueError(f"evaluation.phantoms must be a subset of ['brain', 'nist'], got "
                             f"{self.phantoms}")
        if self.svd_rank is not None and int(self.svd_rank) < 1:
            raise ValueError(f"evaluation.svd_rank must be >= 1 or null, got {self.svd_rank}")
        if int(self.latency_repeats) < 2:
            raise ValueError("evaluation.latency_repeats must be >= 2 (a std needs two calls)")
        self.n_test = int(self.n_test)

    @property
    def plot_noise_std(self) -> float:
        return min(self.noise_levels, key=lambda x: abs(math.log((x + 1e-12) / 0.01)))


# ============================================================================ checkpoints
@dataclass
class _Run:
    ckpt: Path
    run_dir: Path
    config: dict | None
    module: object = None
    method: str = ""
    label: str = ""


def find_checkpoints(path) -> list[Path]:
    """Checkpoints to evaluate under ``path`` (a ``.ckpt`` file, a run dir or a multirun dir).

    One per directory holding checkpoints: the best one (any ``*.ckpt`` that is not
    ``last*.ckpt``; the newest if several), else ``last.ckpt``.

    Raises:
        ValueError: ``path`` does not exist or holds no checkpoint.
    """
    p = Path(str(path)).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ValueError(f"ckpt_path={path}: no such file or directory")
    by_dir: dict[Path, list[Path]] = {}
    for c in sorted(p.rglob("*.ckpt")):
        if any(part.startswith(".") or part == "wandb" for part in c.relative_to(p).parts):
            continue
        by_dir.setdefault(c.parent, []).append(c)
    out = []
    for _, cks in sorted(by_dir.items()):
        best = [c for c in cks if not c.stem.startswith("last")]
        out.append(max(best, key=lambda c: c.stat().st_mtime) if best else cks[0])
    if not out:
        raise ValueError(f"ckpt_path={path}: no .ckpt file found under {p}")
    return out


def _run_config(ckpt: Path) -> tuple[Path, dict | None]:
    """The run directory and its resolved config (``checkpoints/config.yaml`` or
    ``.hydra/config.yaml``), or ``None``."""
    from omegaconf import OmegaConf

    cands = [ckpt.parent / "config.yaml", ckpt.parent.parent / "checkpoints" / "config.yaml",
             ckpt.parent.parent / ".hydra" / "config.yaml", ckpt.parent / ".hydra" / "config.yaml"]
    for c in cands:
        if c.is_file():
            run_dir = c.parent.parent if c.parent.name in ("checkpoints", ".hydra") else c.parent
            return run_dir, OmegaConf.to_container(OmegaConf.load(c), resolve=False)
    return (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent), None


def _method_of(module) -> str:
    from mrflight.models import REGISTRY

    target = str((module.hparams.get("net") or {}).get("_target_", ""))
    cls = target.rsplit(".", 1)[-1]
    for key, c in REGISTRY.items():
        if c.__name__ == cls or isinstance(getattr(module, "net", None), c):
            return key
    return cls.lower() or "network"


# ============================================================================ test data
@dataclass
class _Group:
    """Runs sharing one sequence, dictionary and split, and their test data."""

    seq: object
    key: str
    runs: list
    dictionary_atoms: torch.Tensor = None  # training dictionary (grid minus test split)
    dictionary_params: torch.Tensor = None
    test: dict = field(default_factory=dict)  # set -> (params (N,2) float64, clean complex (N,T))
    description: dict = field(default_factory=dict)


def _data_key(seq, data_cfg: dict | None, split_seed: int) -> str:
    return json.dumps({"seq": seq.fingerprint(), "data": data_cfg, "split": split_seed},
                      sort_keys=True, default=str)


def _instantiate(node, **kw):
    from hydra.utils import instantiate

    return instantiate(node, **kw)


def _build_group_data(group: _Group, data_cfg: dict | None, settings: EvalSettings,
                      cache_dir) -> None:
    """Fill the training dictionary and the test sets of a group."""
    from mrflight.dictionary import generate, paper_grid, random_params
    from mrflight.physics import simulate

    seq = group.seq
    if data_cfg is not None:
        # the run's own split, reproduced by its datamodule
        dm = _instantiate(data_cfg, sequence=seq, progress=False)
        atoms, params, keep, splits = dm.load_splits()  # one load, no training datasets
        params, keep = params.numpy(), keep.numpy()
        test_idx = splits["test"].numpy()
        source = (f"run data config ({data_cfg.get('_target_', '?')}, split_seed "
                  f"{data_cfg.get('split_seed')}, n_test {data_cfg.get('n_test')})")
    else:
        grid = paper_grid() if settings.grid is None else _instantiate(settings.grid)
        d = generate(seq, grid, cache_dir=cache_dir, progress=False)
        atoms = torch.from_numpy(np.ascontiguousarray(d.atoms)).to(torch.complex64)
        params = np.asarray(d.params[:, :2], dtype=np.float64)
        del d
        keep = (torch.linalg.vector_norm(atoms, dim=1) > 0).numpy()
        ok = np.nonzero(keep)[0]
        perm = ok[np.random.default_rng(settings.split_seed).permutation(len(ok))]
        test_idx = np.sort(perm[:settings.n_test])
        gname = "paper grid" if settings.grid is None else settings.grid["_target_"]
        source = f"{gname}, split_seed {settings.split_seed}, {len(test_idx)} held out"
    train_mask = keep.copy()
    train_mask[test_idx] = False
    group.dictionary_atoms = atoms[torch.from_numpy(train_mask)]
    group.dictionary_params = torch.from_numpy(params[train_mask])
    rng = np.random.default_rng(settings.split_seed + 101)
    pick = np.sort(rng.choice(test_idx, size=min(settings.n_test, len(test_idx)),
                              replace=False))
    lo1, hi1 = params[keep, 0].min(), params[keep, 0].max()
    lo2, hi2 = params[keep, 1].min(), params[keep, 1].max()
    if "paper" in settings.test_sets:
        group.test["paper"] = (params[pick], atoms[torch.from_numpy(pick)])
    if "offgrid" in settings.test_sets:
        p_off = random_params(settings.n_test, t1_range=(max(lo1, 1e-3), hi1),
                              t2_range=(max(lo2, 1e-3), hi2), seed=settings.offgrid_seed)
        clean = simulate(seq, torch.from_numpy(p_off[:, 0]), torch.from_numpy(p_off[:, 1]))
        group.test["offgrid"] = (p_off, clean.to(torch.complex64))
    group.description = {
        "sequence": seq.name, "n_timepoints": len(seq), "data": source,
        "dictionary_atoms": int(train_mask.sum()), "held_out_atoms": int(len(test_idx)),
        "t1_range_ms": [float(lo1), float(hi1)], "t2_range_ms": [float(lo2), float(hi2)],
    }


# ============================================================================ evaluation
def _noisy(clean: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    from mrflight.physics import add_noise

    return add_noise(clean, std, generator=torch.Generator().manual_seed(seed))


def _errors(pred: np.ndarray, true: np.ndarray) -> dict:
    from torchmetrics.functional import mean_absolute_error, mean_squared_error

    out = {}
    p, t = torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(true, dtype=torch.float64)
    for i, name in enumerate(("t1", "t2")):
        ok = torch.isfinite(p[:, i])
        out[f"{name}_mae_ms"] = float(mean_absolute_error(p[ok, i], t[ok, i]))
        out[f"{name}_rmse_ms"] = float(mean_squared_error(p[ok, i], t[ok, i], squared=False))
    return out


class _Predictor:
    """One method: a callable ``(N, T) complex -> (N, 2) ms numpy`` plus timing."""

    def __init__(self, method: str, fn, run: str = "", checkpoint: str | None = None):
        self.method, self.fn, self.run, self.checkpoint = method, fn, run, checkpoint
        self.latency = (float("nan"), float("nan"))

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


def _predictors(group: _Group, settings: EvalSettings) -> list[_Predictor]:
    from mrflight.matching import DictionaryMatcher

    dev = torch.device(settings.device)
    preds = []
    for r in group.runs:
        module = r.module

        def net_fn(s, module=module):
            return module.predict_parameters(s, batch_size=settings.batch_size).cpu().numpy()

        preds.append(_Predictor(r.method, net_fn, r.label, str(r.ckpt)))
    kw = dict(complex_matching=settings.complex_matching, device=dev)
    exh = DictionaryMatcher(group.dictionary_atoms, group.dictionary_params, **kw)
    preds.append(_Predictor("matching", lambda s: exh.match(s.to(dev)).cpu().numpy()))
    if settings.svd_rank is not None:
        rank = min(int(settings.svd_rank), exh.length)
        svd = DictionaryMatcher(group.dictionary_atoms, group.dictionary_params, rank=rank, **kw)
        preds.append(_Predictor("matching_svd", lambda s: svd.match(s.to(dev)).cpu().numpy()))
    return preds


def evaluate_group(group: _Group, settings: EvalSettings, out_dir: Path, figures: dict,
                   arrays: dict) -> list[dict]:
    """Evaluate every method of a group on every test set and noise level; returns the rows."""
    from mrflight import plots
    from mrflight.physics.crb import crb

    predictors = _predictors(group, settings)
    rows = []
    first_set = next(iter(group.test))
    lat_signals = _noisy(group.test[first_set][1][:64], settings.noise_levels[0],
                         settings.noise_seed)
    for p in predictors:
        p.measure_latency(lat_signals, settings.latency_repeats)
    tag = "" if len(figures.get("_groups", [])) == 0 else f"_{len(figures['_groups'])}"
    figures.setdefault("_groups", []).append(group.key)
    for si, (set_name, (params, clean)) in enumerate(group.test.items()):
        n = len(params)
        bound_unit = None
        if settings.bound:
            rng = np.random.default_rng(settings.noise_seed + 1000 + si)
            nb = n if settings.bound_signals is None else min(int(settings.bound_signals), n)
            bsel = np.sort(rng.choice(n, size=nb, replace=False)) if nb < n else np.arange(n)
            t0 = time.perf_counter()
            bound_unit = crb(group.seq, torch.from_numpy(params[bsel, 0]),
                             torch.from_numpy(params[bsel, 1]), 1.0,
                             magnitude=settings.bound_magnitude).cpu().numpy()
            log.info("bound on %d %s signals: %.1f s", len(bsel), set_name,
                     time.perf_counter() - t0)
        for li, std in enumerate(settings.noise_levels):
            noisy = _noisy(clean, std, settings.noise_seed * 1000 + 10 * si + li)
            preds = {}
            crb_rms = None
            base = {"test_set": set_name, "noise_std": std, "n_signals": n,
                    "sequence": group.seq.name, "dictionary_atoms":
                        group.description["dictionary_atoms"]}
            if bound_unit is not None:
                b = bound_unit * std
                fin = np.isfinite(b).all(1)
                crb_rms = np.sqrt(np.mean(b[fin] ** 2, axis=0))
                crb_mae = np.sqrt(2 / np.pi) * np.mean(b[fin], axis=0)
            for p in predictors:
                pred, dt = p(noisy)
                key = p.method if not p.run else f"{p.method} [{p.run}]"
                preds[key] = pred
                log.info("%s: %s test set, noise %g, %d signals in %.2f s", key, set_name, std,
                         n, dt)
                row = {"method": p.method, "run": p.run, "checkpoint": p.checkpoint, **base,
                       **_errors(pred, params),
                       "ms_per_signal": 1e3 * dt / n,
                       "latency_ms_mean": p.latency[0], "latency_ms_std": p.latency[1],
                       "latency_repeats": settings.latency_repeats}
                for i, q in enumerate(("t1", "t2")):
                    ratio = None
                    if crb_rms is not None and crb_rms[i] > 0:
                        # same signals for both: the bound subset
                        e = pred[bsel][fin, i] - params[bsel][fin, i]
                        ratio = float(np.sqrt(np.nanmean(e**2)) / crb_rms[i])
                    row[f"{q}_rmse_over_crb"] = ratio
                rows.append(row)
            if bound_unit is not None:
                rows.append({"method": "crb", "run": "", "checkpoint": None, **base,
                             "n_signals": int(fin.sum()),
                             "t1_mae_ms": float(crb_mae[0]), "t1_rmse_ms": float(crb_rms[0]),
                             "t2_mae_ms": float(crb_mae[1]), "t2_rmse_ms": float(crb_rms[1]),
                             "ms_per_signal": None, "latency_ms_mean": None,
                             "latency_ms_std": None, "latency_repeats": None,
                             "t1_rmse_over_crb": 1.0, "t2_rmse_over_crb": 1.0})
            if settings.plots and std == settings.plot_noise_std:
                title = (f"{set_name} test set, noise std {std:g}, {group.seq.name} "
                         f"({len(group.seq)} points)")
                fig = plots.scatter_true_vs_pred(params, preds, title=title)
                figures[f"scatter_{set_name}_noise{std:g}{tag}"] = fig
                bound = None
                if bound_unit is not None:
                    # bound at every test signal is not computed: bin the subset instead
                    bound = np.full_like(params, np.nan)
                    bound[bsel] = bound_unit * std
                fig = _error_figure(params, preds, bound, title)
                figures[f"error_vs_t1_t2_{set_name}_noise{std:g}{tag}"] = fig
    if settings.phantoms:
        _phantoms(group, predictors, settings, out_dir, figures, arrays, tag)
    return rows


def _error_figure(params, preds, bound, title):
    from mrflight import plots

    return plots.error_vs_parameter(params, preds, bound, title=title)


def _phantoms(group, predictors, settings, out_dir: Path, figures: dict, arrays: dict, tag):
    from mrflight import phantoms as ph
    from mrflight import plots
    from mrflight.physics import normalize, simulate

    std = settings.phantom_noise_std
    std = settings.plot_noise_std if std is None else float(std)
    ranges = {"brain": ((0.0, 3500.0), (0.0, 300.0)), "nist": ((0.0, 2500.0), (0.0, 600.0))}
    for k, name in enumerate(settings.phantoms):
        log.info("%s phantom: reconstructing with %d methods", name, len(predictors))
        phantom = (ph.brain_phantom if name == "brain" else ph.nist_phantom)(
            settings.phantom_size)
        vox = phantom.params
        uniq, inv = np.unique(vox, axis=0, return_inverse=True)
        atoms = normalize(simulate(group.seq, torch.from_numpy(uniq[:, 0]),
                                   torch.from_numpy(uniq[:, 1])))
        m0 = torch.from_numpy(phantom.m0[phantom.mask]).to(torch.float32)
        clean = atoms[torch.from_numpy(inv.ravel())] * m0[:, None]
        gen = torch.Generator().manual_seed(settings.noise_seed * 7919 + k)
        noise = torch.complex(torch.randn(clean.shape, generator=gen),
                              torch.randn(clean.shape, generator=gen))
        signals = clean + std * noise
        maps = {}
        payload = {"truth_t1_ms": phantom.t1_ms, "truth_t2_ms": phantom.t2_ms,
                   "truth_m0": phantom.m0, "mask": phantom.mask, "labels": phantom.labels,
                   "outside_training_range": phantom.outside_range}
        for p in predictors:
            pred, _ = p(signals)
            key = p.method if not p.run else f"{p.method} [{p.run}]"
            mp = {"t1_ms": phantom.to_image(pred[:, 0]), "t2_ms": phantom.to_image(pred[:, 1])}
            maps[key] = mp
            safe = key.replace(" ", "_").replace("[", "").replace("]", "").replace("/", "_")
            payload[f"{safe}_t1_ms"] = mp["t1_ms"]
            payload[f"{safe}_t2_ms"] = mp["t2_ms"]
        payload["units"] = np.array(json.dumps({
            "*_t1_ms": "ms", "*_t2_ms": "ms", "truth_m0": "a.u.", "mask": "bool",
            "labels": "index into regions", "noise_std": "relative to unit-norm fingerprint"}))
        payload["regions"] = np.array(phantom.regions)
        payload["noise_std"] = np.array(std)
        arrays[f"phantoms/{name}{tag}.npz"] = payload
        if settings.plots:
            t1r, t2r = ranges[name]
            figures[f"phantom_{name}{tag}"] = plots.parameter_maps(
                {"t1_ms": phantom.t1_ms, "t2_ms": phantom.t2_ms}, maps, mask=phantom.mask,
                t1_range=t1r, t2_range=t2r, outside=phantom.outside_range,
                title=f"{name} phantom, noise std {std:g}")


# ============================================================================ outputs
_COLS = ["method", "run", "test_set", "noise_std", "n_signals", "t1_mae_ms", "t1_rmse_ms",
         "t2_mae_ms", "t2_rmse_ms", "ms_per_signal", "latency_ms_mean", "latency_ms_std",
         "latency_repeats", "t1_rmse_over_crb", "t2_rmse_over_crb", "sequence",
         "dictionary_atoms", "checkpoint"]


def _fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _load_note(info: dict) -> str:
    """How busy the machine was while the times were taken."""
    a, b = info.get("load_average_start"), info.get("load_average_end")
    if not a or not b:
        return ""
    cores = info.get("cores")
    note = (f"; machine load (1-min load average) {a[0]:.2f} at the start and {b[0]:.2f} at the "
            f"end, on {cores} cores")
    if cores and max(a[0], b[0]) > cores:
        note += " (more runnable threads than cores: the times are upper bounds)"
    return note


def _table_md(rows: list[dict], info: dict) -> str:
    lines = ["# mrflight evaluation", ""]
    for d in info.get("groups", []):
        lines.append(f"- sequence `{d['sequence']}` ({d['n_timepoints']} points); data: "
                     f"{d['data']}; training dictionary for matching: {d['dictionary_atoms']} "
                     f"atoms (the {d['held_out_atoms']} held-out test atoms removed)")
    lines += [
        "- time/signal: batched wall time of the whole test set divided by its size; latency: "
        "one signal per call, mean ± std over "
        f"{info.get('latency_repeats')} calls (different signals), on {info.get('device')} "
        f"({info.get('threads')} threads){_load_note(info)}",
        "- Cramér–Rao bound (crb): RMSE column = RMS of the per-signal bound on std(T1), "
        "std(T2) over "
        + ("all test signals" if info.get("bound_signals") is None else
           f"a random subset of {info.get('bound_signals')} test signals")
        + f" ({info.get('bound_kind')} data); MAE column = "
        "sqrt(2/pi) x mean bound; RMSE/CRB = a method's RMSE on the same signals over that RMS "
        "bound (< 1 is possible for biased estimators, e.g. at low SNR near the grid's edges)",
        ("- matching compares complex fingerprints (|<d, s>|)" if info.get("complex_matching")
         else "- matching compares magnitude fingerprints (the paper's baseline); the magnitude "
         "of a noisy sample is Rician-biased once the per-sample SNR, about 1 / (noise std x "
         "sqrt(T)), nears 1, which dominates its error at the higher noise levels "
         "(evaluation.complex_matching=true matches complex data instead)"),
        "",
    ]
    header = ("| method | T1 MAE (ms) | T1 RMSE (ms) | T2 MAE (ms) | T2 RMSE (ms) | "
              "time/signal (ms, batched) | latency (ms, single signal, mean ± std) | "
              "T1 RMSE/CRB | T2 RMSE/CRB |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    keys = []
    for r in rows:
        k = (r["test_set"], r["noise_std"])
        if k not in keys:
            keys.append(k)
    names = {"paper": "paper (held-out grid atoms)", "offgrid": "off-grid (continuous random)"}
    for ts, std in keys:
        block = [r for r in rows if r["test_set"] == ts and r["noise_std"] == std]
        lines += [f"## Test set: {names.get(ts, ts)}, noise std {std:g}, "
                  f"{max(r['n_signals'] for r in block)} signals", "", header, sep]
        for r in block:
            label = _LABELS.get(r["method"], r["method"]) + (f" [{r['run']}]" if r["run"] else "")
            lat = ("–" if r["latency_ms_mean"] is None else
                   f"{r['latency_ms_mean']:.3f} ± {r['latency_ms_std']:.3f}")
            lines.append(f"| {label} | {_fmt(r['t1_mae_ms'])} | {_fmt(r['t1_rmse_ms'])} | "
                         f"{_fmt(r['t2_mae_ms'])} | {_fmt(r['t2_rmse_ms'])} | "
                         f"{_fmt(r['ms_per_signal'], 3)} | {lat} | "
                         f"{_fmt(r['t1_rmse_over_crb'])} | {_fmt(r['t2_rmse_over_crb'])} |")
        lines.append("")
    lines += ["## Reference: Oksuz et al. 2019, Table 1 (as reported, not recomputed)", "",
              "Their sequence, noise level and hardware; time per signal on their machine.", "",
              "| method | T1 MAE (ms) | T1 RMSE (ms) | T2 MAE (ms) | T2 RMSE (ms) | "
              "time/signal (ms) |", "|---|---|---|---|---|---|"]
    for r in PAPER_TABLE1:
        lines.append(f"| {r['label']} (reference) | {r['t1_mae_ms']:.2f} | {r['t1_rmse_ms']:.2f}"
                     f" | {r['t2_mae_ms']:.2f} | {r['t2_rmse_ms']:.2f} | "
                     f"{r['ms_per_signal']:.0f} |")
    return "\n".join(lines) + "\n"


def _table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["source"] + _COLS)
    for r in rows:
        w.writerow(["mrflight"] + ["" if r.get(c) is None else r.get(c) for c in _COLS])
    for r in PAPER_TABLE1:
        ref = {**{c: "" for c in _COLS}, **{k: v for k, v in r.items() if k in _COLS}}
        ref["test_set"] = "paper"
        w.writerow(["Oksuz et al. 2019 Table 1 (reference)"] + [ref[c] for c in _COLS])
    return buf.getvalue()


def _clean_json(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _clean_json(obj.item())
    return obj


def write_outputs(out_dir: Path, rows: list[dict], info: dict, figures: dict,
                  arrays: dict) -> dict[str, Path]:
    """Write metrics.json, table.md, table.csv, figures/*.png and arrays atomically."""
    from mrflight import plots

    out_dir = Path(out_dir)
    files = {}

    def write_text(name, text):
        with atomic_path(out_dir / name) as tmp:
            Path(tmp).write_text(text)
        files[name] = out_dir / name

    write_text("metrics.json", json.dumps(_clean_json(
        {"units": {"*_ms": "ms", "noise_std": "relative to the unit-norm fingerprint",
                   "latency": "single-signal call, mean and std over latency_repeats calls"},
         "info": info, "rows": rows}), indent=2) + "\n")
    write_text("table.md", _table_md(rows, info))
    write_text("table.csv", _table_csv(rows))
    for name, fig in figures.items():
        if name.startswith("_"):
            continue
        path = out_dir / "figures" / f"{name}.png"
        plots.save_figure(fig, path)
        files[f"figures/{name}.png"] = path
    for name, payload in arrays.items():
        path = out_dir / name
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **payload)
        files[name] = path
    return files


def _log_to_loggers(loggers, rows, figures, table_md) -> None:
    if not loggers:
        return
    from mrflight import plots

    cols = [c for c in _COLS if c != "checkpoint"]
    data = [[_clean_json(r.get(c)) for c in cols] for r in rows]
    for lg in loggers:
        if hasattr(lg, "log_table"):
            lg.log_table(key="eval/table", columns=cols, data=data)
        if hasattr(lg, "log_text"):
            try:
                lg.log_text(key="eval/table_md", columns=["markdown"], data=[[table_md]])
            except Exception as e:  # noqa: BLE001 - optional extra
                log.debug("log_text failed: %s", e)
        if hasattr(lg, "log_image"):
            for name, fig in figures.items():
                if not name.startswith("_"):
                    lg.log_image(key=f"eval/{name}", images=[plots.figure_to_array(fig)])
        if hasattr(lg, "log_metrics"):
            lg.log_metrics(_flat_metrics(rows))
        if hasattr(lg, "save"):
            lg.save()


def _flat_metrics(rows) -> dict:
    """``{"eval/<test set>/<noise>/<method>[run]/<metric>": value}`` of the finite errors."""
    flat = {}
    for r in rows:
        pre = f"eval/{r['test_set']}/{r['noise_std']:g}/{r['method']}"
        pre += f"[{r['run']}]" if r["run"] else ""
        for q in ("t1_mae_ms", "t1_rmse_ms", "t2_mae_ms", "t2_rmse_ms"):
            if r[q] is not None and math.isfinite(r[q]):
                flat[f"{pre}/{q}"] = r[q]
    return flat


def _finish(loggers, rows=()) -> None:
    from mrflight.loggers import finish_loggers

    finish_loggers(loggers, _flat_metrics(rows))  # the errors in the W&B run summary too


# ============================================================================ entry point
def run(cfg):
    """Body of ``python eval.py`` (see the module docstring).

    With ``input=PATH`` the call is delegated to :func:`mrflight.maps.run_maps` (maps of an
    image series). Otherwise returns the list of metric rows written to ``metrics.json``.
    """
    if cfg.get("input"):
        from mrflight.maps import run_maps

        return run_maps(cfg)
    if cfg.get("export"):
        from mrflight.export import export_checkpoints

        files = export_checkpoints(cfg.get("ckpt_path"), str(cfg.export),
                                   Path(str(cfg.paths.output_dir)))
        for f in files:
            log.info("exported %s", f)
        return files
    import matplotlib.pyplot as plt
    from omegaconf import OmegaConf

    import mrflight

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    node = cfg.get("evaluation")
    settings = (EvalSettings() if node is None else
                _instantiate(node, _convert_="all", _recursive_=False) if "_target_" in node else
                EvalSettings(**OmegaConf.to_container(node, resolve=True)))
    out_dir = Path(str(cfg.paths.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cfg.paths.get("cache_dir") if cfg.get("paths") else None

    groups: dict[str, _Group] = {}
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        root = Path(str(ckpt_path)).expanduser()
        for ck in find_checkpoints(root):
            run_dir, rcfg = _run_config(ck)
            module = mrflight.load_checkpoint(str(ck), map_location=settings.device)
            seq_dict = module.hparams.get("sequence")
            if rcfg is not None and rcfg.get("sequence"):
                seq = _instantiate(OmegaConf.create(rcfg["sequence"]))
            elif seq_dict:
                from mrflight.physics import Sequence

                seq = Sequence.from_dict(seq_dict)
            else:
                seq = _instantiate(cfg.sequence)
            data_cfg = None
            if rcfg is not None and rcfg.get("data"):
                # the saved config is resolved; an unresolved cache_dir falls back to ours
                data_cfg = dict(rcfg["data"])
                if "${" in str(data_cfg.get("cache_dir", "")):
                    data_cfg["cache_dir"] = str(cache_dir) if cache_dir else None
            else:
                log.warning("no config.yaml beside %s: using the eval grid and split", ck)
            key = _data_key(seq, data_cfg, settings.split_seed)
            rel = run_dir.relative_to(root) if run_dir.is_relative_to(root) else run_dir
            r = _Run(ck, run_dir, rcfg, module, _method_of(module),
                     "" if str(rel) == "." else str(rel))
            g = groups.setdefault(key, _Group(seq, key, []))
            g.runs.append(r)
            g.description["data_cfg"] = data_cfg
    if not groups:
        seq = _instantiate(cfg.sequence)
        key = _data_key(seq, None, settings.split_seed)
        groups[key] = _Group(seq, key, [])
        groups[key].description["data_cfg"] = None

    rows, figures, arrays = [], {}, {}
    infos = []
    load_start = _load_average()
    for g in groups.values():
        data_cfg = g.description.pop("data_cfg", None)
        t0 = time.perf_counter()
        _build_group_data(g, data_cfg, settings, cache_dir)
        log.info("test data for %s: %.1f s", g.seq.name, time.perf_counter() - t0)
        rows += evaluate_group(g, settings, out_dir, figures, arrays)
        infos.append(g.description)
    info = {"groups": infos, "settings": asdict(settings),
            "latency_repeats": settings.latency_repeats, "device": settings.device,
            "threads": torch.get_num_threads(), "bound_signals": settings.bound_signals,
            "cores": os.cpu_count(), "load_average_start": load_start,
            "load_average_end": _load_average(),
            "bound_kind": "magnitude" if settings.bound_magnitude else "complex",
            "complex_matching": settings.complex_matching,
            "mrflight_version": mrflight.__version__}
    files = write_outputs(out_dir, rows, info, figures, arrays)
    from mrflight.loggers import build_eval_loggers, eval_runs

    loggers = build_eval_loggers(cfg, eval_runs(groups.values()), asdict(settings))
    try:
        _log_to_loggers(loggers, rows, figures, (out_dir / "table.md").read_text())
    finally:
        _finish(loggers, rows)
        for name, fig in figures.items():
            if not name.startswith("_"):
                plt.close(fig)
    log.info("evaluation written to %s (%d files)", out_dir, len(files))
    print((out_dir / "table.md").read_text())
    return rows
