"""Evaluation: every method on the same noisy test signals, beside the Cramér–Rao bound.

``python eval.py [ckpt_path=PATH] [evaluation.n_test=...] [evaluation.noise_levels=[...]]``
calls :func:`run`. ``PATH`` may be a checkpoint file, a training run directory or a multirun
directory: every run found is evaluated (its best checkpoint by the recorded validation score,
see :mod:`mrflight.checkpoints`) with the run's own saved ``config.yaml`` (sequence, data grid
and split). Without a checkpoint, dictionary
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

from mrflight.checkpoints import find_checkpoints
from mrflight.config import instantiate
from mrflight.fileio import atomic_path
from mrflight.transforms import split_indices

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
    """What ``eval.py`` evaluates (``mrflight/configs/eval.yaml``, node ``evaluation``).

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
        phantom_size: phantom image side in pixels (>= 16 for the brain, >= 32 for the NIST
            phantom). The phantom signals are simulated, noised and estimated in blocks of
            bounded memory; the maps themselves (about 0.5 kB per pixel and phantom with every
            method and the figures) must fit in the available memory, else the size is refused
            before the evaluation starts.
        phantom_noise_std: noise of the phantom signals (``None``: the level nearest 0.01).
        plots: write figures.
        batch_size: batch size of network inference.
        device: ``"cpu"`` or ``"cuda"``.
        grid: the dictionary grid used when no run config gives one: a config node
            ``{"_target_": ..., **kwargs}`` returning ``(M, 2)`` T1, T2 in ms (``None``:
            :func:`mrflight.dictionary.paper_grid`).
        efficiency: the efficiency report (:func:`mrflight.efficiency.efficiency_report`): bias,
            std, RMSE and their ratios to the bound on an 8 x 8 T1-T2 grid (x B1 0.8, 1.0, 1.2
            when a model estimates B1) with ``efficiency_realizations`` noise draws per point at
            ``efficiency_noise_std``.
        offgrid_b1: the continuous test set with B1 in [0.8, 1.2], proton density 0.5-1.0
            and a global phase per signal (``offgrid_b1_signals`` signals at noise 0.01),
            against the bound with T1, T2, B1 and the complex scale unknown.
        robustness: the robustness table (:func:`mrflight.efficiency.robustness_report`).
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
    efficiency: bool = True
    efficiency_realizations: int = 200
    efficiency_noise_std: float = 0.01
    offgrid_b1: bool = True
    offgrid_b1_signals: int = 2000
    robustness: bool = True

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
        if self.bound_signals is not None and not _is_int(self.bound_signals, 1):
            raise ValueError(f"evaluation.bound_signals must be null (the bound for every test "
                             f"signal) or an integer >= 1, got {self.bound_signals!r}")
        if self.phantom_noise_std is not None and not (
                0 <= float(self.phantom_noise_std) < math.inf):
            raise ValueError(f"evaluation.phantom_noise_std must be null or a finite number "
                             f">= 0, got {self.phantom_noise_std!r}")
        if self.phantoms:
            self._check_phantom_size()
        self.n_test = int(self.n_test)
        if int(self.efficiency_realizations) < 2:
            raise ValueError(f"evaluation.efficiency_realizations must be >= 2, got "
                             f"{self.efficiency_realizations}")
        if not (self.efficiency_noise_std > 0 and math.isfinite(self.efficiency_noise_std)):
            raise ValueError(f"evaluation.efficiency_noise_std must be > 0, got "
                             f"{self.efficiency_noise_std}")
        if int(self.offgrid_b1_signals) < 2:
            raise ValueError(f"evaluation.offgrid_b1_signals must be >= 2, got "
                             f"{self.offgrid_b1_signals}")

    def _check_phantom_size(self) -> None:
        low = 32 if "nist" in self.phantoms else 16
        size = self.phantom_size
        if not _is_int(size, low):
            which = "the NIST phantom draws" if low == 32 else "the brain phantom draws"
            raise ValueError(f"evaluation.phantom_size must be an integer >= {low} ({which} "
                             f"at least {low} x {low} pixels), got {size!r}")
        need = int(size) ** 2 * _BYTES_PER_PIXEL * len(self.phantoms)
        free = _available_memory()
        if free is not None and need > free:
            raise ValueError(
                f"evaluation.phantom_size={size} needs about {need / 2**30:.1f} GiB for the "
                f"phantom maps ({len(self.phantoms)} phantom(s) of {size} x {size} pixels) but "
                f"{free / 2**30:.1f} GiB are available: lower evaluation.phantom_size (64 to "
                "512 shows the maps well) or set evaluation.phantoms=[]")

    @property
    def plot_noise_std(self) -> float:
        return min(self.noise_levels, key=lambda x: abs(math.log((x + 1e-12) / 0.01)))


