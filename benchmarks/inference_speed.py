"""Inference speed of the four regressors: batched throughput, single-signal latency, floor.

Every model (LSTM, GRU, ANN, CNN) is built directly from its default config
(``mrflight/configs/model/<name>.yaml``) with ``input_length=1750`` (the default train), put in eval
mode and timed under ``torch.inference_mode()`` on random unit-norm inputs (speed does not depend on
the weights):

* batched throughput (signals/s) for every batch size and torch thread count asked for; the
  fastest setting is reported with its batch size and threads;
* single-signal latency: the median over ``--latency-calls`` calls with batch 1;
* end-to-end ``MRFRegressor.predict_parameters`` on complex signals (magnitude, normalisation,
  chunking included) at its default chunk size;
* flops per signal (multiply-adds x 2: ``torch.utils.flop_counter`` for the convolutional and
  linear layers, counted analytically for the recurrent layers and their subspace projection)
  and the implied floor: flops / the measured float32 GEMM rate at the same thread count, and
  the fraction of it reached;
* with ``--compile``: the same throughput through ``torch.compile`` (compile time reported);
* on a CUDA machine: throughput and latency on the GPU as extra columns.

Usage::

    python benchmarks/inference_speed.py            # full run (a few minutes on 2 cores)
    python benchmarks/inference_speed.py --quick    # smoke run (batch 256, few repeats)

Prints a markdown table and writes ``benchmarks/results/inference_speed.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import (  # benchmarks/
    RESULTS_DIR,
    fmt_rate,
    gemm_gflops,
    machine_line,
    markdown_table,
    timeit,
    write_result,
)

from mrflight.models import RecurrentRegressor, build_net

CONFIGS = Path(__file__).resolve().parent.parent / "mrflight" / "configs" / "model"
MODELS = ("lstm", "gru", "ann", "cnn")
PAPER_MS = {"ann": 18.0, "cnn": 14.0, "lstm": 15.0, "gru": 14.0}  # Table 1, time per signal
TARGETS = {"lstm": None, "gru": 20_000, "ann": 100_000, "cnn": 100_000}  # signals/s (CPU)
LATENCY_TARGET_MS = 2.0


def default_net(name: str, input_length: int = 1750, **sizes) -> torch.nn.Module:
    """The regressor of ``mrflight/configs/model/<name>.yaml`` for ``input_length`` time points
    (``sizes``: ``in_channels``, ``n_outputs``). A network with a subspace basis (fitted when
    training starts) gets a random orthonormal one: its speed does not depend on the basis."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=True)
    cfg.update(input_length=input_length, **sizes)
    net = build_net(cfg).eval()
    if not getattr(net, "has_basis", True):
        g = torch.Generator().manual_seed(0)
        net.set_basis(torch.linalg.qr(torch.randn(input_length, net.rank, generator=g)).Q)
    return net


