"""Choose the GRU's ``values_per_step``: training speed and accuracy under a fixed time budget.

For every setting, a GRU (hidden 100) trains on the paper grid (noise 0.01, magnitude input,
batch 256, Adam lr 3e-3, one torch thread) for ``--budget`` seconds of wall time on this
machine, then the validation split (fixed noise) is scored. ``values_per_step=1`` (the literal
per-time-point model) is only timed over a few batches: it cannot learn anything useful within
the budget on a CPU.

    python benchmarks/values_per_step.py --budget 60
"""

from __future__ import annotations

import argparse
import time

import torch

from mrflight.data import FingerprintDataModule
from mrflight.dictionary import paper_grid
from mrflight.physics import oksuz2019
from mrflight.regressor import MRFRegressor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=60.0, help="training seconds per setting")
    ap.add_argument("--values", type=int, nargs="+", default=[1, 10, 25, 50])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seq = oksuz2019()
    t0 = time.perf_counter()
    dm = FingerprintDataModule(seq, params=paper_grid(), n_train=args.n_train, n_test=2000,
                               batch_size=args.batch_size, cache_dir=args.cache_dir,
                               progress=False)
    dm.setup()
    print(f"data ready in {time.perf_counter() - t0:.1f} s (threads={torch.get_num_threads()})")
    rows = []
    for v in args.values:
        torch.manual_seed(0)
        m = MRFRegressor({"_target_": "mrflight.models.GRURegressor", "input_length": len(seq),
                          "values_per_step": v}, lr=args.lr)
        opt = torch.optim.Adam(m.parameters(), lr=args.lr)
        n_seen, start = 0, time.perf_counter()
        max_batches = 5 if v == 1 else None
        done = False
        while not done:
            for i, b in enumerate(dm.train_dataloader()):
                b = dm.on_after_batch_transfer(b, 0)
                loss = m.loss_fn(m.net(b.signal), b.target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                n_seen += len(b.target)
                if time.perf_counter() - start > args.budget or (max_batches and i + 1 >=
                                                                 max_batches):
                    done = True
                    break
        elapsed = time.perf_counter() - start
        with torch.no_grad():
            x, y = dm.val_set.signals, dm.val_set.params_ms
            t1 = time.perf_counter()
            pred = torch.cat([m(x[i:i + 1000]) for i in range(0, len(x), 1000)])
            infer_ms = (time.perf_counter() - t1) / len(x) * 1e3
        err = (pred - y).abs().mean(0) if max_batches is None else torch.full((2,), float("nan"))
        rows.append((v, n_seen / elapsed, n_seen / args.n_train, float(err[0]), float(err[1]),
                     infer_ms))
    print(f"\nGRU, {args.budget:.0f} s training budget, batch {args.batch_size}, lr {args.lr}, "
          f"{args.threads} thread(s), val split (noise 0.01)")
    print("| values_per_step | steps | train samples/s | epochs in budget | val T1 MAE ms | "
          "val T2 MAE ms | inference ms/signal |")
    print("|---|---|---|---|---|---|---|")
    for v, sps, ep, e1, e2, inf in rows:
        print(f"| {v} | {-(-len(seq) // v)} | {sps:.0f} | {ep:.2f} | {e1:.1f} | {e2:.1f} | "
              f"{inf:.3f} |")


if __name__ == "__main__":
    main()
