"""The Cramér–Rao bound over a parameter range, tabulated once and interpolated per sample.

A CRB-normalised training loss needs the bound of every training sample. Computing it exactly
takes a value-and-tangent simulation per sample (on the 2-core CPU ~4x the cost of a GRU training
step for a batch of 256). The bound at unit noise is a smooth function of (T1, T2, B1): this
table evaluates it once on a grid, log-spaced in T1 and T2 and linear in B1, and interpolates
``log(bound)`` trilinearly in ``(log T1, log T2, B1)``; the bound at noise ``sigma`` is
``sigma`` times the unit-noise bound. On the default train and prior (24 x 24 x 7 points) the
interpolation is within 0.3 % of the exact bound at the median and 1.5 % at worst over 400
random samples (``tests/test_crb.py`` bounds it), far below the spread of the bound itself over
a batch (orders of magnitude), which is what the loss needs.
"""

from __future__ import annotations

import numpy as np
import torch

from .crb import crb
from .sequence import Sequence

__all__ = ["CRBTable"]


class CRBTable:
    """Unit-noise Cramér–Rao bounds of (T1, T2[, B1]) on a grid, interpolated.

    Args:
        seq: the pulse train.
        t1_range, t2_range: ``(low, high)`` ms; the grid is log-spaced over them.
        b1_range: ``(low, high)`` of B1 (linear grid), or ``None`` for B1 = 1 known.
        shape: grid points along T1, T2 and B1.
        estimate_b1, phase_nuisance: as in :func:`mrflight.physics.crb`.
        device: where the table lives (and the interpolation runs).
    """

    def __init__(self, seq: Sequence, t1_range, t2_range, b1_range=None, *,
                 shape: tuple[int, int, int] = (24, 24, 7), estimate_b1: bool = False,
                 phase_nuisance: bool = False, device=None) -> None:
        n1, n2, nb = (int(s) for s in shape)
        if min(n1, n2) < 2 or nb < 1:
            raise ValueError(f"shape needs >= 2 points along T1 and T2, got {shape}")
        self.lo = torch.tensor([np.log(t1_range[0]), np.log(t2_range[0]),
                                1.0 if b1_range is None else b1_range[0]], dtype=torch.float64)
        self.hi = torch.tensor([np.log(t1_range[1]), np.log(t2_range[1]),
                                1.0 if b1_range is None else b1_range[1]], dtype=torch.float64)
        nb = 1 if b1_range is None or b1_range[0] == b1_range[1] else max(2, nb)
        self.shape = (n1, n2, nb)
        axes = [torch.linspace(float(self.lo[i]), float(self.hi[i]), n, dtype=torch.float64)
                for i, n in enumerate(self.shape)]
        g1, g2, gb = torch.meshgrid(*axes, indexing="ij")
        b = crb(seq, g1.exp().reshape(-1), g2.exp().reshape(-1), 1.0, b1=gb.reshape(-1),
                estimate_b1=estimate_b1, phase_nuisance=phase_nuisance,
                bounds=dict(t1_max=float(np.exp(self.hi[0])), t2_max=float(np.exp(self.hi[1])),
                            b1_range=(float(self.lo[2]), float(self.hi[2]))))
        self.n_params = b.shape[1]
        # an undefined point (inf) would spread to its cells: give it the table's largest finite
        # value (a conservative, large bound)
        logb = b.log()
        bad = ~torch.isfinite(logb)
        if bool(bad.all()):
            raise ValueError("the bound is undefined everywhere on this range")
        logb[bad] = logb[~bad].max()
        self.table = logb.reshape(n1, n2, nb, -1).to(device)
        self.lo, self.hi = self.lo.to(device), self.hi.to(device)

    def to(self, device) -> CRBTable:
        """The table on ``device`` (in place; returns itself)."""
        self.table, self.lo, self.hi = (x.to(device) for x in (self.table, self.lo, self.hi))
        return self

    def __call__(self, t1_ms: torch.Tensor, t2_ms: torch.Tensor,
                 b1: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-noise bounds ``(N, P)`` (float64) at the given parameters (clamped to the grid)."""
        dev = self.table.device
        x = [torch.as_tensor(t1_ms, dtype=torch.float64, device=dev).log(),
             torch.as_tensor(t2_ms, dtype=torch.float64, device=dev).log(),
             torch.ones_like(torch.as_tensor(t1_ms, dtype=torch.float64, device=dev))
             if b1 is None else torch.as_tensor(b1, dtype=torch.float64, device=dev)]
        idx, frac = [], []
        for i, n in enumerate(self.shape):
            if n == 1:
                idx.append(torch.zeros_like(x[i], dtype=torch.long))
                frac.append(torch.zeros_like(x[i]))
                continue
            u = ((x[i] - self.lo[i]) / (self.hi[i] - self.lo[i])).clamp(0, 1) * (n - 1)
            j = u.floor().long().clamp(max=n - 2)
            idx.append(j)
            frac.append(u - j)
        out = 0.0
        for c1 in (0, 1):
            for c2 in (0, 1):
                for cb in ((0, 1) if self.shape[2] > 1 else (0,)):
                    w = ((frac[0] if c1 else 1 - frac[0]) * (frac[1] if c2 else 1 - frac[1])
                         * ((frac[2] if cb else 1 - frac[2]) if self.shape[2] > 1 else 1.0))
                    v = self.table[idx[0] + c1, idx[1] + c2, idx[2] + cb]
                    out = out + w[:, None] * v
        return out.exp()
