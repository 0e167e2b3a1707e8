"""``FingerprintDataModule``: stored fingerprints (simulated once and cached, or loaded from a
dictionary file), seeded splits, the noise model.

Sources (chosen by config, ``mrflight/configs/data/``):

* ``params``: an ``(M, 2)`` array of T1/T2 in ms (e.g. :func:`mrflight.dictionary.paper_grid`,
  the default, or :func:`mrflight.dictionary.random_params`), simulated for the run's sequence
  with :func:`mrflight.dictionary.generate` (cached on disk in ``cache_dir``);
* ``path``: a dictionary file (``.h5``, ``.npz``, ``.mat``) made elsewhere
  (:func:`mrflight.dictionary.load`); its length must match the sequence.

Splits (reproducible, seeded by ``split_seed``): the atoms with a non-zero fingerprint are
shuffled with ``numpy.random.default_rng(split_seed)``; the first ``n_test`` form the **test**
split, the next ``n_train`` the **training part** (all the rest when ``n_train`` is null), and the
first ``round(val_fraction * n_train)`` of the training part form the **validation** split, the
remainder the **train** split. The paper's protocol is ``n_train=100000, n_test=5000``.
Atoms that share a T1/T2 pair (a dictionary file with a B1 column, or duplicated rows) are
split as one: the pairs are shuffled instead of the atoms, the sizes count pairs, and every
atom of a pair lands in the pair's split (with every pair once, the split is the same).

Noise (:func:`mrflight.physics.add_noise`, the model used everywhere): the complex fingerprint is
L2-normalised and complex Gaussian noise of std ``noise_std`` is added to its real and imaginary
parts. Training batches carry the clean normalised complex fingerprints and get **fresh noise in
every batch** in :meth:`FingerprintDataModule.on_after_batch_transfer` (so on the training device,
on every DDP rank). That noise and the training shuffle are functions of ``(seed, epoch, batch
index, rank)`` alone (:func:`~mrflight.data.batches.stream_seed`), not of a global random
state, so a run resumed from a checkpoint draws exactly the batches and the noise the
uninterrupted run would have drawn.
Validation and test inputs are drawn **once** with a ``torch.Generator``
seeded by ``(noise_seed, split)`` so the noise of every index is fixed for a given seed.

Inputs (:func:`preprocess`): ``input_mode="magnitude"`` (the paper's): the magnitude of the noisy
fingerprint, L2-normalised, ``(B, T)``; ``input_mode="complex"``: the noisy fingerprint
L2-normalised, as two channels (real, imaginary), ``(B, 2, T)``.

Targets: ``params_ms / target_scale_ms`` (default scales T1 4000 ms, T2 500 ms, so the grid lies
in [0, 1]); batches also carry the parameters in ms for the metrics.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mrflight.physics import Sequence, add_noise, normalize
from mrflight.transforms import (
    DEFAULT_TARGET_SCALE_MS,
    INPUT_MODES,
    label_groups,
    preprocess,
    split_indices,
)

from .batches import (
    Batch,
    ModelInputs,
    TrainingSeed,
    collate,
    eval_sampler,
    loader_context,
    stream_seed,
    training_epoch,
)

__all__ = ["FingerprintDataset", "FingerprintDataModule", "EpochShuffleSampler"]

class FingerprintDataset(Dataset):
    """Signals ``(N, T)`` (complex clean fingerprints or ready inputs) and their parameters."""

    def __init__(self, signals: torch.Tensor, params_ms: torch.Tensor,
                 target_scale_ms: torch.Tensor, noise_std: float | None = None) -> None:
        self.signals = signals
        self.noise_std = None if noise_std is None else torch.tensor(noise_std)
        self.bound = None  # (N, 2) per-sample Cramér–Rao bound, when a loss needs it
        self.params_ms = params_ms.to(torch.float32)
        self.targets = (self.params_ms / target_scale_ms).to(torch.float32)

    def __len__(self) -> int:
        return self.signals.shape[0]

    def __getitem__(self, i: int) -> Batch:
        return Batch(self.signals[i], self.targets[i], self.params_ms[i], self.noise_std,
                     None if self.bound is None else self.bound[i])


class EpochShuffleSampler(torch.utils.data.RandomSampler):
    """Shuffles ``data_source`` with a permutation that depends only on ``(seed, epoch)``.

    The epoch is read when an iterator starts: from ``epoch_fn`` (the trainer's, see
    :func:`~mrflight.data.batches.training_epoch`) where given, else from :meth:`set_epoch`,
    which Lightning calls at the start of every epoch. Loader workers fetch their first indices
    as soon as the iterator exists, which a resumed run creates before it sets the epoch: only
    ``epoch_fn`` gives them the resumed epoch's order, so that a resumed run visits the
    training samples in the same order as an uninterrupted one with workers too. Under DDP
    Lightning replaces it (it is a ``RandomSampler``) by a ``DistributedSampler``, which is
    epoch-seeded too.
    """

    def __init__(self, data_source, seed: int, epoch_fn=None) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0
        self.epoch_fn = epoch_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        epoch = int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch
        g = torch.Generator().manual_seed(stream_seed(self.seed, 0, epoch))
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


def _data_source(sequence, params, path):
    """The checked ``(sequence, params)``: exactly one of ``params`` (simulated for the
    sequence) and ``path`` (an existing dictionary file)."""
    if isinstance(sequence, dict):
        sequence = Sequence.from_dict(sequence)
    if sequence is not None and not isinstance(sequence, Sequence):
        raise ValueError(f"sequence must be a mrflight.physics.Sequence or its to_dict(), "
                         f"got {type(sequence).__name__}")
    if (params is None) == (path is None):
        raise ValueError("give exactly one data source: params (T1/T2 in ms to simulate) "
                         "or path (a dictionary file)")
    if path is not None and not Path(path).expanduser().exists():
        raise ValueError(f"data.path={path!r} does not exist: point it to a .h5/.npz/.mat "
                         "dictionary")
    if params is not None:
        params = np.asarray(params, dtype=np.float64)
        if params.ndim != 2 or params.shape[1] < 2 or len(params) == 0:
            raise ValueError(f"params must be an (M, 2) array of T1, T2 in ms, got shape "
                             f"{params.shape}")
        if sequence is None:
            raise ValueError("simulating params needs a sequence")
    return sequence, params


def _check_settings(batch_size, eval_batch_size, noise_std, input_mode, val_fraction, n_train,
                    n_test, target_scale_ms) -> tuple[float, ...]:
    """Checks the loader, noise and split settings; returns the target scales as floats."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size > 0):
        raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
    if eval_batch_size is not None and not eval_batch_size > 0:
        raise ValueError(f"data.eval_batch_size must be positive, got {eval_batch_size}")
    if not (noise_std is not None and 0 <= float(noise_std) < float("inf")):
        raise ValueError(f"data.noise_std must be a finite number >= 0 (0.01 is the "
                         f"paper-like default), got {noise_std}")
    if input_mode not in INPUT_MODES:
        raise ValueError(f"data.input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction must lie in (0, 1), got {val_fraction}")
    if int(n_test) < 1 or (n_train is not None and int(n_train) < 2):
        raise ValueError(f"data.n_test must be >= 1 and data.n_train >= 2 (or null), got "
                         f"n_test={n_test}, n_train={n_train}")
    scale = tuple(float(s) for s in target_scale_ms)
    if len(scale) != 2 or min(scale) <= 0:
        raise ValueError(f"data.target_scale_ms must be two positive numbers, got "
                         f"{target_scale_ms}")
    return scale


