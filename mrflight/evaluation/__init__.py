"""Evaluation: every method on the same noisy test signals, beside the Cramér–Rao bound.

``python eval.py [ckpt_path=PATH] [evaluation.n_test=...] [evaluation.noise_levels=[...]]``
calls :func:`evaluate` (through :func:`mrflight.eval_entry.evaluation_from_config`, which
builds the typed inputs from the Hydra config). ``PATH`` may be a checkpoint file, a training
run directory or a multirun directory: every run found is evaluated (its best checkpoint by
the recorded validation score, see :mod:`mrflight.checkpoints`) with the sequence stored in
the checkpoint (the one its network was trained on; a differing or unbuildable ``sequence`` of
the run's saved config is warned about) and the data grid and split of the run's own saved
``config.yaml``. Without a checkpoint, dictionary matching and
the bound are evaluated for ``cfg.sequence`` and the paper's grid.

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

Modules: :mod:`~mrflight.evaluation.settings` (:class:`EvalSettings`),
:mod:`~mrflight.evaluation.runs` (the checkpoints and their groups),
:mod:`~mrflight.evaluation.testdata` (training dictionary and test sets),
:mod:`~mrflight.evaluation.methods` (networks, matching, SVD), :mod:`~mrflight.evaluation.protocol`
(rows per test set and noise level, the bound), :mod:`~mrflight.evaluation.phantom_maps`,
:mod:`~mrflight.evaluation.bound_reports` (efficiency, off-grid B1, robustness),
:mod:`~mrflight.evaluation.tables` and :mod:`~mrflight.evaluation.report` (files and loggers),
:mod:`~mrflight.evaluation.runner` (:func:`evaluate`).
"""

from mrflight.evaluation.protocol import evaluate_group
from mrflight.evaluation.report import write_outputs
from mrflight.evaluation.runner import evaluate
from mrflight.evaluation.runs import Run, checkpoint_groups, matching_group
from mrflight.evaluation.settings import EvalSettings
from mrflight.evaluation.tables import PAPER_TABLE1
from mrflight.evaluation.testdata import Group, build_group_data

__all__ = ["EvalSettings", "evaluate", "checkpoint_groups", "matching_group", "Run", "Group",
           "build_group_data", "evaluate_group", "write_outputs", "PAPER_TABLE1"]
