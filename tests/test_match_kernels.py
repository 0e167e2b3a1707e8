"""Candidate atoms without the score matrix (:mod:`mrflight.match_kernels`) against a float64
brute force: the row maximum within its error bound, candidate sets that contain every pair
within ``eps`` of the exact best and none far from it.

The Triton kernels run on the CPU through Triton's interpreter in a subprocess
(``tests/match_kernels_interp_checks.py``; ``TRITON_INTERPRET=1`` must be set before triton is
imported and must not leak into this session), whose ``tl.dot`` computes float32 whatever the
precision. The pure-torch reference emulates TF32 rounding, so the bounds are checked here with
real TF32 errors too. Skipped parts: the interpreter without ``triton``, the GPU checks without
CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrflight import match_kernels as mk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from match_kernels_interp_checks import case, exact  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install "
                                  "triton, Linux): the matching kernels cannot be checked")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                                reason="needs CUDA and triton")


def _run_checks(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop("MRFLIGHT_NO_TRITON", None)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "match_kernels_interp_checks.py"),
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_checks(results: dict, n_cases: int) -> None:
    assert len(results) == n_cases
    for name, r in results.items():
        assert r["row_max_err_over_bound"] <= 1.0, name
        assert r["missing"] == 0, name  # superset of the pairs within eps of the exact best
        assert r["too_far"] == 0, name  # no pair beyond the margin plus the bound
        assert r["duplicates"] == 0 and r["unsorted"] == 0, name
        assert r["overflow_accounting_ok"], name
        assert r["pairs"] > 0, name


@needs_triton
def test_interpreted_kernels_match_float64_brute_force():
    # real/complex x rank 25/7 x random/near-duplicate atoms x ieee/tf32; 37 signals, 301 atoms
    # (not multiples of any tile); small tiles with 3 atom splits, and the default tiles at rank 7
    results = _run_checks()
    pair = results.pop("pair_scores")
    _assert_checks(results, 2 * 2 * 2 * 2 + 2 * 2 * 2)
    # the float64 re-scoring kernel: float64 sums of exact products (T <= 203: < 1e-14)
    assert len(pair) == 6 and max(pair.values()) < 1e-13, pair


# --------------------------------------------------------------------------- torch reference
DATA = [(c, r, k) for c in (False, True) for r in (25, 7) for k in ("random", "near")]


@pytest.mark.parametrize("precision", mk.PRECISIONS)
@pytest.mark.parametrize("complex_,rank,kind", DATA)
def test_reference_superset_and_bound(precision, complex_, rank, kind):
    s, a = case(complex_, rank, kind, 53, 611, seed=rank)
    ex = exact(s, a, complex_)
    top = ex.amax(1)
    delta = mk.error_bound(precision, rank, complex_) * torch.linalg.vector_norm(
        s.to(torch.complex128), dim=1).real  # unit-norm atoms
    rm = mk.row_max(s, a, complex_=complex_, precision=precision, backend="torch").double()
    assert bool(((rm - top).abs() <= delta).all())
    for eps in (0.0, 1e-5, 3e-3):
        cp = mk.candidate_pairs(s, a, eps, complex_=complex_, precision=precision,
                                backend="torch", capacity=1)
        got = set(zip(cp.rows.tolist(), cp.cols.tolist()))
        want = set(map(tuple, torch.nonzero(ex >= (top - eps)[:, None]).tolist()))
        assert want <= got, (eps, len(want - got))
        assert len(got) == len(cp.rows)
        assert bool((ex[cp.rows, cp.cols] >= top[cp.rows] - cp.margin[cp.rows]
                     - 2 * delta[cp.rows]).all())


@pytest.mark.parametrize("precision", mk.PRECISIONS)
@pytest.mark.parametrize("complex_", [False, True])
def test_error_bound_holds_for_every_pair_and_is_not_vacuous(precision, complex_):
    """Scores of single atoms (``row_max`` with M = 1) against the float64 score: within the
    bound, and TF32's errors (emulated) within a factor 30 of it."""
    s, a = case(complex_, 25, "random", 200, 40, seed=3)
    a = a * 0.5  # non-unit atoms: the bound scales with ||a||
    ex = exact(s, a, complex_)
    got = torch.stack([mk.row_max(s, a[j: j + 1], complex_=complex_, precision=precision,
                                  backend="torch") for j in range(a.shape[0])], 1).double()
    nu = torch.linalg.vector_norm(s.to(torch.complex128), dim=1).real[:, None] * 0.5
    ratio = float(((got - ex).abs() / nu).max()) / mk.error_bound(precision, 25, complex_)
    assert ratio <= 1.0
    if precision == "tf32":
        assert ratio > 1 / 30


