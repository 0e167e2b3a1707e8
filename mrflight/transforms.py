"""Transforms shared by training, evaluation and maps: model inputs and the seeded test split.

* :func:`preprocess` turns (noisy) complex fingerprints into what a network reads
  (``input_mode`` ``magnitude`` or ``complex``); :func:`align_phase` removes the global phase.
* ``DEFAULT_TARGET_SCALE_MS``: the scales that bring T1 and T2 to order one as network targets.
* :func:`split_indices`: the seeded test/validation/train split of a dictionary's atoms, the one
  the data module trains with and the evaluation reproduces.
"""

from __future__ import annotations

import numpy as np
import torch

from mrflight.physics import normalize
from mrflight.physics.noise import to_complex

__all__ = ["INPUT_MODES", "DEFAULT_TARGET_SCALE_MS", "align_phase", "preprocess",
           "split_indices", "label_groups"]

DEFAULT_TARGET_SCALE_MS = (4000.0, 500.0)
INPUT_MODES = ("magnitude", "complex")


def align_phase(z: torch.Tensor) -> torch.Tensor:
    """Remove the global phase of complex fingerprints ``(N, T)``.

    A FISP train with RF phases of 0 or 180 degrees gives ``x_t = exp(i phi) r_t`` with real
    ``r_t``, and a scanner adds a voxel-dependent ``phi``. ``sum_t x_t^2 = exp(2 i phi) sum_t
    r_t^2`` gives ``phi`` up to ``pi``; the sign is fixed so that ``sum_t Re(x_t) |Re(x_t)|
    >= 0``. The result is the real fingerprint (up to noise) in the real channel and noise only
    in the imaginary channel, whatever the scanner's phase, so complex-input models see the
    sign changes of the signal that the magnitude loses.
    """
    s = (z * z).sum(dim=-1, keepdim=True)
    rot = torch.polar(torch.ones_like(s.real), -0.5 * torch.angle(s))
    y = z * rot
    sign = torch.where((y.real * y.real.abs()).sum(dim=-1, keepdim=True) < 0, -1.0, 1.0)
    return y * sign


def preprocess(noisy: torch.Tensor, input_mode: str = "magnitude") -> torch.Tensor:
    """Turn (noisy) complex fingerprints ``(N, T)`` into model inputs.

    ``magnitude``: ``|x| / ||x||_2`` -> ``(N, T)`` float32. ``complex``: ``x / ||x||_2`` with
    its global phase removed (:func:`align_phase`) as ``(N, 2, T)`` float32 (real, imaginary).
    A real input is taken as the magnitude (magnitude mode) or as a complex signal with zero
    imaginary part (complex mode). Any scale gives the same result: the normalisation
    (:func:`mrflight.physics.normalize`) runs in the input's precision before the cast to
    float32.
    """
    if input_mode == "magnitude":
        mag = noisy.abs()
        if not mag.is_floating_point():
            mag = mag.to(torch.float32)
        return normalize(mag).to(torch.float32)
    if input_mode == "complex":
        z = align_phase(normalize(to_complex(noisy))).to(torch.complex64)
        return torch.stack([z.real, z.imag], dim=-2)
    raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")


def label_groups(labels: np.ndarray) -> np.ndarray:
    """The group of every row of ``labels`` ``(N, P)``: rows with equal labels share a group;
    groups are numbered ``0 .. G-1`` in the order of their first row (so with every label
    distinct, row ``i`` is group ``i``)."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels.reshape(len(labels), -1), axis=0, return_index=True,
                                  return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[np.asarray(inverse).reshape(-1)]


def split_indices(candidates: np.ndarray, seed: int, n_test: int, n_val: int = 0,
                  n_train: int | None = None, groups: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
    """The seeded split of ``candidates`` (atom indices): the test atoms, then validation, train.

    ``candidates`` are shuffled with ``numpy.random.default_rng(seed)``; the first ``n_test``
    form the test split, the next ``n_val`` the validation split and the next ``n_train`` (all the
    rest when None) the train split. Test and validation come back sorted, train in shuffled order.

    ``groups`` (one integer per candidate, see :func:`label_groups`): candidates of one group
    (atoms with the same T1/T2, e.g. a dictionary's B1 column or duplicated rows) always land
    in the same split; the groups are shuffled and the sizes count groups. With every group of
    one candidate numbered as :func:`label_groups` numbers them, the split is the ungrouped one.
    """
    candidates = np.asarray(candidates)
    if groups is not None:
        groups = np.asarray(groups).reshape(-1)
        n_groups = int(groups.max()) + 1 if len(groups) else 0
        if n_groups < len(candidates):
            g = split_indices(np.arange(n_groups), seed, n_test, n_val, n_train)
            out = {}
            for k in ("test", "val", "train"):
                pos = np.full(n_groups, -1, dtype=np.int64)
                pos[g[k]] = np.arange(len(g[k]))
                sel = np.nonzero(pos[groups] >= 0)[0]
                sel = sel[np.argsort(pos[groups[sel]], kind="stable")]
                out[k] = np.sort(candidates[sel]) if k != "train" else candidates[sel]
            return out
    perm = candidates[np.random.default_rng(seed).permutation(len(candidates))]
    end = None if n_train is None else n_test + n_val + n_train
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": perm[n_test + n_val:end]}