def flops_per_signal(net: torch.nn.Module) -> float:
    """Floating-point operations (2 per multiply-add) of one forward pass, per signal.

    Linear and convolutional layers are counted by ``torch.utils.flop_counter``; the recurrent
    layer analytically (input and hidden projections of every gate at every step; the
    element-wise gate arithmetic is not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, net.in_channels, net.input_length)
    if isinstance(net, RecurrentRegressor):
        gates = 4 if isinstance(net.rnn, torch.nn.LSTM) else 3
        d = 2 if net.bidirectional else 1
        h, inp = net.hidden_size, net.values_per_step * net.in_channels
        per_step = 0
        for layer in range(net.num_layers):
            per_step += d * 2 * gates * h * ((inp if layer == 0 else d * h) + h)
        # the projection on the basis and back; the read-out layers counted below
        projection = 2 * 2 * net.in_channels * net.input_length * net.rank
        readout = torch.randn(2, net.head[0].in_features if net.head else net.fc.in_features)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net.fc(net.head(readout))
        return float(per_step * net.n_steps + projection) + counter.get_total_flops() / 2
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops() / 2


def _unit_inputs(n: int, t: int, device="cpu") -> torch.Tensor:
    x = torch.rand(n, t, device=device) + 0.1
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _throughput(net, batch: int, repeats: int, device="cpu", budget_s: float = 10.0) -> float:
    x = _unit_inputs(batch, net.input_length, device)
    with torch.inference_mode():
        t = timeit(lambda: net(x), repeats=repeats, warmup=1, device=device, budget_s=budget_s)
    return batch / t


def _latency_ms(net, calls: int, device="cpu") -> float:
    x = _unit_inputs(1, net.input_length, device)
    with torch.inference_mode():
        return 1e3 * timeit(lambda: net(x), repeats=calls, warmup=5, device=device,
                            budget_s=30.0)


def _predict_rate(net, n: int, repeats: int) -> float:
    from mrflight.regressor import MRFRegressor

    module = MRFRegressor(net).eval()
    z = torch.polar(_unit_inputs(n, net.input_length), torch.rand(n, net.input_length))
    t = timeit(lambda: module.predict_parameters(z), repeats=repeats, warmup=1)
    return n / t


def measure(quick: bool = False, models=MODELS, batch_sizes=None, threads=None,
            latency_calls: int | None = None, repeats: int | None = None,
            input_length: int = 1750, compile: bool = False, predict_n: int | None = None,
            cuda: bool | None = None) -> dict:
    """Time every model; see the module docstring.

    Returns:
        ``{"rows": [per-model dict], "gemm": {threads: GFLOP/s}, "threads": [...],
        "batch_sizes": [...]}``; each row holds ``model``, ``flops``, ``best_rate``,
        ``best_batch``, ``best_threads``, ``rates`` ({(threads, batch): signals/s}),
        ``latency_ms``, ``latency_threads``, ``floor_rate``, ``fraction``, ``predict_rate``,
        and when measured ``compiled_rate``, ``compile_s``, ``cuda_rate``, ``cuda_latency_ms``.
    """
    start_threads = torch.get_num_threads()
    if batch_sizes is None:
        batch_sizes = (256,) if quick else (64, 256, 1024, 4096)
    if threads is None:
        threads = (start_threads,) if quick else sorted({1, start_threads, 2})
    latency_calls = latency_calls or (20 if quick else 200)
    repeats = repeats or (2 if quick else 5)
    predict_n = predict_n or (1024 if quick else 16384)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    gemm = {}
    for th in threads:
        torch.set_num_threads(th)
        gemm[th] = gemm_gflops(1024 if quick else 2048, repeats=3 if quick else 5)
    rows = []
    try:
        for name in models:
            net = default_net(name, input_length)
            row = {"model": name, "flops": flops_per_signal(net), "rates": {}}
            for th in threads:
                torch.set_num_threads(th)
                for b in batch_sizes:
                    row["rates"][(th, b)] = _throughput(net, b, repeats,
                                                        budget_s=3.0 if quick else 10.0)
            (th, b), rate = max(row["rates"].items(), key=lambda kv: kv[1])
            row.update(best_rate=rate, best_batch=b, best_threads=th)
            row["floor_rate"] = gemm[th] * 1e9 / row["flops"]
            row["fraction"] = rate / row["floor_rate"]
            lat = {}
            for t in threads:
                torch.set_num_threads(t)
                lat[t] = _latency_ms(net, latency_calls)
            row["latency_threads"], row["latency_ms"] = min(lat.items(), key=lambda kv: kv[1])
            torch.set_num_threads(th)
            row["predict_rate"] = _predict_rate(net, predict_n, max(2, repeats // 2))
            if compile:
                t0 = time.perf_counter()
                cnet = torch.compile(net)
                with torch.inference_mode():
                    cnet(_unit_inputs(b, input_length))
                row["compile_s"] = time.perf_counter() - t0
                row["compiled_rate"] = _throughput(cnet, b, repeats)
            if cuda:
                gnet = default_net(name, input_length).cuda()
                row["cuda_rate"] = max(_throughput(gnet, bb, repeats, "cuda")
                                       for bb in (4096, 65536))
                row["cuda_latency_ms"] = _latency_ms(gnet, latency_calls, "cuda")
            rows.append(row)
    finally:
        torch.set_num_threads(start_threads)
    return {"rows": rows, "gemm": gemm, "threads": list(threads),
            "batch_sizes": list(batch_sizes), "latency_calls": latency_calls,
            "repeats": repeats, "predict_n": predict_n, "input_length": input_length}


def table(r: dict) -> str:
    """The per-model markdown table of :func:`measure`'s result."""
    has_c = any("compiled_rate" in row for row in r["rows"])
    has_g = any("cuda_rate" in row for row in r["rows"])
    headers = ["model", "MFLOP/signal", "batched signals/s (batch, threads)", "floor signals/s",
               "fraction of floor", "latency batch 1 (ms)", "predict_parameters signals/s",
               "paper signals/s", "target signals/s"]
    if has_c:
        headers += ["torch.compile signals/s (compile s)"]
    if has_g:
        headers += ["CUDA signals/s", "CUDA latency (ms)"]
    body = []
    for row in r["rows"]:
        target = TARGETS.get(row["model"])
        ok = "" if target is None else (" met" if row["best_rate"] >= target else " NOT met")
        cells = [row["model"].upper(), f"{row['flops'] / 1e6:.2f}",
                 f"{fmt_rate(row['best_rate'])} ({row['best_batch']}, {row['best_threads']})",
                 fmt_rate(row["floor_rate"]), f"{row['fraction']:.0%}",
                 f"{row['latency_ms']:.3f}" + ("" if row["latency_ms"] <= LATENCY_TARGET_MS
                                               else " (> 2 ms)"),
                 fmt_rate(row["predict_rate"]), fmt_rate(1e3 / PAPER_MS[row["model"]]),
                 ("-" if target is None else f"{target:,}") + ok]
        if has_c:
            cells.append(f"{fmt_rate(row.get('compiled_rate'))} "
                         f"({row.get('compile_s', float('nan')):.0f})")
        if has_g:
            cells += [fmt_rate(row.get("cuda_rate")), f"{row.get('cuda_latency_ms', 0):.3f}"]
        body.append(cells)
    return markdown_table(headers, body)


