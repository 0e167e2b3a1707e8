"""Shared helpers of the benchmark scripts: machine description, timer, GEMM rate, tables.

Every benchmark script imports this module (``benchmarks/`` is put on ``sys.path`` by running a
script from it, and by :mod:`benchmarks.run_all`), so that all figures are taken and reported the
same way: the median of several repeats after a warm-up, on a machine described by
:func:`machine_line`, next to the measured float32 GEMM rate of that machine.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS_DIR", "publish", "cpu_model", "machine_info", "machine_line", "load_average", "sync",
    "timeit", "gemm_gflops", "markdown_table", "write_result", "fmt_rate",
]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS does not report them)."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def machine_info(device: str | torch.device = "cpu") -> dict:
    """CPU model, core count, torch version and threads, GPU name (when CUDA), load average."""
    device = torch.device(device)
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device if device.type == "cuda" else 0)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "load_average": load_average(),
    }


def machine_line(device: str | torch.device = "cpu") -> str:
    """One line describing the machine, e.g. ``AMD EPYC, 2 cores, torch 2.13.0 (1 threads)``."""
    info = machine_info(device)
    s = (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} "
         f"({info['threads']} threads)")
    if info["gpu"]:
        s += f", GPU {info['gpu']}"
    if info["load_average"] is not None:
        s += ", load average {:.2f} / {:.2f} / {:.2f} (1/5/15 min)".format(*info["load_average"])
    return s


def sync(device: str | torch.device | None = None) -> None:
    """Wait for queued CUDA work (no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
           device: str | torch.device | None = None, budget_s: float | None = None) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls.

    Args:
        fn: the work to time (its result is discarded).
        repeats: timed calls; the median is returned (robust to a busy machine).
        warmup: untimed calls first (kernel compilation, caches, allocator).
        device: synchronise this CUDA device after every call.
        budget_s: stop repeating once this much time was spent timing (at least one repeat).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
        sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def gemm_gflops(n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """Measured matrix-multiply rate (GFLOP/s) of an ``n x n`` by ``n x n`` ``torch.mm``.

    The floor of every dense workload in the suite is its flop count divided by this rate, with
    the current torch thread setting. The *best* of ``repeats`` calls (after a warm-up) is used:
    a floor should be what the machine can do, and a single slow call on a shared machine would
    otherwise lower it. On the CPU this is the BLAS (MKL) rate that ``nn.Linear`` gets; oneDNN
    kernels (LSTM, convolutions) can exceed it, so "fraction of floor" may pass 100 %.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9


def fmt_rate(x: float | None, digits: int = 3) -> str:
    """A rate or count with thousands separators and about ``digits`` significant digits."""
    if x is None or x != x:  # None or NaN
        return "n/a"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are converted with ``str``.

    Raises:
        ValueError: a row whose length differs from the header's.
    """
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "---|" * len(headers)]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, the header has {len(headers)}")
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def write_result(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (creating its folder) and return the path."""
    from mrflight.fileio import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path


def publish(name: str, text: str) -> str:
    """Print a benchmark's report and write it to ``benchmarks/results/<name>``; returns it."""
    print(text)
    write_result(RESULTS_DIR / name, text)
    return text
