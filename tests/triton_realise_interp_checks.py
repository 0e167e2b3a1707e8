"""Run the fused noise kernel (:mod:`mrflight.data._realise_triton`) through Triton's interpreter
on CPU tensors and compare it with the torch path of :func:`mrflight.data.simulated.realise`
(the same random draws); print the largest errors as one JSON line.

Used by ``tests/test_triton.py`` in a subprocess (``TRITON_INTERPRET=1`` must be set before the
kernel module is imported). Run by hand with ``python tests/triton_realise_interp_checks.py``.

Cases: simulated fingerprints (B1 0.7-1.3, 150 pulses: not a power of two) and random complex
ones of any phase and scale (every branch of the phase's square root), magnitude and complex
input, with and without the random phase, 1 and 3 noise realisations, noise 0.001-0.3.
"""

from __future__ import annotations

import json
import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from mrflight.data._realise_triton import realise_fused  # noqa: E402
from mrflight.data.simulated import realise  # noqa: E402
from mrflight.physics import oksuz2019, simulate  # noqa: E402


def draws(seed: int, b: int, t: int, phase: bool, k: int):
    """The random draws of ``realise`` for a generator seeded with ``seed``, in its order."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.rand(b, generator=g) * (2 * math.pi) if phase else None
    return phi, torch.randn((b * k, t), generator=g), torch.randn((b * k, t), generator=g)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    t1 = torch.linspace(100, 3000, 12, dtype=torch.float64)
    t2 = torch.linspace(10, 300, 12, dtype=torch.float64)
    b1 = torch.linspace(0.7, 1.3, 12, dtype=torch.float64)
    sims = simulate(oksuz2019(n_pulses=150), t1, t2, b1)
    rand = torch.complex(torch.randn(12, 150, generator=gen, dtype=torch.float64),
                         torch.randn(12, 150, generator=gen, dtype=torch.float64))
    rand = rand * torch.logspace(-3, 3, 12, dtype=torch.float64)[:, None]
    std = torch.logspace(-3, math.log10(0.3), 12)
    worst, n_cases = {}, 0
    for name, clean in (("simulated", sims), ("random", rand)):
        for mode in ("magnitude", "complex"):
            for phase in (False, True):
                for k in (1, 3):
                    seed = 100 + n_cases
                    ref = realise(clean, std, torch.Generator().manual_seed(seed), phase, mode, k)
                    got = realise_fused(clean, std, *draws(seed, 12, 150, phase, k)[1:],
                                        draws(seed, 12, 150, phase, k)[0], mode, k)
                    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape)
                    err = ((got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max()
                    key = f"{name}_{mode}"
                    worst[key] = max(worst.get(key, 0.0), float(err))
                    n_cases += 1
    print(json.dumps({**worst, "cases": n_cases}))


if __name__ == "__main__":
    main()
