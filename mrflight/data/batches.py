"""What both data modules share: the :class:`Batch` they yield, its collation, the seeds of
their training streams (:func:`stream_seed`) and what the pipeline reads from a data module to
build the network (:class:`ModelInputs`), the seed of the training stream kept in the checkpoint
(:class:`TrainingSeed`), the epoch a training loader serves (:func:`training_epoch`) and the
sampler of an evaluation loader under DDP (:func:`eval_sampler`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from mrflight.physics import Sequence

__all__ = ["Batch", "collate", "stream_seed", "training_epoch", "ModelInputs", "TrainingSeed",
           "loader_context", "eval_sampler"]


class Batch(NamedTuple):
    """One batch.

    Attributes:
        signal: model input: ``(B, T)`` float (magnitude mode) or ``(B, 2, T)`` (complex mode);
            in training batches before ``FingerprintDataModule.on_after_batch_transfer``, the
            clean L2-normalised complex fingerprints ``(B, T)`` (complex dtype) that still need
            noise. With ``K`` noise realisations per fingerprint (the bias-reducing loss) it has
            ``K * B`` rows, grouped per fingerprint.
        target: scaled targets ``(B, P)`` float32 (T1/scale, T2/scale[, B1/scale]).
        params_ms: the targets in their units ``(B, P)`` float32 (T1, T2 in ms; B1 a ratio).
        noise_std: ``(B,)`` noise std of each fingerprint, where known.
        bound: ``(B, P)`` Cramér–Rao bound of each target at that noise, when a loss needs it.
        sim_params: ``(B, 3)`` float64 T1, T2, B1 still to be simulated (fresh simulated
            batches only).
        key: seed of the batch's noise stream (fresh simulated batches only).
    """

    signal: torch.Tensor
    target: torch.Tensor
    params_ms: torch.Tensor
    noise_std: torch.Tensor | None = None
    bound: torch.Tensor | None = None
    sim_params: torch.Tensor | None = None
    key: torch.Tensor | None = None


def stream_seed(*keys: int) -> int:
    """A 63-bit seed that is a deterministic function of the integer ``keys`` only.

    Used for the training shuffle ``(seed, 0, epoch)`` and the training noise
    ``(seed, 1, epoch, batch, rank)``: independent, reproducible streams (``numpy.random.
    SeedSequence`` mixing), whatever the global random state is when they are drawn.
    """
    words = [int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def training_epoch(trainer) -> int:
    """The epoch that a training loader's new iterator serves: the count Lightning passes to
    ``set_epoch``. A resumed run creates the iterator (and loader workers draw their first
    batches' indices or keys from the sampler) before it calls ``set_epoch`` and before
    ``trainer.current_epoch`` reaches the resumed epoch, but after it has restored this count."""
    return int(trainer.fit_loop.epoch_progress.current.processed)


def eval_sampler(dataset, trainer, option: str = "the evaluation set"):
    """The sampler of a validation or test loader: ``None`` (in order) in one process; under
    DDP this rank's share of ``dataset``, every sample on exactly one rank.

    Lightning would otherwise give such a loader a ``DistributedSampler``, which pads the set
    with repeated samples up to a multiple of the number of processes: a set of 201 signals
    on 2 ranks was scored as 202, with the first counted twice. The shares differ by at most
    one sample; validation steps synchronise nothing per batch, so uneven shares are safe as
    long as every rank has at least one sample.

    Raises:
        ValueError: ``dataset`` has fewer samples than there are processes.
    """
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1:
        return None
    if len(dataset) < world:
        raise ValueError(f"{option} has {len(dataset)} samples for {world} DDP processes: "
                         f"every process needs at least one, so make it at least {world}")
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world,
                                        rank=int(trainer.global_rank), shuffle=False)


def loader_context(num_workers: int) -> str | None:
    """The ``multiprocessing_context`` of a DataLoader with ``num_workers`` worker processes:
    ``None`` (the process's default start method) unless that method is not one of the
    platform's own, as in a job of Hydra's joblib launcher, whose loky worker processes make
    ``"loky"`` the default: its ``Process`` cannot start a loader worker (``AttributeError:
    'Process' object has no attribute 'env'``), so the platform's default method is used."""
    import multiprocessing as mp

    if num_workers <= 0:
        return None
    methods = mp.get_all_start_methods()  # the platform's default first
    current = mp.get_start_method(allow_none=True)
    return None if current is None or current in methods else methods[0]


def collate(items: list[Batch] | Batch) -> Batch:
    """Stack a list of single-sample :class:`Batch` es into one (``None`` fields stay None); a
    :class:`Batch` already made by a dataset's ``__getitems__`` is returned as it is."""
    if isinstance(items, Batch):
        return items
    return Batch(*(None if x[0] is None else torch.stack(x) for x in zip(*items)))


class ModelInputs:
    """What the pipeline reads from any data module to build the network (a mixin)."""

    input_mode: str
    sequence: Sequence

    @property
    def in_channels(self) -> int:
        """Input channels of the model: 1 (magnitude) or 2 (real, imaginary)."""
        return 1 if self.input_mode == "magnitude" else 2

    @property
    def input_length(self) -> int:
        """``T``: the number of time points of the fingerprints."""
        return len(self.sequence)


class TrainingSeed:
    """The seed of a data module's training stream, kept in the checkpoint (a mixin).

    Without ``seed`` the module takes ``torch.initial_seed()`` at setup: the run's ``seed``
    after ``seed_everything``, or a random one with ``seed: null``. Lightning saves
    :meth:`state_dict` in the checkpoint and calls :meth:`load_state_dict` after ``setup`` on a
    resume, so a resumed run goes on with the stream it was trained on even when its seed was
    random; a configured ``seed`` is kept.
    """

    seed: int | None
    _seed_drawn: bool = False

    def _training_seed(self) -> int:
        if self.seed is None:
            self.seed, self._seed_drawn = int(torch.initial_seed()), True
        return self.seed

    def state_dict(self) -> dict:
        return {} if self.seed is None else {"seed": int(self.seed)}

    def load_state_dict(self, state: dict) -> None:
        if self._seed_drawn and state.get("seed") is not None:
            self.seed = int(state["seed"])
