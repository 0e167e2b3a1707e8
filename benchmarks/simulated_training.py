"""What fresh simulated batches cost in training (``data=simulated``).

Three figures for the default GRU (``mrflight/configs/model/gru.yaml``, complex input as in
``mrflight/configs/data/simulated.yaml``, T1/T2/B1 targets, 1750 pulses, batch 256), torch
threads 1 in the training process as in ``mrflight/configs/train.yaml``:

* ``step``: one optimisation step on a ready batch (forward, loss, backward, Adam);
* ``simulate``: drawing, simulating, noising and preprocessing one batch
  (:class:`mrflight.data.simulated.BatchSimulator`) in the training process, and the same with
  the per-sample Cramér–Rao bound that ``module.loss=crb`` needs;
* ``end to end``: steps/s of a loop over the data module's training loader (``num_workers`` 0:
  simulation in the training process; 1: in a loader worker, overlapped with the step), so
  ``simulation share = 1 - step / (end-to-end time per step)``.

Usage::

    python benchmarks/simulated_training.py [--steps 40] [--quick]

Prints a markdown table and writes ``benchmarks/results/simulated_training.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine_line, markdown_table, publish  # benchmarks/
from inference_speed import default_net

from mrflight.data import SimulatedDataModule
from mrflight.physics import oksuz2019
from mrflight.regressor import MRFRegressor


def _module(n_pulses: int) -> MRFRegressor:
    net = default_net("gru", n_pulses, in_channels=2, n_outputs=3).train()
    return MRFRegressor(net, lr=3e-3, target_scale_ms=[4000.0, 500.0, 1.0],
                        targets=["t1", "t2", "b1"])


def measure(steps: int = 40, n_pulses: int = 1750, batch_size: int = 256) -> list[dict]:
    torch.set_num_threads(1)
    seq = oksuz2019(n_pulses=n_pulses, lobe_length=max(1, n_pulses // 7))
    rows = []
    module = _module(n_pulses)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)

    def step(batch):
        loss = module.loss(module.net(batch.signal), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dm = SimulatedDataModule(seq, batch_size=batch_size, batches_per_epoch=steps,
                             input_mode="complex", num_workers=0, progress=False, seed=0)
    dm.setup("fit")
    sim = dm.simulator
    ready = sim.realise(sim.draw(0, 0, 0, 0))
    for _ in range(3):
        step(ready)
    t_step = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(ready)
        t_step.append(time.perf_counter() - t0)
    step_s = statistics.median(t_step)
    rows.append({"what": "GRU training step (ready batch)", "ms": 1e3 * step_s, "share": ""})
    t_sim = []
    for i in range(max(5, steps // 4)):
        t0 = time.perf_counter()
        sim.realise(sim.draw(0, 1, i, 0))
        t_sim.append(time.perf_counter() - t0)
    rows.append({"what": "simulate + noise + preprocess one batch",
                 "ms": 1e3 * statistics.median(t_sim), "share": ""})
    try:
        sim.with_bound = True
        for label, table in (("interpolated table, the default", True),
                             ("exact, data.bound_table=false", False)):
            sim.bound_table = table
            if table:
                t0 = time.perf_counter()
                sim.table()  # built once per run
                rows.append({"what": "building the bound table (once)",
                             "ms": 1e3 * (time.perf_counter() - t0), "share": ""})
            t_b = []
            for i in range(3):
                t0 = time.perf_counter()
                sim.realise(sim.draw(0, 2, i, 0))
                t_b.append(time.perf_counter() - t0)
            rows.append({"what": f"... with the per-sample bound (loss=crb; {label})",
                         "ms": 1e3 * statistics.median(t_b), "share": ""})
    except (TypeError, ValueError) as e:
        rows.append({"what": f"... with the per-sample bound: unavailable ({e})", "ms": None,
                     "share": ""})
    finally:
        sim.with_bound = False
        sim.bound_table = True
    for workers in (0, 1):
        dm.num_workers = workers
        loader = dm.train_dataloader()
        it = iter(loader)
        step(next(it))  # worker start-up and warm-up
        t0 = time.perf_counter()
        n = 0
        for batch in it:
            step(batch)
            n += 1
        per = (time.perf_counter() - t0) / max(n, 1)
        rows.append({"what": f"end to end, num_workers={workers}", "ms": 1e3 * per,
                     "share": f"{100 * max(0.0, 1 - step_s / per):.0f} %"})
    return rows


def report(rows: list[dict]) -> str:
    return markdown_table(
        ["what", "ms per batch", "simulation share of training time"],
        [[r["what"], "n/a" if r["ms"] is None else f"{r['ms']:.1f}", r["share"]] for r in rows])


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="200 pulses, 10 steps")
    a = ap.parse_args(argv)
    rows = measure(10, 200) if a.quick else measure(a.steps)
    text = f"{machine_line()}\n\n{report(rows)}\n"
    return publish("simulated_training.md", text)


if __name__ == "__main__":
    main()
