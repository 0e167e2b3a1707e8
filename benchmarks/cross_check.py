"""Cross-check of mrflight's EPG against mrpro's EPG signal model (optional: needs ``mrpro``).

mrpro (``mrpro.operators.models.EPG``) is the PyTorch MR reconstruction package MRI physicists
will compare with. Its model of the same FISP-MRF train is ``EPGSequence([InversionBlock(TI),
FispBlock(flip, phase, TE, TR)])`` with ``Parameters(m0=1, t1, t2, relative_b1=b1)``: a perfect,
B1-insensitive inversion and TI; per pulse the RF (flip ``|b1| * alpha``, phase ``phi``, rad),
relaxation over TE, readout of ``F+_0``, gradient, relaxation over TR - TE. This is mrflight's
model; the only convention difference is the signal's phase: mrpro reads ``m0 * F+_0`` (a
90-degree phase-0 pulse on ``Mz = 1`` gives ``-i``), mrflight ``i F+_0`` (``+1``), with the same
rotation handedness, so mrflight's signal is ``i`` times mrpro's.

For each train (the default ``oksuz2019``, ``jiang2015`` with its varying TR, and a short train
with random RF phases) and atom, prints the max difference relative to the max signal, complex
(after the factor ``i``) and in magnitude, of mrpro (complex128, all states) against mrflight's
untruncated float64 EPG and against its default float32 truncated call, and the least-squares
factor between the two; then the run times of both on the same atoms (1 thread).

mrpro's ``InversionBlock`` builds its pi pulse from ``torch.tensor(torch.pi)``, in torch's
default dtype (float32) whatever the parameters' dtype; ``sin`` of that is -8.7e-8, which limits
a float64 mrpro run to ~6e-7 of the signal. mrpro is therefore run with the default dtype set to
the working dtype (also shown: the as-is figure).

Usage::

    python -m venv --system-site-packages /tmp/mrpro-venv     # keeps the system torch
    /tmp/mrpro-venv/bin/pip install --no-deps mrpro einops
    /tmp/mrpro-venv/bin/python benchmarks/cross_check.py      # about 15 s on 1 thread

``--no-deps`` keeps pip from replacing the installed torch. The EPG model needs only einops
besides torch, numpy and typing-extensions; a full ``import mrpro`` also needs ismrmrd, xsdata,
pydicom, torchnd, pytorch-finufft (finufft), ptwt (PyWavelets) and torchvision. Where one of those
is missing, this script loads mrpro's unmodified ``operators/models/EPG.py`` from the installed
package without running the package's ``__init__`` files, and says so. Without mrpro it prints
how to install it and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import torch
from common import RESULTS_DIR, machine_line, markdown_table, publish, timeit  # benchmarks/

from mrflight.physics import Sequence, jiang2015, oksuz2019, simulate
from mrflight.physics.truncation import DEFAULT_TOL, states_needed, truncation_rate

RESULT_NAME = "cross_check.md"
#: (T1 ms, T2 ms, B1): short, typical and long relaxation times, low and high B1
ATOMS = [(800.0, 60.0, 1.0), (1500.0, 200.0, 0.75), (300.0, 30.0, 1.2), (2500.0, 400.0, 1.0),
         (4000.0, 500.0, 0.9), (100.0, 10.0, 1.0)]
INSTALL_HINT = ("mrpro is not installed. Install it without letting pip touch torch, e.g.:\n"
                "    python -m venv --system-site-packages /tmp/mrpro-venv\n"
                "    /tmp/mrpro-venv/bin/pip install --no-deps mrpro einops\n"
                "    /tmp/mrpro-venv/bin/python benchmarks/cross_check.py")


def load_mrpro_epg() -> tuple[types.ModuleType | None, str]:
    """mrpro's EPG module and how it was loaded (``None`` and a reason when mrpro is missing).

    ``import mrpro`` imports every operator, some of which need packages the EPG model does not
    use (finufft, PyWavelets, torchvision). Where one of them is missing, the EPG source file of
    the installed mrpro is imported on its own: its package ``__init__`` files are replaced by
    empty package modules pointing at the same folders, so that only ``EPG.py`` and what it
    imports (``mrpro.data.Dataclass``, ``mrpro.utils``) run, unmodified.
    """
    spec = importlib.util.find_spec("mrpro")
    if spec is None or spec.origin is None:
        return None, "not installed"
    from importlib.metadata import version

    ver = version("mrpro")
    try:
        from mrpro.operators.models import EPG

        return EPG, f"mrpro {ver} (import mrpro)"
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
    for name in [m for m in sys.modules if m == "mrpro" or m.startswith("mrpro.")]:
        del sys.modules[name]
    root = os.path.dirname(spec.origin)
    for pkg in ("mrpro", "mrpro.data", "mrpro.operators", "mrpro.operators.models"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [os.path.join(root, *pkg.split(".")[1:])]
        sys.modules[pkg] = mod
    EPG = importlib.import_module("mrpro.operators.models.EPG")
    return EPG, (f"mrpro {ver}, operators/models/EPG.py loaded without the package __init__s "
                 f"(import mrpro needs {missing}, which the EPG model does not use)")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Run the block with ``torch.get_default_dtype()`` set to ``dtype`` (restored after)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def mrpro_signal(EPG, seq: Sequence, t1_ms, t2_ms, b1, dtype=torch.float64,
                 n_states: int | None = None, as_is: bool = False) -> torch.Tensor:
    """mrpro's signal of ``seq`` for the atoms, shape ``(N, T)``, times in s, angles in rad.

    Every input is given in ``dtype``. mrpro's ``InversionBlock`` makes its pi pulse from
    ``torch.tensor(torch.pi)``, i.e. in torch's default dtype, float32, whatever the parameters'
    dtype: its ``sin`` is -8.7e-8, not 0, and leaves that much transverse magnetisation, which
    limits a float64 run to ~5e-7 of the signal. So the model is run with the default dtype set
    to ``dtype`` unless ``as_is``. ``n_states`` defaults to ``T + 2`` (no truncation). mrpro's
    inversion is perfect; a train with another efficiency raises ``ValueError``.
    """
    if seq.inversion and seq.inversion_efficiency != 1.0:
        raise ValueError("mrpro's InversionBlock is a perfect inversion (efficiency 1)")

    def t(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype)

    with default_dtype(torch.get_default_dtype() if as_is else dtype):
        blocks = [EPG.InversionBlock(t(seq.ti_ms / 1000))] if seq.inversion else []
        blocks.append(EPG.FispBlock(t(np.deg2rad(seq.flip_angle_deg)),
                                    t(np.deg2rad(seq.phase_deg)), t(seq.te_ms / 1000),
                                    t(seq.tr_ms / 1000)))
        params = EPG.Parameters(m0=torch.ones(len(t1_ms), dtype=dtype), t1=t(t1_ms) / 1000,
                                t2=t(t2_ms) / 1000, relative_b1=t(b1))
        _, sig = EPG.EPGSequence(blocks)(params, n_states or len(seq) + 2)
    return torch.stack(sig, -1)


def random_phase_train(n_pulses: int = 300, seed: int = 0) -> Sequence:
    """The first ``n_pulses`` of the default train with RF phases uniform in [0, 360) degrees."""
    base = oksuz2019(n_pulses=n_pulses)
    phase = np.random.default_rng(seed).uniform(0.0, 360.0, n_pulses)
    return Sequence(base.flip_angle_deg, phase, base.tr_ms, base.te_ms, inversion=True,
                    ti_ms=base.ti_ms, name=f"random phases ({n_pulses} pulses)")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def compare(EPG, seq: Sequence, atoms=ATOMS) -> list[list]:
    """One table row per atom: relative differences of mrpro against mrflight, and the factor."""
    t1, t2, b1 = (np.array(c) for c in zip(*atoms))
    exact = simulate(seq, t1, t2, b1, dtype=torch.float64, tol=1e-300).numpy()
    default = simulate(seq, t1, t2, b1).numpy().astype(np.complex128)
    f32 = simulate(seq, t1, t2, b1, tol=1e-300).numpy().astype(np.complex128)
    theirs = mrpro_signal(EPG, seq, t1, t2, b1).numpy()
    as_is = mrpro_signal(EPG, seq, t1, t2, b1, as_is=True).numpy()
    rows = []
    for i, (a, b, c) in enumerate(atoms):
        m, x, d = theirs[i], exact[i], default[i]
        f = complex(np.vdot(m, x) / np.vdot(m, m))  # least squares: x ~ f * m
        f = complex(round(f.real, 6) + 0.0, round(f.imag, 6) + 0.0)  # no "-0.000000"
        rows.append([seq.name, f"{a:g} / {b:g} / {c:g}", f"{f.real:+.6f}{f.imag:+.6f}i",
                     f"{rel(1j * m, x):.1e}", f"{rel(np.abs(m), np.abs(x)):.1e}",
                     f"{rel(1j * as_is[i], x):.1e}", f"{rel(1j * m, f32[i]):.1e}",
                     f"{rel(1j * m, d):.1e}", f"{rel(np.abs(m), np.abs(d)):.1e}"])
    return rows


def timings(EPG, seq: Sequence, atoms=ATOMS, repeats: int = 3) -> list[list]:
    """Median run times (s) of both simulators on ``atoms`` in this process, and their ratio."""
    t1, t2, b1 = (torch.tensor(c, dtype=torch.float64) for c in zip(*atoms))
    rate = truncation_rate(seq, DEFAULT_TOL, float(t2.max()), float(t1.max()))
    k = int(states_needed(t2.numpy(), float(seq.tr_ms.min()), len(seq), DEFAULT_TOL, rate).max())
    t32 = [x.float() for x in (t1, t2, b1)]
    cases = [("float64, all states", lambda: simulate(seq, t1, t2, b1, dtype=torch.float64,
                                                       tol=1e-300),
              lambda: mrpro_signal(EPG, seq, t1, t2, b1)),
             (f"float32, default truncation (mrpro: {k} states)", lambda: simulate(seq, *t32),
              lambda: mrpro_signal(EPG, seq, *t32, dtype=torch.float32, n_states=k))]
    exact = simulate(seq, t1, t2, b1, dtype=torch.float64, tol=1e-300).numpy()
    rows = []
    for label, ours, theirs in cases:
        s_ours = timeit(ours, repeats=repeats)
        s_theirs = timeit(theirs, repeats=repeats)
        err = rel(1j * theirs().numpy().astype(np.complex128), exact)
        rows.append([seq.name, label, f"{s_ours * 1e3:.1f}", f"{s_theirs * 1e3:.1f}",
                     f"{s_theirs / s_ours:.1f}x", f"{err:.1e}"])
    return rows


def report(EPG, how: str, short: int | None = None) -> str:
    """The markdown report; ``short`` cuts every train to that many pulses (a smoke run)."""
    trains = [oksuz2019(), jiang2015(), random_phase_train()]
    if short:
        trains = [Sequence(s.flip_angle_deg[:short], s.phase_deg[:short], s.tr_ms[:short],
                           s.te_ms, inversion=True, ti_ms=s.ti_ms, name=f"{s.name}, first {short}")
                  for s in trains]
    rows = [row for seq in trains for row in compare(EPG, seq)]
    lines = [
        "# mrflight against mrpro's EPG",
        "",
        f"Machine: {machine_line()}. Reference: {how}.",
        "",
        "Relative difference: max |difference| / max |signal| over the whole fingerprint, "
        "complex after mrflight = i * mrpro (signal phase convention) or in magnitude. mrpro "
        "runs in complex128 with all T + 2 states and torch's default dtype float64; "
        "float64: against mrflight's untruncated float64 (`tol=1e-300`); mrpro's float32 pi "
        "pulse: mrpro as it runs with the default dtype float32 (its InversionBlock's pi "
        "pulse is then float32); mrflight default float32: mrflight's default call "
        "(float32, truncated) against mrpro. Factor: least-squares c in mrflight (float64) "
        "= c * mrpro. Differences above ~1e-5 in the last two columns are mrflight's state "
        "truncation (default `tol=1e-3`, relative L2 of the normalised magnitude), not the "
        "model (compare the float32 untruncated column: `tol=1e-300`).",
        "",
        markdown_table(["train", "T1 / T2 (ms) / B1", "factor", "complex, float64",
                        "magnitude, float64", "complex, float64, mrpro's float32 pi pulse",
                        "complex, mrflight float32 untruncated",
                        "complex, mrflight default float32",
                        "magnitude, mrflight default float32"], rows),
        "",
        "Run time on the same 6 atoms, one process, median of 3 after a warm-up (ratio only "
        "where the machine is shared); error: mrpro's against mrflight's untruncated float64.",
        "",
        markdown_table(["train", "precision", "mrflight (ms)", "mrpro (ms)", "mrpro / mrflight",
                        "mrpro complex error"], timings(EPG, trains[0], repeats=1 if short else 3)),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--short", type=int, default=None,
                    help="cut every train to this many pulses (smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    EPG, how = load_mrpro_epg()
    if EPG is None:
        print(INSTALL_HINT)
        return None
    text = report(EPG, how, args.short)
    if args.short:
        print(text)
        return text
    publish(RESULT_NAME, text)
    print(f"written to {RESULTS_DIR / RESULT_NAME}")
    return text


if __name__ == "__main__":
    main()