class FingerprintDataModule(ModelInputs, TrainingSeed, L.LightningDataModule):
    """Fingerprints for training, validation and test with the project's noise model.

    Args:
        sequence: the pulse train (a :class:`~mrflight.physics.Sequence` or its ``to_dict()``);
            the pipeline passes the run's ``sequence`` config.
        params: ``(M, 2)`` T1, T2 in ms to simulate (``None`` when ``path`` is given).
        path: a dictionary file (``.h5``, ``.npz``, ``.mat``) instead of simulating.
        n_train: size of the training part (train + validation); ``None`` = all atoms not in test.
        n_test: size of the test split.
        val_fraction: fraction of the training part held out for validation.
        batch_size: training batch size (validation/test use ``eval_batch_size``).
        eval_batch_size: batch size for validation and test (``None``: ``4 * batch_size``).
        noise_std: noise std relative to the unit-norm fingerprint (>= 0; paper-like 0.01).
        input_mode: ``"magnitude"`` (paper) or ``"complex"`` (two channels, real and imaginary).
        target_scale_ms: ``(T1, T2)`` scales dividing the targets for the loss.
        split_seed: seed of the shuffling that defines the splits.
        noise_seed: seed of the fixed validation/test noise.
        seed: seed of the training shuffle and the training noise (both functions of ``(seed,
            epoch, batch index)``, so resumed runs reproduce uninterrupted ones); ``None``: the
            global torch seed when :meth:`setup` runs (``torch.initial_seed()``, i.e. the run's
            ``seed`` after ``seed_everything``), kept in the checkpoint for a resume.
        cache_dir: dictionary cache folder passed to :func:`mrflight.dictionary.generate`
            (``None``: no cache).
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        progress: show the simulation progress bar.
    """

    def __init__(self, sequence: Sequence | dict | None = None, params=None,
                 path: str | None = None, n_train: int | None = None, n_test: int = 5000,
                 val_fraction: float = 0.05, batch_size: int = 50,
                 eval_batch_size: int | None = None, noise_std: float = 0.01,
                 input_mode: str = "magnitude",
                 target_scale_ms: tuple[float, float] | list[float] = DEFAULT_TARGET_SCALE_MS,
                 split_seed: int = 0, noise_seed: int = 1, cache_dir: str | None = None,
                 num_workers: int = 0, progress: bool = True, seed: int | None = None) -> None:
        super().__init__()
        sequence, params = _data_source(sequence, params, path)
        scale = _check_settings(batch_size, eval_batch_size, noise_std, input_mode, val_fraction,
                                n_train, n_test, target_scale_ms)
        self.sequence = sequence
        self.params = params
        self.path = None if path is None else str(Path(path).expanduser())
        self.n_train = None if n_train is None else int(n_train)
        self.n_test = int(n_test)
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 4 * batch_size)
        self.noise_std = float(noise_std)
        self.input_mode = input_mode
        self.target_scale_ms = scale
        self.split_seed = int(split_seed)
        self.noise_seed = int(noise_seed)
        self.cache_dir = cache_dir
        self.num_workers = int(num_workers)
        self.progress = bool(progress)
        self.seed = None if seed is None else int(seed)
        self._noise_epoch, self._noise_batch = -1, 0
        self.with_bound = False  # set by the pipeline when the module's loss needs the bound
        if params is not None:  # fail fast on a split that cannot fit
            self._split_sizes(len(params))
        self.train_set = self.val_set = self.test_set = None

    # -- properties used by the pipeline ------------------------------------------------------
    targets = ("t1", "t2")
    eval_set_names = [""]

    @property
    def training_range(self) -> dict | None:
        """``{"t1": [low, high], "t2": [low, high]}`` in ms: the smallest and largest T1 and T2
        of the train split (not of the validation or test split), which the module records in
        its checkpoints (``MRFRegressor``'s ``training_range``): maps flag the estimates above
        it. ``None`` before :meth:`setup`."""
        if self.train_set is None or not len(self.train_set):
            return None
        p = self.train_set.params_ms[:, :2]
        # the shortest decimal of each stored value (34.645546, not float32's 34.645545959...)
        lo, hi = ([float(str(v)) for v in x.numpy()] for x in (p.amin(0), p.amax(0)))
        return {"t1": [lo[0], hi[0]], "t2": [lo[1], hi[1]]}

    def _split_sizes(self, m: int) -> tuple[int, int, int]:
        if self.n_test >= m - 1:
            raise ValueError(
                f"data.n_test={self.n_test} leaves no training data: the data has only {m} "
                f"usable fingerprints; lower data.n_test (e.g. {max(1, m // 10)})"
            )
        n_train = m - self.n_test if self.n_train is None else self.n_train
        if self.n_test + n_train > m or n_train < 2:
            raise ValueError(
                f"the splits need n_test + n_train = {self.n_test} + {n_train} fingerprints but "
                f"the data has only {m}: lower data.n_test / data.n_train"
            )
        n_val = max(1, round(self.val_fraction * n_train))
        if n_val >= n_train:
            raise ValueError(f"data.val_fraction={self.val_fraction} leaves no training data")
        return n_train - n_val, n_val, self.n_test

    # -- data ---------------------------------------------------------------------------------
    def _dictionary(self):
        from mrflight import dictionary

        if self.path is not None:
            d = dictionary.load(self.path)
            if self.sequence is not None and d.atoms.shape[1] != len(self.sequence):
                raise ValueError(
                    f"the dictionary {self.path} has {d.atoms.shape[1]} time points but the "
                    f"sequence {self.sequence.name!r} has {len(self.sequence)}: choose the "
                    "matching sequence config"
                )
            if self.sequence is None and d.sequence is not None:
                self.sequence = Sequence.from_dict(d.sequence)
            b1 = np.asarray(d.params)[:, 2] if np.shape(d.params)[1] > 2 else None
            if b1 is not None and np.ptp(b1) > 0:
                logging.getLogger("mrflight").warning(
                    "the dictionary %s has a B1 column (%.2f to %.2f): data=file trains on T1 and "
                    "T2 only, so the network learns to ignore B1 (data=simulated estimates it)",
                    self.path, float(b1.min()), float(b1.max()))
            return d
        return dictionary.generate(self.sequence, self.params, cache_dir=self.cache_dir,
                                   progress=self.progress)

    def prepare_data(self) -> None:
        """Simulate (and cache) the dictionary once, on rank 0.

        The result is kept for :meth:`setup` in the same process, so a single-process run
        simulates once and never reads back the cache it has just written.
        """
        if self.path is None and self.cache_dir is not None and self.train_set is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._prepared = self._dictionary()

    def load_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """The dictionary and its seeded splits, without building the datasets.

        Returns:
            ``(atoms, params, keep, splits)``: complex64 atoms ``(M, T)``, float64 parameters
            ``(M, 2)`` in ms, the bool mask ``(M,)`` of atoms that can be normalised (all-zero
            atoms are never used), and ``{"train", "val", "test"}`` index tensors into ``atoms``.
            A dictionary file's B1 column, which training leaves out, is kept in
            ``self.atom_b1`` (``(M,)`` float64, else ``None``): its atoms' bound needs it.
        """
        d = getattr(self, "_prepared", None)
        self._prepared = None
        if d is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # zero atoms are dropped below
                d = self._dictionary()
        atoms = torch.from_numpy(np.ascontiguousarray(d.atoms)).to(torch.complex64)
        params = torch.from_numpy(np.asarray(d.params[:, :2], dtype=np.float64))
        self.atom_b1 = (np.asarray(d.params[:, 2], dtype=np.float64) if np.shape(d.params)[1] > 2
                        else None)
        del d
        keep = torch.linalg.vector_norm(atoms, dim=-1) > 0
        idx_ok = torch.nonzero(keep).squeeze(1).numpy()
        # atoms sharing a T1/T2 label (a B1 column, duplicated rows) stay in one split: a test
        # label must not be trained on (or matched against) under another B1 or as a copy
        groups = label_groups(params.numpy()[idx_ok])
        n_groups = int(groups.max()) + 1 if len(groups) else 0
        if n_groups < len(idx_ok):
            logging.getLogger("mrflight").warning(
                "%d usable atoms share %d distinct T1/T2 pairs (a B1 column or duplicated "
                "rows): every pair is held out whole, and data.n_test / data.n_train count "
                "pairs", len(idx_ok), n_groups)
        n_tr, n_val, n_te = self._split_sizes(n_groups)
        idx = split_indices(idx_ok, self.split_seed, n_te, n_val, n_tr, groups=groups)
        splits = {k: torch.from_numpy(idx[k]) for k in ("train", "val", "test")}
        return atoms, params, keep, splits

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._training_seed()
        atoms, params, _, splits = self.load_splits()
        train_idx, val_idx, test_idx = splits["train"], splits["val"], splits["test"]
        scale = torch.tensor(self.target_scale_ms, dtype=torch.float32)

        def fixed(clean: torch.Tensor, split: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + split)
            return preprocess(add_noise(clean, self.noise_std, generator=g), self.input_mode)

        std = self.noise_std
        self.train_set = FingerprintDataset(normalize(atoms[train_idx]), params[train_idx], scale,
                                            std)
        self.val_set = FingerprintDataset(fixed(atoms[val_idx], 1), params[val_idx], scale, std)
        self.test_set = FingerprintDataset(fixed(atoms[test_idx], 2), params[test_idx], scale,
                                           std)
        if self.with_bound:
            for ds, idx in ((self.train_set, train_idx), (self.val_set, val_idx),
                            (self.test_set, test_idx)):
                b1 = None if self.atom_b1 is None else self.atom_b1[idx.numpy()]
                ds.bound = self._bounds(ds.params_ms, b1)
        self.split_indices = splits
        del atoms  # the full dictionary is freed; only the splits stay in memory

    def _bounds(self, params_ms: torch.Tensor, b1: np.ndarray | None = None) -> torch.Tensor:
        """Cramér–Rao bound ``(N, 2)`` (ms) of every sample at ``noise_std``: at B1 = 1 known,
        or, where the dictionary's B1 column ``b1`` has other values, at each atom's B1 with
        B1 unknown (the network is not told it), as ``eval.py`` bounds them."""
        from mrflight.physics import crb

        at_b1 = b1 is not None and bool(np.any(b1 != 1))
        return crb(self.sequence, params_ms[:, 0].double(), params_ms[:, 1].double(),
                   self.noise_std, torch.from_numpy(b1) if at_b1 else None,
                   estimate_b1=at_b1)[:, :2].to(torch.float32)

    def _loader(self, ds, batch_size: int, sampler=None) -> DataLoader:
        """Batches of ``ds`` in order, or in the order of ``sampler``."""
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False,
                          multiprocessing_context=loader_context(self.num_workers))

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        epoch_fn = (lambda: training_epoch(trainer)) if trainer is not None else None
        return self._loader(self.train_set, self.batch_size,
                            EpochShuffleSampler(self.train_set, self.seed, epoch_fn))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, "the validation split (data.val_fraction)")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set, "data.n_test")

    def _eval_loader(self, ds, option: str) -> DataLoader:
        """In order; under DDP each rank its share, every sample once (:func:`eval_sampler`)."""
        return self._loader(ds, self.eval_batch_size,
                            eval_sampler(ds, getattr(self, "trainer", None), option))

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Add fresh noise to training batches (complex clean fingerprints) on their device."""
        if isinstance(batch, Batch) and batch.signal.is_complex():
            trainer = getattr(self, "trainer", None)
            epoch = int(trainer.current_epoch) if trainer is not None else 0
            rank = int(trainer.global_rank) if trainer is not None else 0
            if epoch != self._noise_epoch:
                self._noise_epoch, self._noise_batch = epoch, 0
            seed = self._training_seed()
            g = torch.Generator(device=batch.signal.device)
            g.manual_seed(stream_seed(seed, 1, epoch, self._noise_batch, rank))
            self._noise_batch += 1
            noisy = add_noise(batch.signal, self.noise_std, generator=g)
            batch = batch._replace(signal=preprocess(noisy, self.input_mode))
        return batch