def sweep_table(r: dict) -> str:
    """Signals/s of every (threads, batch) setting, one row per model."""
    keys = [(th, b) for th in r["threads"] for b in r["batch_sizes"]]
    headers = ["model"] + [f"{th} thr, batch {b}" for th, b in keys]
    rows = [[row["model"].upper()] + [fmt_rate(row["rates"][k]) for k in keys]
            for row in r["rows"]]
    return markdown_table(headers, rows)


def report(r: dict, quick: bool = False, cmd: str | None = None) -> str:
    """The markdown report of :func:`measure`; ``cmd``: the command line that made it (default
    ``python benchmarks/inference_speed.py [--quick]``, run_all's call)."""
    if cmd is None:
        cmd = f"python benchmarks/inference_speed.py{' --quick' if quick else ''}"
    gemm = ", ".join(f"{g:.0f} GFLOP/s with {th} thread(s)" for th, g in r["gemm"].items())
    lines = [
        f"# Inference speed{' (quick)' if quick else ''}",
        "",
        f"- machine: {machine_line()}",
        f"- models: mrflight/configs/model/*.yaml defaults, input_length {r['input_length']}, "
        "eval mode, "
        f"torch.inference_mode(); float32 GEMM rate: {gemm}",
        f"- throughput: median of {r['repeats']} calls after a warm-up per setting, best setting "
        f"reported; latency: median of {r['latency_calls']} batch-1 calls (best thread count); "
        f"predict_parameters: {r['predict_n']} complex signals end to end",
        "",
        table(r),
        "",
        "Throughput of every setting (signals/s):",
        "",
        sweep_table(r),
        "",
        "Floor = measured GEMM rate (same threads) / flops per signal. Paper: time per signal of "
        f"Oksuz et al. 2019, Table 1. Command: `{cmd}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 256 only, few repeats")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch thread counts to try (default 1 and 2)")
    ap.add_argument("--latency-calls", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--input-length", type=int, default=1750)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(net)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "inference_speed.md"))
    args = ap.parse_args(argv)
    r = measure(args.quick, args.models, args.batch_sizes, args.threads, args.latency_calls,
                args.repeats, args.input_length, args.compile)
    argv = sys.argv[1:] if argv is None else argv
    text = report(r, args.quick, cmd=" ".join(["python benchmarks/inference_speed.py", *argv]))
    print(text)
    write_result(args.out, text)
    return text


if __name__ == "__main__":
    main()
