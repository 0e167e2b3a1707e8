"""Cost and accuracy of the maximum-likelihood fit (``mrflight.physics.fit``) against its
iteration count.

eval.py's continuous B1/proton-density set (2000 signals: T1 uniform in [100, 4000] ms, T2 in
[10, min(T1, 500)] ms, B1 0.8-1.2, proton density 0.5-1.0, a random phase), at noise 0.01 and
0.0025. The fit starts from a checkpoint's estimates (``--ckpt``) or, without one, from eval.py's
(T1, T2, B1) dictionary matching. Per noise level and ``max_iter``: the time per signal (one
thread), the value-and-Jacobian simulations per signal, and the RMSE of T1, T2 and B1; the first
row is the start itself.

    python benchmarks/fit_speed.py --ckpt RUN_OR_CKPT   # ~3 min on one core
    python benchmarks/fit_speed.py --ckpt RUN_OR_CKPT --xtol 1e-6   # a stricter stop
    python benchmarks/fit_speed.py --smoke              # seconds: 200 pulses, 40 signals
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import machine_line, markdown_table, publish

import mrflight.physics.fit as fitmod
from mrflight import efficiency as eff
from mrflight.physics import oksuz2019, simulate


class _Counted:
    """``simulate_jacobian`` counting the atoms it is called for."""

    def __init__(self, fn):
        self.fn, self.atoms = fn, 0

    def __call__(self, seq, t1, *args, **kwargs):
        self.atoms += len(t1)
        return self.fn(seq, t1, *args, **kwargs)


def _start(seq, args):
    if args.ckpt:
        from mrflight import load_checkpoint
        from mrflight.checkpoints import single_checkpoint

        module = load_checkpoint(single_checkpoint(args.ckpt))
        return f"the network of {args.ckpt}", lambda y: module.predict_parameters(y).double()
    from mrflight.evaluation.methods import b1_matching

    matcher = b1_matching(seq)
    return "(T1, T2, B1) matching", lambda y: torch.from_numpy(matcher(y)).double()


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="a checkpoint or run dir to start from")
    ap.add_argument("--smoke", action="store_true", help="200 pulses, 40 signals")
    ap.add_argument("--xtol", type=float, default=1e-4,
                    help="the fit's stopping step (relative; default the fit's own, 1e-4)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seq = oksuz2019(n_pulses=200, lobe_length=40) if args.smoke else oksuz2019()
    n, iters = (40, (2, 5)) if args.smoke else (2000, (3, 5, 8, 15, 30))
    params, pd = eff.offgrid_params(n, 11)
    clean = simulate(seq, *(torch.from_numpy(params[:, i]) for i in range(3)),
                     dtype=torch.float64)
    name, estimate = _start(seq, args)
    counted = _Counted(fitmod.simulate_jacobian)
    fitmod.simulate_jacobian = counted
    rows = []
    try:
        for noise in (0.01, 0.0025):
            y = eff._measure(clean, pd, noise, 12)
            t = time.perf_counter()
            start = estimate(y)
            runs = [("start", None, time.perf_counter() - t, start.numpy())]
            for it in iters:
                counted.atoms = 0
                t = time.perf_counter()
                est = fitmod.fit(seq, y, start, estimate_b1=start.shape[1] > 2, max_iter=it,
                                 xtol=args.xtol)
                runs.append((f"fit, max_iter {it}", counted.atoms / n, time.perf_counter() - t,
                             est.numpy()))
            for label, sims, dt, est in runs:
                e = est - params[:, :est.shape[1]]
                rmse = np.sqrt(np.nanmean(e ** 2, axis=0))
                rows.append([noise, label, "" if sims is None else f"{sims:.1f}",
                             f"{1e3 * dt / n:.2f}", f"{rmse[0]:.1f}", f"{rmse[1]:.1f}",
                             f"{100 * rmse[2]:.2f}" if len(rmse) > 2 else ""])
    finally:
        fitmod.simulate_jacobian = counted.fn
    text = (f"# The maximum-likelihood fit: cost and accuracy against its iterations\n\n"
            f"{machine_line()}; {n} signals of eval.py's continuous B1/proton-density set, "
            f"started from {name}, stopping step (xtol) {args.xtol:g}\n\n"
            + markdown_table(["noise", "estimate", "simulations per signal", "ms per signal",
                              "T1 RMSE ms", "T2 RMSE ms", "B1 RMSE %"], rows))
    return publish("fit_speed_smoke.md" if args.smoke else "fit_speed.md", text)


if __name__ == "__main__":
    main()