def test_margin_is_needed_for_tf32():
    """Without the error term (eps alone), TF32 loses exact best atoms among near-duplicates:
    the superset test above can fail."""
    s, a = case(False, 25, "near", 53, 611, seed=25)
    ex = exact(s, a, False)
    best = ex.argmax(1)
    kw = dict(precision="tf32", backend="torch")
    plain = mk.candidates(s, a, mk.row_max(s, a, **kw), capacity=10 ** 5, **kw)
    kept = set(zip(plain[0].tolist(), plain[1].tolist()))
    assert sum((i, int(j)) not in kept for i, j in enumerate(best)) > 0


def test_round_tf32():
    x = torch.tensor([1.0, 1 + 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -20, -(1 + 3 * 2.0 ** -11),
                      float("inf"), 3.0e38])
    y = mk._round_tf32(x)
    assert y[:4].tolist() == [1.0, 1 + 2.0 ** -10, 1 + 2.0 ** -10, -(1 + 2 * 2.0 ** -10)]
    assert y[4] == float("inf")  # ties away from zero; Inf kept
    r = torch.randn(10000)
    q = mk._round_tf32(r)
    assert bool(((q - r).abs() <= 2.0 ** -11 * r.abs()).all())
    assert bool((q.view(torch.int32) & 0x1FFF == 0).all())  # 10 mantissa bits left


def test_edge_cases_and_errors(monkeypatch):
    s, a = case(False, 7, "random", 5, 20)
    s[2] = 0
    cp = mk.candidate_pairs(s, a, 1e-3, backend="torch")
    assert 2 not in cp.rows.tolist() and set(cp.rows.tolist()) == {0, 1, 3, 4}
    assert mk.candidate_pairs(s, a[:0], 0.1, backend="torch").rows.numel() == 0
    assert mk.row_max(s[:0], a, backend="torch").shape == (0,)
    with pytest.raises(ValueError, match="precision must be one of"):
        mk.row_max(s, a, precision="fp16")
    with pytest.raises(ValueError, match="share K"):
        mk.row_max(s, a[:, :3])
    with pytest.raises(ValueError, match="complex_=True needs complex"):
        mk.row_max(s, a, complex_=True)
    with pytest.raises(ValueError, match="eps must be"):
        mk.candidate_pairs(s, a, -1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mk.candidate_pairs(s * float("nan"), a, 0.1)
    with pytest.raises(ValueError, match="exceed max_pairs"):
        mk.candidate_pairs(s, a, 10.0, capacity=2, max_pairs=50, backend="torch")
    with pytest.raises(ValueError, match="threshold has"):
        mk.candidates(s, a, torch.zeros(3), capacity=4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (never set in this session)
    with pytest.raises(ValueError, match="backend='triton' is not available"):
        mk.row_max(s, a, backend="triton")
    monkeypatch.setenv("MRFLIGHT_NO_TRITON", "1")
    assert mk._kernels() is None and not mk.triton_available("cuda")


# ---------------------------------------------------------------------------------- CUDA
@needs_cuda
def test_cuda_kernels_match_float64_brute_force():
    # 3001 signals x 20011 atoms, ieee and tf32x3 (what the matcher uses), default tiles
    results = _run_checks("--cuda")
    pair = results.pop("pair_scores")
    _assert_checks(results, 2 * 2 * 2 * 2)
    assert len(pair) == 6 and max(pair.values()) < 1e-13, pair


def test_importing_the_check_script_leaves_the_environment_alone(monkeypatch):
    # the script sets TRITON_INTERPRET only when run; set here it would send every later Triton
    # call of the test session (the matcher's re-scoring, CUDA tests) to the interpreter
    import importlib

    import match_kernels_interp_checks

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    importlib.reload(match_kernels_interp_checks)
    assert "TRITON_INTERPRET" not in os.environ