def _is_int(v, low: int) -> bool:
    """``v`` is an integer (not a bool) >= ``low``."""
    if isinstance(v, bool):
        return False
    try:
        return float(v).is_integer() and int(v) >= low
    except (TypeError, ValueError, OverflowError):
        return False


def _available_memory() -> int | None:
    """Memory available to a new allocation, bytes (``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ============================================================================ checkpoints
@dataclass
class _Run:
    ckpt: Path
    run_dir: Path
    config: dict | None
    module: object = None
    method: str = ""
    label: str = ""


def _run_config(ckpt: Path) -> tuple[Path, dict | None]:
    """The run directory and its resolved config (``checkpoints/config.yaml`` or
    ``.hydra/config.yaml``), or ``None``. The ``_target_``s of its ``sequence`` and ``data``
    (what evaluation builds from it) must be mrflight's."""
    from omegaconf import OmegaConf

    from mrflight.checkpoints import run_config_path, run_dir_of

    run_dir = run_dir_of(ckpt)
    c = run_config_path(run_dir)
    if c is None:
        return run_dir, None
    rcfg = OmegaConf.to_container(OmegaConf.load(c), resolve=False)
    for node in ("sequence", "data"):
        _check_targets(rcfg.get(node), f"{c}: {node}")
    return run_dir, rcfg


def _check_targets(node, where: str) -> None:
    if isinstance(node, dict):
        t = node.get("_target_")
        if t is not None and not str(t).startswith("mrflight."):
            raise ValueError(f"{where} names {t!r}: only mrflight classes and functions are "
                             "built from a run's saved config")
        for v in node.values():
            _check_targets(v, where)
    elif isinstance(node, list):
        for v in node:
            _check_targets(v, where)


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


def _build_group_data(group: _Group, data_cfg: dict | None, settings: EvalSettings,
                      cache_dir) -> None:
    """Fill the training dictionary and the test sets of a group."""
    from mrflight.dictionary import generate, paper_grid, random_params
    from mrflight.physics import simulate

    seq = group.seq
    if data_cfg is not None and "SimulatedDataModule" in str(data_cfg.get("_target_", "")):
        data_cfg = None  # trained on fresh simulated data: no stored grid to hold out from
    if data_cfg is not None:
        # the run's own split, reproduced by its datamodule
        dm = instantiate(data_cfg, sequence=seq, progress=False)
        atoms, params, keep, splits = dm.load_splits()  # one load, no training datasets
        params, keep = params.numpy(), keep.numpy()
        test_idx = splits["test"].numpy()
        source = (f"run data config ({data_cfg.get('_target_', '?')}, split_seed "
                  f"{data_cfg.get('split_seed')}, n_test {data_cfg.get('n_test')})")
    else:
        grid = paper_grid() if settings.grid is None else instantiate(settings.grid)
        d = generate(seq, grid, cache_dir=cache_dir, progress=False)
        atoms = torch.from_numpy(np.ascontiguousarray(d.atoms)).to(torch.complex64)
        params = np.asarray(d.params[:, :2], dtype=np.float64)
        del d
        keep = (torch.linalg.vector_norm(atoms, dim=1) > 0).numpy()
        ok = np.nonzero(keep)[0]
        test_idx = split_indices(ok, settings.split_seed, settings.n_test)["test"]
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


