"""Test data of a group of runs: the training dictionary (grid minus the test split) and the
``paper`` (held-out grid atoms) and ``offgrid`` (continuous random) test sets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrflight.config import instantiate
from mrflight.evaluation.settings import EvalSettings
from mrflight.transforms import split_indices

__all__ = ["Group", "data_key", "build_group_data"]


@dataclass
class Group:
    """Runs sharing one sequence, dictionary and split, and their test data.

    Attributes:
        seq: the sequence of the runs.
        key: what the runs share (:func:`data_key`).
        runs: the :class:`~mrflight.evaluation.runs.Run` of each checkpoint (none: matching and
            the bound only).
        data_cfg: the runs' saved ``data`` config (their split), or ``None`` (the eval grid).
        dictionary_atoms, dictionary_params: the training dictionary (grid minus test split).
        test: ``{set: (params (N, 2) float64, clean complex (N, T))}``.
        test_b1: ``{set: (N,) float64}``, the B1 of a set's atoms where it is not 1 (a run's
            dictionary file with a B1 column): the bound is computed at it, B1 unknown.
        description: what the test data is (``metrics.json``'s ``info.groups``).
        index: the group's place in the evaluation (0, 1 ...): its rows' ``group``, and the
            suffix ``_<index>`` of its figures and phantom arrays after the first (:attr:`tag`).
    """

    seq: object
    key: str
    runs: list
    data_cfg: dict | None = None
    dictionary_atoms: torch.Tensor = None
    dictionary_params: torch.Tensor = None
    test: dict = field(default_factory=dict)
    test_b1: dict = field(default_factory=dict)
    description: dict = field(default_factory=dict)
    index: int = 0

    @property
    def tag(self) -> str:
        """The suffix of the group's figure and phantom file names: none for the first."""
        return f"_{self.index}" if self.index else ""


#: the data settings that define a stored-data run's test split (what its group shares)
SPLIT_KEYS = ("_target_", "params", "path", "split_seed", "n_test", "n_train", "val_fraction")


def data_key(seq, data_cfg: dict | None, split_seed: int) -> str:
    """What groups runs: their sequence and test split (the data settings that define it; the
    training noise, batch size or loader workers of a sweep do not split it into groups, and
    runs on fresh simulated data share the eval grid's split)."""
    if data_cfg is not None and "SimulatedDataModule" in str(data_cfg.get("_target_", "")):
        data_cfg = None
    split = None if data_cfg is None else {k: data_cfg.get(k) for k in SPLIT_KEYS}
    return json.dumps({"seq": seq.fingerprint(), "data": split, "split": split_seed},
                      sort_keys=True, default=str)


def _run_split(seq, data_cfg: dict):
    """The run's own split, reproduced by its data module: ``(atoms, params, keep, test_idx,
    source, b1)`` (``b1``: the B1 of every atom, or ``None`` when the dictionary has none)."""
    dm = instantiate(data_cfg, sequence=seq, progress=False)
    atoms, params, keep, splits = dm.load_splits()  # one load, no training datasets
    source = (f"run data config ({data_cfg.get('_target_', '?')}, split_seed "
              f"{data_cfg.get('split_seed')}, n_test {data_cfg.get('n_test')})")
    return atoms, params.numpy(), keep.numpy(), splits["test"].numpy(), source, dm.atom_b1


def _grid_split(seq, settings: EvalSettings, cache_dir):
    """The eval grid (``settings.grid``, else the paper's) and a seeded test split of
    ``n_test`` atoms: ``(atoms, params, keep, test_idx, source, None)``."""
    from mrflight.dictionary import generate, paper_grid

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
    return atoms, params, keep, test_idx, source, None


def _check_data_file(data_cfg: dict, group: Group) -> None:
    """A run trained on a dictionary file (``data=file``) is tested on its own held-out split of
    that file: a file moved since is named with the runs' configs that point to it (eval.py
    has no ``data.path`` of its own to set)."""
    path = data_cfg.get("path")
    if path is None or Path(str(path)).expanduser().exists():
        return
    configs = ", ".join(sorted({str(r.ckpt.parent / "config.yaml") for r in group.runs}))
    raise ValueError(f"the training dictionary data.path={str(path)!r} of the run(s) evaluated "
                     f"does not exist: eval.py tests a run on its own held-out split of that "
                     f"file; put it back, or set data.path in {configs or 'the run config'}")


def build_group_data(group: Group, data_cfg: dict | None, settings: EvalSettings,
                     cache_dir) -> None:
    """Fill the training dictionary and the test sets of a group: the split of ``data_cfg``
    (a run's saved data config) or, without one, of the eval grid."""
    from mrflight.dictionary import random_params
    from mrflight.physics import simulate

    seq = group.seq
    if data_cfg is not None and "SimulatedDataModule" in str(data_cfg.get("_target_", "")):
        data_cfg = None  # trained on fresh simulated data: no stored grid to hold out from
    if data_cfg is not None:
        _check_data_file(data_cfg, group)
    atoms, params, keep, test_idx, source, b1 = (
        _grid_split(seq, settings, cache_dir) if data_cfg is None else _run_split(seq, data_cfg))
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
        if b1 is not None and np.any(b1[pick] != 1):
            group.test_b1["paper"] = b1[pick]
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