#: bound on the phantom signals held at once (clean, noise and noisy blocks), bytes
_PHANTOM_BLOCK_BYTES = 64 * 2**20
#: bytes per (voxel, time point) of one phantom block: complex64 clean, noise (two float32
#: draws and their complex), noisy, plus a method's working copy
_BYTES_PER_SAMPLE = 40
#: bytes per pixel of one phantom that stay in memory until the outputs are written (truth
#: maps, labels, masks, the T1/T2 maps of every method, the figures), rounded up from the peak
#: RSS measured with six methods and plots (about 400 per phantom at sizes 1024 and 2048);
#: used to refuse sizes that cannot fit
_BYTES_PER_PIXEL = 128 + 48 * len(METHODS)


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
        uniq, inv = np.unique(phantom.params, axis=0, return_inverse=True)  # a few tissues
        inv = torch.from_numpy(inv.ravel())
        atoms = normalize(simulate(group.seq, torch.from_numpy(uniq[:, 0]),
                                   torch.from_numpy(uniq[:, 1])))
        m0 = torch.from_numpy(phantom.m0[phantom.mask]).to(torch.float32)
        # signals are simulated, noised and estimated block by block: memory is bounded by
        # _PHANTOM_BLOCK_BYTES whatever the phantom size, not 8 bytes x voxels x time points
        rows = max(1, _PHANTOM_BLOCK_BYTES // (_BYTES_PER_SAMPLE * len(group.seq)))
        gen = torch.Generator().manual_seed(settings.noise_seed * 7919 + k)
        estimates = {id(p): np.empty((len(inv), 2)) for p in predictors}
        for start in range(0, len(inv), rows):
            blk = slice(start, start + rows)
            clean = atoms[inv[blk]] * m0[blk, None]
            noise = torch.complex(torch.randn(clean.shape, generator=gen),
                                  torch.randn(clean.shape, generator=gen))
            signals = clean + std * noise
            del clean, noise
            for p in predictors:
                estimates[id(p)][blk] = p(signals)[0]
            del signals
        maps = {}
        payload = {"truth_t1_ms": phantom.t1_ms, "truth_t2_ms": phantom.t2_ms,
                   "truth_m0": phantom.m0, "mask": phantom.mask, "labels": phantom.labels,
                   "outside_training_range": phantom.outside_range}
        for p in predictors:
            pred = estimates.pop(id(p))
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


def _estimators(group: _Group, settings: EvalSettings) -> tuple[dict, dict]:
    """Networks of a group as estimators ``(N, T) -> (N, P)``, and their training noise."""
    est, noise = {}, {}
    for r in group.runs:
        name = r.method if not r.label else f"{r.method} [{r.label}]"

        def fn(s, module=r.module):
            return module.predict_parameters(s, batch_size=settings.batch_size).numpy()

        est[name] = fn
        ns = r.module.hparams.get("noise_std")
        lo, hi = (ns, ns) if not isinstance(ns, (list, tuple)) else ns
        noise[name] = (float(lo or 0.01), float(hi or 0.01))
    return est, noise


def _bound_reports(group: _Group, settings: EvalSettings, figures: dict) -> dict:
    """The efficiency, off-grid B1 and robustness reports of a group's networks."""
    from mrflight import efficiency as eff
    from mrflight.phantoms import tissue_values

    est, noise = _estimators(group, settings)
    if not est:
        return {}
    out: dict = {}
    with_b1 = any("b1" in getattr(r.module, "targets", ()) for r in group.runs)
    if settings.efficiency:
        t0 = time.perf_counter()
        pts = eff.efficiency_grid(b1=(0.8, 1.0, 1.2) if with_b1 else (1.0,))
        rows = eff.efficiency_report(group.seq, est, pts, settings.efficiency_noise_std,
                                     settings.efficiency_realizations, settings.noise_seed)
        out["efficiency"] = rows
        out["efficiency_summary"] = eff.summarise(rows)
        if settings.plots:
            from mrflight import plots

            figures[f"efficiency_{group.seq.name}"] = plots.efficiency_map(rows)
        log.info("efficiency report (%d points): %.1f s", len(pts), time.perf_counter() - t0)
    if settings.offgrid_b1:
        out["offgrid_b1"] = eff.offgrid_report(group.seq, est, settings.offgrid_b1_signals,
                                               0.01, settings.offgrid_seed)
    if settings.robustness:
        # tissues inside the default prior, off its edges (skull's T2 of 5 ms is its lower end)
        tis = {k: v for k, v in tissue_values().items()
               if 10 <= v["t2_ms"] <= 500 and v["t1_ms"] <= 4000}
        out["robustness"] = eff.robustness_report(group.seq, est, noise, tis,
                                                  seed=settings.noise_seed)
    return out


def _reports_md(extra: dict) -> str:
    """Markdown sections of the efficiency, off-grid B1 and robustness reports."""
    parts = []
    if extra.get("efficiency_summary"):
        parts.append("\n## Efficiency: median over the T1-T2(-B1) grid of std/CRB and RMSE/CRB"
                     "\n\n| method | points | T1 std/CRB | T1 RMSE/CRB | T2 std/CRB | T2 RMSE/CRB"
                     " | B1 std/CRB | B1 RMSE/CRB |\n|---|---|---|---|---|---|---|---|")
        for r in extra["efficiency_summary"]:
            cells = [_fmt(r.get(f"{q}_{m}_median")) for q in ("t1", "t2", "b1")
                     for m in ("std_over_crb", "rmse_over_crb")]
            parts.append(f"| {r['method']} | {r['points']} | " + " | ".join(cells) + " |")
    if extra.get("offgrid_b1"):
        parts.append("\n## Continuous tissues with B1 0.8-1.2, proton density 0.5-1.0, random "
                     "phase (noise 0.01)\n\n| method | T1 RMSE ms | T1 RMSE/CRB | T2 RMSE ms | "
                     "T2 RMSE/CRB | B1 RMSE % | B1 RMSE/CRB |\n|---|---|---|---|---|---|---|")
        for r in extra["offgrid_b1"]:
            parts.append(f"| {r['method']} | {_fmt(r.get('t1_rmse_ms'))} | "
                         f"{_fmt(r.get('t1_rmse_over_crb'))} | {_fmt(r.get('t2_rmse_ms'))} | "
                         f"{_fmt(r.get('t2_rmse_over_crb'))} | {_fmt(r.get('b1_rmse_pct'))} | "
                         f"{_fmt(r.get('b1_rmse_over_crb'))} |")
    rob = extra.get("robustness") or []
    if rob:
        parts.append("\n## Robustness: conditions outside training\n\n| method | condition | "
                     "noise | B1 | T1 RMSE ms | T1 median bias % | T2 RMSE ms | T2 median bias % "
                     "|\n|---|---|---|---|---|---|---|---|")
        for r in rob:
            if r["condition"] != "tissue_pd":
                parts.append(f"| {r['method']} | {r['condition']} | {r['noise_std']:.4g} | "
                             f"{r['b1']:g} | {_fmt(r['t1_rmse_ms'])} | {_fmt(r['t1_bias_pct'])} "
                             f"| {_fmt(r['t2_rmse_ms'])} | {_fmt(r['t2_bias_pct'])} |")
        parts.append("\n| method | tissue | proton density | T1 median error % | "
                     "T2 median error % |\n|---|---|---|---|---|")
        for r in rob:
            if r["condition"] == "tissue_pd":
                parts.append(f"| {r['method']} | {r['tissue']} | {r['pd']:g} | "
                             f"{_fmt(r['t1_median_error_pct'])} | "
                             f"{_fmt(r['t2_median_error_pct'])} |")
    return "\n".join(parts) + ("\n" if parts else "")


def write_outputs(out_dir: Path, rows: list[dict], info: dict, figures: dict,
                  arrays: dict, extra: dict | None = None) -> dict[str, Path]:
    """Write metrics.json, table.md, table.csv, figures/*.png and arrays atomically.

    ``extra``: the efficiency, off-grid B1 and robustness reports (lists of rows), written as
    keys of ``metrics.json`` beside ``rows`` and as sections of ``table.md``.
    """
    extra = {k: v for k, v in (extra or {}).items() if v}
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
         "info": info, "rows": rows, **extra}), indent=2) + "\n")
    write_text("table.md", _table_md(rows, info) + _reports_md(extra))
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
def _settings(node) -> EvalSettings:
    """The :class:`EvalSettings` of a config node, checked (a bad value raises its own
    ``ValueError``, naming the setting, before any work)."""
    from hydra.errors import InstantiationException
    from omegaconf import OmegaConf

    if node is None:
        return EvalSettings()
    if "_target_" not in node:
        return EvalSettings(**OmegaConf.to_container(node, resolve=True))
    try:
        return instantiate(node, _convert_="all", _recursive_=False)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise


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
    settings = _settings(node)
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
                seq = instantiate(OmegaConf.create(rcfg["sequence"]))
            elif seq_dict:
                from mrflight.physics import Sequence

                seq = Sequence.from_dict(seq_dict)
            else:
                seq = instantiate(cfg.sequence)
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
        seq = instantiate(cfg.sequence)
        key = _data_key(seq, None, settings.split_seed)
        groups[key] = _Group(seq, key, [])
        groups[key].description["data_cfg"] = None

    rows, figures, arrays = [], {}, {}
    infos, reports = [], []
    load_start = _load_average()
    for g in groups.values():
        data_cfg = g.description.pop("data_cfg", None)
        t0 = time.perf_counter()
        _build_group_data(g, data_cfg, settings, cache_dir)
        log.info("test data for %s: %.1f s", g.seq.name, time.perf_counter() - t0)
        rows += evaluate_group(g, settings, out_dir, figures, arrays)
        infos.append(g.description)
        reports.append(_bound_reports(g, settings, figures))
    info = {"groups": infos, "settings": asdict(settings),
            "latency_repeats": settings.latency_repeats, "device": settings.device,
            "threads": torch.get_num_threads(), "bound_signals": settings.bound_signals,
            "cores": os.cpu_count(), "load_average_start": load_start,
            "load_average_end": _load_average(),
            "bound_kind": "magnitude" if settings.bound_magnitude else "complex",
            "complex_matching": settings.complex_matching,
            "mrflight_version": mrflight.__version__}
    extra = {k: [r for rep in reports for r in rep.get(k, [])]
             for k in ("efficiency", "efficiency_summary", "offgrid_b1", "robustness")}
    files = write_outputs(out_dir, rows, info, figures, arrays, extra)
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
