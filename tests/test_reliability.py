"""Reliability: bad input, interrupted runs, killed writes, determinism and memory over epochs.

Covered elsewhere (not repeated here): a truncated or bit-flipped dictionary cache is detected by
its checksum, warned about and rebuilt (tests/test_dictionary.py::
test_corrupt_cache_is_detected_warned_and_rebuilt), and a dictionary ``save`` killed before its
rename leaves the old file (test_dictionary.py::test_killed_writer_process_leaves_the_old_file);
the command-line errors and the multirun failure report are in tests/test_cli.py.
"""

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrflight import dictionary
from mrflight.data import FingerprintDataModule
from mrflight.data.batches import stream_seed
from mrflight.data.stored import EpochShuffleSampler
from mrflight.fileio import atomic_path
from mrflight.matching import DictionaryMatcher
from mrflight.physics import simulate
from mrflight.physics.sequence import oksuz2019
from mrflight.pipeline import compose_config, train
from mrflight.regressor import MRFRegressor

ROOT = Path(__file__).resolve().parents[1]
TINY = ["debug=tiny", "logger=none", "~callbacks.rich_progress_bar",
        "++trainer.enable_progress_bar=false", "~callbacks.scatter_plot"]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="module")
def seq():
    return oksuz2019(n_pulses=100, lobe_length=20)


@pytest.fixture(scope="module")
def small(seq):
    p = dictionary.regular_grid(t1_min=100, t1_max=3000, n_t1=25, t2_min=10, t2_max=400, n_t2=20)
    return dictionary.generate(seq, p, progress=False)


# --------------------------------------------------------------------------------------------
# resume and determinism
# --------------------------------------------------------------------------------------------

def _train(out, *overrides):
    cfg = compose_config([*TINY, *overrides], output_dir=out)
    metric = train(cfg)
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    return metric, ck, json.loads((out / "metrics.json").read_text())


def _same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("model", [
    ["model=gru"],
    # dropout draws from the global generator: its state travels in the checkpoint
    ["model=ann", "model.dropout=0.3"],
    # a loader worker fetches the resumed epoch's first indices before Lightning sets the epoch
    ["model=ann", "data.num_workers=1"],
])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, model):
    epochs = ["trainer.max_epochs=3", "test=false"]
    _, full, m_full = _train(tmp_path / "full", *model, *epochs)
    steps = full["global_step"] // 3
    # "crash" after one epoch: the same config, stopped by max_steps, then resumed from last.ckpt
    _, part, _ = _train(tmp_path / "cut", *model, *epochs, f"+trainer.max_steps={steps}")
    assert part["epoch"] == 0 and part["global_step"] == steps
    _, resumed, m_res = _train(tmp_path / "cut", *model, *epochs, "ckpt_path=last")
    assert resumed["epoch"] == full["epoch"] == 2
    assert resumed["global_step"] == full["global_step"]
    _same_weights(full["state_dict"], resumed["state_dict"])
    for k in ("val/loss", "val/t1_mae_ms", "val/t2_mae_ms"):
        assert m_res[k] == m_full[k], k


def _signal_at(monkeypatch, signum, epoch, batch):
    """Send ``signum`` to this process at training batch ``batch`` of ``epoch``, as a cluster
    preempting the job (SIGTERM) or Ctrl-C (SIGINT) would."""
    real = MRFRegressor.training_step

    def step(self, b, i):
        if (self.current_epoch, i) == (epoch, batch):
            os.kill(os.getpid(), signum)
        return real(self, b, i)

    monkeypatch.setattr(MRFRegressor, "training_step", step)


def _preempted(monkeypatch, tmp_path, out, args, epoch, batch=3) -> int:
    """Run ``args`` into ``out`` through the command's error handler, stopped by SIGTERM at
    ``batch`` of ``epoch`` as a cluster preempting the job would; the exit status."""
    from mrflight.errors import guard

    _signal_at(monkeypatch, signal.SIGTERM, epoch=epoch, batch=batch)
    with pytest.raises(SystemExit) as e:  # Lightning's SIGTERMException alone would exit 0
        guard(train)(compose_config([*TINY, *args], output_dir=out))
    monkeypatch.undo()
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    return e.value.code


def test_sigterm_mid_epoch_fails_with_one_line_and_resumes_to_the_same_result(
        tmp_path, monkeypatch, capsys):
    args = ["model=ann", "trainer.max_epochs=3", "test=false"]
    _, full, m_full = _train(tmp_path / "full", *args)
    out = tmp_path / "cut"
    assert _preempted(monkeypatch, tmp_path, out, args, epoch=1) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: stopped by SIGTERM (kill, or a cluster's preemption or time "
                       "limit): resume it from its last finished epoch with python train.py "
                       f"hydra.run.dir={out} ckpt_path=last")
    assert not (out / "metrics.json").exists()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    _, resumed, m_res = _train(out, *args, "ckpt_path=last")
    assert resumed["global_step"] == full["global_step"]
    _same_weights(full["state_dict"], resumed["state_dict"])
    assert m_res == m_full


def test_a_preempted_run_is_marked_failed_in_wandb_and_a_finished_one_not(tmp_path, monkeypatch,
                                                                         wandb_record):
    """W&B must not show a run SIGTERM stopped as finished: its exit record carries the status
    the command ends with."""
    args = ["model=ann", "trainer.max_epochs=2", "test=false", "logger=wandb"]
    out = tmp_path / "cut"
    assert _preempted(monkeypatch, tmp_path, out, args, epoch=1) == 128 + signal.SIGTERM
    finished = (lambda r: "exit_code" in r)
    assert wandb_record(out / "wandb", finished)["exit_code"] == 128 + signal.SIGTERM
    _train(out, *args, "ckpt_path=last")
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2
    assert wandb_record(out / "wandb", finished)["exit_code"] == 0  # the resumed run's record


def test_ctrl_c_before_training_is_one_line_with_the_signals_status(tmp_path, monkeypatch,
                                                                     capsys):
    from mrflight import pipeline
    from mrflight.errors import guard

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_build_data_and_module", interrupted)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        guard(train)(compose_config([*TINY, "model=ann"], output_dir=out))
    assert e.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: stopped by SIGINT (Ctrl-C): nothing of the run was saved yet: "
                       "run the same command again")


def test_ctrl_c_mid_epoch_is_one_line_with_the_signals_status(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a fit, which Lightning ends with its own ``sys.exit(1)``: one line with how
    to resume, and the status of a process SIGINT ended (130), as before training."""
    from mrflight.errors import guard

    out = tmp_path / "run"
    _signal_at(monkeypatch, signal.SIGINT, epoch=1, batch=3)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            guard(train)(compose_config([*TINY, "model=ann", "trainer.max_epochs=3"],
                                        output_dir=out))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C while it shuts down
    assert e.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: stopped by SIGINT (Ctrl-C): resume it from its last finished "
                       f"epoch with python train.py hydra.run.dir={out} ckpt_path=last")


def test_a_run_stopped_in_its_first_epoch_starts_again_with_ckpt_path_last(tmp_path,
                                                                           monkeypatch, capsys):
    """A job preempted before its first checkpoint and requeued with ``ckpt_path=last`` (no
    last.ckpt to resume from, and its folder refused to a new run) starts again from the
    beginning with the run's saved config, and ends as an uninterrupted run."""
    args = ["model=ann", "trainer.max_epochs=2", "test=false"]
    _, full, m_full = _train(tmp_path / "full", *args)
    out = tmp_path / "run"
    assert _preempted(monkeypatch, tmp_path, out, args, epoch=0) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"no epoch had finished: start it again from the beginning with python train.py "
        f"hydra.run.dir={out} ckpt_path=last")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["config.yaml"]
    with pytest.raises(ValueError, match="already holds the results"):  # not overwritten
        train(compose_config([*TINY, "model=gru"], output_dir=out))
    _, again, m_again = _train(out, *args, "ckpt_path=last")
    _same_weights(full["state_dict"], again["state_dict"])
    assert m_again == m_full


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_diverging_run_stops_with_one_line_and_keeps_its_finite_checkpoints(
        tmp_path, monkeypatch, capsys, where):
    """A loss that turns NaN in epoch 2 (or a NaN gradient at its last step, the loss finite)
    ends the run before its validation and checkpoints, with one line naming the step and the
    fix: no epoch trained on NaN weights, no NaN checkpoint, no metrics.json of NaNs (before:
    exit 0 after every epoch, NaN weights in last.ckpt and "best/val/loss": inf)."""
    from mrflight.errors import guard
    from mrflight.regressor import load_checkpoint

    real, at = MRFRegressor._step, {}

    def step(self, batch, split, dataloader_idx=0):
        loss = real(self, batch, split, dataloader_idx)
        n = self.trainer.num_training_batches
        if split == "train" and self.global_step + 1 == (n + 3 if where == "loss" else 2 * n):
            at["step"] = self.global_step + 1
            # NaN; or a finite loss whose gradient is infinite: sqrt'(0)
            loss = loss * float("nan") if where == "loss" else \
                loss + (loss - loss.detach()).sqrt()
        return loss

    monkeypatch.setattr(MRFRegressor, "_step", step)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        guard(train)(compose_config([*TINY, "model=ann", "trainer.max_epochs=3"],
                                    output_dir=out))
    assert e.value.code == 2
    what = ("the training loss was NaN or infinite in" if where == "loss" else
            "the weights became NaN or infinite in")
    tail = "(epoch 2 of 3)" + ("" if where == "loss" else ", the loss finite")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: training diverged: {what} step {at['step']} {tail}: train again with a lower "
        "module.lr (this run's: 0.003), or clip the gradients (+trainer.gradient_clip_val=1.0); "
        "the checkpoints up to epoch 1 are kept")
    assert not (out / "metrics.json").exists()
    files = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert files == ["epoch_000.ckpt", "last.ckpt"], files
    for f in files:
        ck = torch.load(out / "checkpoints" / f, weights_only=True)
        assert ck["epoch"] == 0
        assert all(torch.isfinite(v).all() for v in ck["state_dict"].values()
                   if v.is_floating_point())
        load_checkpoint(out / "checkpoints" / f)


@pytest.mark.parametrize("schedule", [["module.scheduler=null"], []])
def test_a_run_resumed_with_another_learning_rate_trains_with_it(tmp_path, schedule):
    """``ckpt_path=last module.lr=...`` (a run near divergence) goes on with the new learning
    rate and weight decay, a schedule scaled to it; Lightning restored the checkpoint's
    optimizer settings, and the overrides were silently ignored."""
    args = ["model=ann", "test=false", *schedule]
    out = tmp_path / "run"
    _train(out, *args, "trainer.max_epochs=1")
    _, ck, _ = _train(out, *args, "trainer.max_epochs=2", "ckpt_path=last", "module.lr=1e-4",
                      "module.weight_decay=0.01")
    group = ck["optimizer_states"][0]["param_groups"][0]
    assert group["weight_decay"] == 0.01
    if schedule:  # constant
        assert group["lr"] == pytest.approx(1e-4)
    else:
        assert group["initial_lr"] == pytest.approx(1e-4)
        assert ck["lr_schedulers"][0]["base_lrs"] == pytest.approx([1e-4])


def test_same_config_and_seed_give_the_same_metrics(tmp_path):
    args = ["model=ann", "trainer.max_epochs=2"]
    _, a, ma = _train(tmp_path / "a", *args)
    _, b, mb = _train(tmp_path / "b", *args)
    _same_weights(a["state_dict"], b["state_dict"])
    assert ma == mb and np.isfinite(ma["test/t1_mae_ms"])
    _, c, mc = _train(tmp_path / "c", *args, "seed=7")  # the comparison can fail
    assert mc["val/loss"] != ma["val/loss"]


def test_training_noise_and_shuffle_depend_only_on_seed_epoch_and_batch(seq):
    p = dictionary.random_params(n=300, seed=1)

    def batches(seed, epoch, n=3):
        dm = FingerprintDataModule(seq, params=p, n_test=30, batch_size=16, progress=False,
                                   seed=seed)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)

        class T:  # what the data module reads from its trainer
            current_epoch, global_rank = epoch, 0

        dm.trainer = T()
        torch.manual_seed(np.random.randint(1 << 30))  # the global state must not matter
        out = []
        for i, b in enumerate(loader):
            out.append(dm.on_after_batch_transfer(b, 0).signal)
            if i + 1 == n:
                break
        return torch.stack(out)

    a = batches(5, 2)
    assert torch.equal(a, batches(5, 2))
    assert not torch.equal(a, batches(5, 3)) and not torch.equal(a, batches(6, 2))
    # the permutation is a permutation, reseeded per epoch
    s = EpochShuffleSampler(range(50), seed=3)
    s.set_epoch(4)
    first = list(s)
    assert sorted(first) == list(range(50)) and first == list(s)
    s.set_epoch(5)
    assert list(s) != first
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3) != stream_seed(1, 2, 4)


# --------------------------------------------------------------------------------------------
# property-based: the matcher and predict_parameters give a right answer or a clear error
# --------------------------------------------------------------------------------------------

_DTYPES = [np.float32, np.float64, np.complex64, np.complex128, np.int32]
_PROPS = settings(max_examples=40, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])


def _signals(atoms, length, dtype, scale, special):
    """Atoms cut to ``length``, cast to ``dtype`` (magnitude for real types), with one bad row."""
    sig = atoms[:, :length] * scale
    if length > atoms.shape[1]:
        sig = np.pad(sig, ((0, 0), (0, length - atoms.shape[1])), constant_values=0.01)
    if np.dtype(dtype).kind != "c":
        sig = np.abs(sig)
    if dtype is np.int32:
        sig = np.clip(np.round(sig * 1000), 0, 2**30)  # 2**31 - 1 rounds up in float32
    sig = sig.astype(dtype)
    if special and len(sig):
        if special == "zero":
            sig[-1] = 0
        elif np.dtype(dtype).kind != "i":
            sig[-1, min(3, length - 1)] = {"nan": np.nan, "inf": np.inf}[special]
    non_finite = special in ("nan", "inf") and np.dtype(dtype).kind != "i" and len(sig) > 0
    return sig, non_finite


_MATCHERS = {}


@_PROPS
@given(n=st.integers(0, 12), length=st.sampled_from([100, 99, 1]),
       dtype=st.sampled_from(_DTYPES), scale=st.floats(1e-6, 1e6),
       special=st.sampled_from([None, "nan", "inf", "zero"]), ndim=st.sampled_from([1, 2, 3]),
       rank=st.sampled_from([None, 30]), data=st.data())
def test_matcher_random_inputs(small, n, length, dtype, scale, special, ndim, rank, data):
    """A right answer (the atom's parameters), NaN for all-zero rows, or a clear ValueError."""
    if rank not in _MATCHERS:
        _MATCHERS[rank] = DictionaryMatcher(small.atoms, small.params, rank=rank)
    m = _MATCHERS[rank]
    idx = np.array(data.draw(st.lists(st.integers(0, len(small) - 1), min_size=n, max_size=n)),
                   dtype=int)
    sig, non_finite = _signals(small.atoms[idx], length, dtype, scale, special)
    want = small.params[idx]
    if ndim == 1:
        sig, want = (sig[0], want[:1]) if n else (sig.reshape(-1), want)
    elif ndim == 3:
        sig = sig[None]
    non_finite = sig.size > 0 and not np.isfinite(sig).all()
    must_raise = ndim == 3 or length != 100 or non_finite or (ndim == 1 and n == 0)
    if must_raise:
        with pytest.raises(ValueError):
            m.match(sig)
        return
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = m.match(sig).numpy().reshape(-1, small.params.shape[1])
    except ValueError:
        assert n == 0  # an empty batch may be refused, clearly
        return
    assert out.shape == want.shape
    zero = ~np.any(np.atleast_2d(sig) != 0, axis=1)
    assert np.isnan(out[zero]).all() and np.isfinite(out[~zero]).all()
    if zero.any():
        assert any("zero" in str(x.message) for x in w)
    if dtype is np.int32:  # rounding moved the fingerprint: any atom of the grid is a valid answer
        grid = {tuple(r) for r in small.params}
        assert all(tuple(r) in grid for r in out[~zero])
    elif rank is None:
        np.testing.assert_array_equal(out[~zero], want[~zero])
    else:  # rank-30 SVD of a 100-point train: noise-free atoms still found (within the grid step)
        np.testing.assert_allclose(out[~zero], want[~zero], rtol=0.05)


@pytest.fixture(scope="module")
def model(seq):
    from mrflight.models import ANNRegressor

    torch.manual_seed(0)
    return MRFRegressor(ANNRegressor(input_length=len(seq), hidden_sizes=[16]),
                        sequence=seq.to_dict()).eval()


@_PROPS
@given(n=st.integers(0, 9), length=st.sampled_from([100, 50, 101]),
       dtype=st.sampled_from(_DTYPES), scale=st.floats(1e-8, 1e8),
       special=st.sampled_from([None, "nan", "inf", "zero"]), torch_in=st.booleans(),
       one_d=st.booleans())
def test_predict_parameters_random_inputs(model, small, n, length, dtype, scale, special,
                                          torch_in, one_d):
    """Any scale, dtype, complex or magnitude: the answer for the magnitude, or a ValueError."""
    sig, non_finite = _signals(small.atoms[:n], length, dtype, scale, special)
    if one_d and n:
        sig = sig[0]
    non_finite = sig.size > 0 and not np.isfinite(sig).all()
    x = torch.from_numpy(np.ascontiguousarray(sig)) if torch_in else sig
    if length != 100 or non_finite:
        with pytest.raises(ValueError, match="100|NaN"):
            model.predict_parameters(x)
        return
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = model.predict_parameters(x)
    sig2 = np.atleast_2d(sig)
    assert out.shape == (len(sig2), 2) and out.dtype == torch.float32
    zero = torch.from_numpy(~np.any(sig2 != 0, axis=1))
    assert torch.isnan(out[zero]).all() and torch.isfinite(out[~zero]).all()
    if zero.any():
        assert any("all-zero" in str(x.message) for x in w)
    ok = (~zero).numpy()
    if ok.any():
        ref = model.predict_parameters(np.abs(sig2[ok]).astype(np.float64))
        torch.testing.assert_close(out[~zero], ref, rtol=1e-4, atol=1e-3)
        if dtype is not np.int32:  # the scale does not matter
            torch.testing.assert_close(
                out[~zero], model.predict_parameters(np.abs(small.atoms[: len(sig2)][ok])),
                rtol=1e-3, atol=1e-2)


def test_matcher_rejects_bad_dictionaries(small):
    for atoms, params, match in [
        (np.zeros((0, 100)), np.zeros((0, 2)), "shape"),
        (small.atoms, small.params[:-1], "params"),
        (np.zeros((5, 100)), np.ones((5, 2)), "all-zero"),
        (np.full((5, 100), np.nan), np.ones((5, 2)), "NaN"),
        (small.atoms[:5], np.full((5, 2), np.inf), "NaN"),
    ]:
        with pytest.raises(ValueError, match=match):
            DictionaryMatcher(atoms, params)


def test_load_checkpoint_rejects_bad_paths(tmp_path):
    import mrflight

    with pytest.raises(ValueError, match="does not exist"):
        mrflight.load_checkpoint(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt"):
        mrflight.load_checkpoint(bad)


def test_data_module_rejects_a_dictionary_of_another_length(tmp_path, seq, small):
    path = tmp_path / "d.h5"
    dictionary.save(small, path)
    dm = FingerprintDataModule(oksuz2019(n_pulses=120, lobe_length=20), path=str(path),
                               n_test=10, progress=False)
    with pytest.raises(ValueError, match="100 time points.*120"):
        dm.setup()


# --------------------------------------------------------------------------------------------
# nothing is lost
# --------------------------------------------------------------------------------------------

#: calls that write a file: (object the method is called on or None for any, method name)
_WRITERS = {("np", "save"), ("np", "savez"), ("np", "savez_compressed"), ("numpy", "save"),
            ("torch", "save"), ("nib", "save"), ("nibabel", "save"), ("OmegaConf", "save"),
            ("json", "dump"), ("io", "savemat"), (None, "savefig"), (None, "write_text"),
            (None, "write_bytes"), (None, "to_filename"), (None, "to_csv"), (None, "tofile")}
_BUFFERS = {"buf", "buffer", "bio"}  # in-memory targets (io.BytesIO)


def _writes_outside_atomic(path: Path) -> list[str]:
    """File writes in ``path`` that are not lexically inside ``with atomic_path(...)``."""
    tree = ast.parse(path.read_text())
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and getattr(
                    i.context_expr.func, "id", getattr(i.context_expr.func, "attr", "")
                ) == "atomic_path" for i in node.items):
            inside |= {id(n) for n in ast.walk(node)}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in inside:
            continue
        f = node.func
        name = getattr(f, "attr", getattr(f, "id", ""))
        owner = getattr(getattr(f, "value", None), "id", None)
        mode = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
        mode += [k.value.value for k in node.keywords
                 if k.arg == "mode" and isinstance(k.value, ast.Constant)]
        if name in ("open", "File") and any(isinstance(m, str) and set(m) & set("wax")
                                            for m in mode):
            bad.append(f"{path.name}:{node.lineno} {name}({mode[0]!r})")
        elif isinstance(f, ast.Attribute) and ((owner, name) in _WRITERS
                                               or (None, name) in _WRITERS):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Name) and first.id in _BUFFERS:
                continue
            bad.append(f"{path.name}:{node.lineno} {owner}.{name}")
    return bad


def test_every_file_write_goes_through_atomic_path(tmp_path):
    """Static audit: every write call of the package and the benchmarks sits in atomic_path.

    (Checkpoints are written by Lightning, which writes them atomically itself; Hydra's own
    ``.hydra/*.yaml`` and the CSV/W&B logs are the libraries' files.)
    """
    files = sorted((ROOT / "mrflight").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    bad = [b for f in files for b in _writes_outside_atomic(f)]
    assert not bad, f"writes outside mrflight.fileio.atomic_path: {bad}"
    # the audit finds a plain write
    probe = tmp_path / "probe.py"
    probe.write_text("import json, numpy as np\n"
                     "with atomic_path(p) as t:\n    np.save(t, x)\n"
                     "np.save(p, x)\nfig.savefig(p)\nopen(p, 'w')\njson.dump(x, f)\n")
    assert [b.split()[1] for b in _writes_outside_atomic(probe)] == [
        "np.save", "fig.savefig", "open('w')", "json.dump"]


def test_killed_cache_writer_never_leaves_a_used_corrupt_cache(tmp_path, seq):
    """SIGKILL a process in the middle of generating + caching a dictionary, many times."""
    cache = tmp_path / "cache"
    p = dictionary.random_params(n=40000, seed=2)
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from mrflight import dictionary
        from mrflight.physics.sequence import oksuz2019
        print("go", flush=True)
        dictionary.generate(oksuz2019(n_pulses=100, lobe_length=20),
                            dictionary.random_params(n=40000, seed=2),
                            cache_dir={str(cache)!r}, progress=False)
    """)
    killed_mid_write = 0
    for delay in (0.0, 0.002, 0.01):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        proc.stdout.readline()  # imports done
        deadline = time.time() + 60
        while not list(cache.glob(".*.tmp")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.0005)  # the temporary cache file exists: the write has started
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and not list(cache.glob("*.h5")):
            killed_mid_write += 1
        for f in cache.glob("*.h5"):  # a finished file must be whole
            dictionary.load(f, require_checksum=True)
    assert killed_mid_write >= 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = dictionary.generate(seq, p, cache_dir=cache, progress=False)
    assert not [x for x in w if "corrupt" in str(x.message)]  # nothing half-written was read
    np.testing.assert_array_equal(d.atoms, dictionary.generate(seq, p, progress=False).atoms)
    assert len(list(cache.glob("*.h5"))) == 1
    again = dictionary.load(next(cache.glob("*.h5")), require_checksum=True)
    np.testing.assert_array_equal(again.atoms, d.atoms)


def test_killed_generate_to_file_keeps_the_old_file(tmp_path, seq, small):
    target = tmp_path / "big.h5"
    dictionary.save(small, target)
    script = textwrap.dedent(f"""
        from mrflight import dictionary
        from mrflight.physics.sequence import oksuz2019
        print("go", flush=True)
        dictionary.generate_to_file(oksuz2019(n_pulses=100, lobe_length=20),
                                    dictionary.random_params(n=200000, seed=2),
                                    {str(target)!r}, chunk_atoms=2000, progress=False,
                                    overwrite=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    proc.stdout.readline()
    deadline = time.time() + 60
    while not list(tmp_path.glob(".big.h5.*")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # let it write a few chunks
    tmp = list(tmp_path.glob(".big.h5.*"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp and proc.returncode == -signal.SIGKILL
    old = dictionary.load(target, require_checksum=True)
    np.testing.assert_array_equal(old.atoms, small.atoms)


def test_generate_to_file_refuses_an_existing_file_before_simulating(tmp_path, seq, small):
    target = tmp_path / "mine.h5"
    dictionary.save(small, target)
    before = target.read_bytes()
    p = dictionary.random_params(n=50, seed=4)
    with pytest.raises(ValueError, match="already exists: pass overwrite=True"):
        dictionary.generate_to_file(seq, p, target, progress=False)
    assert target.read_bytes() == before and sorted(tmp_path.iterdir()) == [target]
    dictionary.generate_to_file(seq, p, target, progress=False, overwrite=True)
    assert len(dictionary.load(target, require_checksum=True)) == 50


def test_a_file_written_meanwhile_by_another_process_is_kept(tmp_path, small):
    """The existence check and the rename are one step: a file that appears at the destination
    while ours is being written (another job saving to the same name) is not replaced."""
    target = tmp_path / "race.npz"
    with pytest.raises(FileExistsError, match="another process wrote this file meanwhile") as e:
        with atomic_path(target, replace=False) as tmp:
            tmp.write_bytes(b"ours")
            target.write_bytes(b"theirs")  # the other job finishes first
    assert str(target) in str(e.value)
    assert target.read_bytes() == b"theirs" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(tmp_path / "free.npz", replace=False) as tmp:
        tmp.write_bytes(b"ours")
    assert (tmp_path / "free.npz").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free.npz", "race.npz"]


def test_generate_to_file_streams_the_same_dictionary(tmp_path, seq):
    p = dictionary.random_params(n=700, seed=4)
    ref = dictionary.generate(seq, p, progress=False)
    one = dictionary.load(dictionary.generate_to_file(seq, p, tmp_path / "one.h5",
                                                      chunk_atoms=10_000, progress=False),
                          require_checksum=True)
    np.testing.assert_array_equal(one.atoms, ref.atoms)  # one chunk: bit-identical
    np.testing.assert_array_equal(one.params, ref.params)
    assert one.sequence == ref.sequence and one.meta == ref.meta
    # small chunks: every atom within the truncation tolerance of an untruncated reference
    path = dictionary.generate_to_file(seq, p, tmp_path / "chunked.h5", chunk_atoms=37,
                                       progress=False)
    chunked = dictionary.load(path, require_checksum=True)
    exact = simulate(seq, p[:, 0], p[:, 1], dtype=torch.float64, tol=1e-9).numpy()

    def err(a):
        a, b = np.abs(a), np.abs(exact)
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return np.linalg.norm(a - b, axis=1)

    # (chunks keep at least the states of one big call, so they are at least as accurate; note
    # that on this 100-pulse train one big call exceeds tol=1e-3 on a few atoms, max ~2e-3)
    assert err(chunked.atoms).max() <= max(1e-3, err(ref.atoms).max())
    assert not np.array_equal(chunked.atoms, ref.atoms)  # the comparison above is not trivial
    with dictionary.open_h5(path, verify=True) as (atoms, params, header):
        assert atoms.shape == (700, 100) and header["param_names"] == ["t1_ms", "t2_ms"]
        np.testing.assert_array_equal(atoms[100:110], chunked.atoms[100:110])
        np.testing.assert_array_equal(params, p)
    # b1 columns as in generate
    b1 = np.linspace(0.7, 1.2, len(p))
    withb1 = dictionary.load(dictionary.generate_to_file(seq, p, tmp_path / "b1.h5", b1=b1,
                                                         chunk_atoms=1000, progress=False))
    np.testing.assert_array_equal(withb1.atoms, dictionary.generate(seq, p, b1=b1,
                                                                    progress=False).atoms)
    assert withb1.param_names == ("t1_ms", "t2_ms", "b1")
    for bad in (dict(chunk_atoms=0), dict(chunk_atoms=2.5), dict(path=tmp_path / "x.npz")):
        kw = {"path": tmp_path / "x.h5", "progress": False, **bad}
        with pytest.raises(ValueError, match="chunk_atoms|h5"):
            dictionary.generate_to_file(seq, p, **kw)


def test_open_h5_detects_damage(tmp_path, seq):
    p = dictionary.random_params(n=300, seed=5)
    path = dictionary.generate_to_file(seq, p, tmp_path / "d.h5", chunk_atoms=64,
                                       progress=False)
    import h5py

    with h5py.File(path, "r+") as f:
        f["atoms"][150, 7] = 0
    with pytest.raises(ValueError, match="checksum"):
        with dictionary.open_h5(path, verify=True):
            pass
    with pytest.raises(ValueError, match="does not exist"):
        with dictionary.open_h5(tmp_path / "none.h5"):
            pass


# --------------------------------------------------------------------------------------------
# under load: memory does not grow across epochs
# --------------------------------------------------------------------------------------------

def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no way to read the resident set size")


class _RSS(L.Callback):
    def __init__(self):
        self.mb = []

    def on_train_epoch_end(self, trainer, pl_module):
        import gc

        gc.collect()
        self.mb.append(_rss_mb())


def test_memory_does_not_grow_across_epochs(seq):
    from mrflight.models import GRURegressor

    p = dictionary.random_params(n=3000, seed=6)
    dm = FingerprintDataModule(seq, params=p, n_test=200, batch_size=64, progress=False, seed=0)
    torch.manual_seed(0)
    module = MRFRegressor(GRURegressor(input_length=len(seq), hidden_size=32,
                                       values_per_step=10), sequence=seq.to_dict())
    rss = _RSS()
    trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[rss])
    trainer.fit(module, datamodule=dm)
    mb = np.array(rss.mb)
    assert len(mb) == 8
    # after the first two epochs (allocator warm-up) the resident size stays flat
    growth = mb[2:].max() - mb[2]
    assert growth < 20, f"RSS per epoch (MB): {np.round(mb, 1).tolist()}"


def test_a_requeued_slurm_job_resumes_its_run(tmp_path, monkeypatch, capsys):
    """Slurm requeues a preempted job (a submitit multirun's, or ``sbatch --requeue``) with its
    first command line, no ckpt_path, into the folder of its run: the run resumes from its last
    checkpoint and ends as an uninterrupted run, instead of the folder being refused."""
    args = ["model=ann", "trainer.max_epochs=3", "test=false"]
    _, full, m_full = _train(tmp_path / "full", *args)
    out = tmp_path / "job"
    _preempted(monkeypatch, tmp_path, out, args, epoch=1)
    with pytest.raises(ValueError, match="already holds the results"):  # not requeued
        train(compose_config([*TINY, *args], output_dir=out))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _, resumed, m_res = _train(out, *args)
    assert resumed["global_step"] == full["global_step"]
    _same_weights(full["state_dict"], resumed["state_dict"])
    assert m_res == m_full
    # a requeued job whose first attempt saved nothing yet starts as a new run
    fresh = tmp_path / "fresh"
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / ".hydra" / "config.yaml").write_text("{}")
    _, started, _ = _train(fresh, *args)
    assert started["global_step"] == full["global_step"]


def test_a_requeued_job_does_not_resume_a_finished_run(tmp_path, monkeypatch):
    """SLURM_RESTART_COUNT (a requeued job, or a shell that inherited it) in the folder of a
    finished run: the folder is refused as another run's, its metrics.json kept (a resume
    would test again and rewrite it without the run's training and validation metrics)."""
    out = tmp_path / "run"
    args = ["model=ann", "trainer.max_epochs=1"]
    _train(out, *args)
    before = (out / "metrics.json").read_text()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(ValueError, match="already holds the results"):
        train(compose_config([*TINY, *args], output_dir=out))
    assert (out / "metrics.json").read_text() == before


def test_a_finished_run_is_not_resumed_into_its_own_results(tmp_path, monkeypatch):
    """``ckpt_path=last`` on a finished run with nothing left to train would test again and
    rewrite its metrics.json without the training and validation metrics; with its checkpoints
    gone it was taken for a run that never started and retrained. Both are refused, with the
    way on; raising trainer.max_epochs still trains it further."""
    args = ["model=ann", "trainer.max_epochs=1"]
    out = tmp_path / "run"
    _train(out, *args)
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match="has finished its 1 epoch.*trainer.max_epochs above 1"
                       ".*use python eval.py ckpt_path="):
        train(compose_config([*TINY, *args, "ckpt_path=last"], output_dir=out))
    with monkeypatch.context() as m:  # the installed console script's user is told its name
        m.setattr(sys, "argv", ["/home/u/.local/bin/mrflight-train", "ckpt_path=last"])
        with pytest.raises(ValueError, match="to evaluate it use mrflight-eval ckpt_path="):
            train(compose_config([*TINY, *args, "ckpt_path=last"], output_dir=out))
    assert (out / "metrics.json").read_bytes() == before
    _, ck, metrics = _train(out, "model=ann", "trainer.max_epochs=2", "ckpt_path=last")
    assert ck["epoch"] == 1 and "val/loss" in metrics
    for f in (out / "checkpoints").glob("*.ckpt"):
        f.unlink()
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match="has finished and its checkpoints are gone"):
        train(compose_config([*TINY, "model=ann", "trainer.max_epochs=2", "ckpt_path=last"],
                             output_dir=out))
    assert (out / "metrics.json").read_bytes() == before


def test_resuming_an_eval_folder_says_it_is_not_a_training_run(tmp_path):
    """eval.py writes outputs/DATE/TIME/ as train.py does, with a metrics.json: ckpt_path=last
    there is not a training run whose checkpoints are gone."""
    from mrflight.checkpoints import resume_checkpoint

    (tmp_path / "eval.log").write_text("")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="is an eval.py output folder .*not a training run"):
        resume_checkpoint("last", tmp_path)


def test_a_run_folder_moved_before_its_resume_tests_its_own_best_checkpoint(tmp_path):
    """Lightning restores the best checkpoint's path as the checkpoint recorded it, in the old
    folder: a run stopped during its test (all epochs done, no metrics.json) and moved failed
    its resumed test (file not found) or, with the old folder still there, tested that
    folder's file."""
    import shutil

    args = ["model=ann", "trainer.max_epochs=2"]
    old, new = tmp_path / "old", tmp_path / "new"
    _, _, first = _train(old, *args)
    (old / "metrics.json").unlink()  # as if stopped during the test
    shutil.move(old, new)
    _, ck, metrics = _train(new, *args, "ckpt_path=last")
    assert ck["epoch"] == 1 and metrics["test/loss"] == first["test/loss"]


def test_another_runs_checkpoint_is_not_continued_into_a_finished_runs_folder(tmp_path):
    """``hydra.run.dir=A ckpt_path=B`` continues run B: where A holds another run's results,
    they were overwritten (metrics.json, last.ckpt, the CSV log and config.yaml, B's
    checkpoints mixed with A's) since any resume skipped the check of the folder. It is
    refused, naming the way on (another hydra.run.dir), which works; B's own folder still
    resumes, and a second try of the same command in its unfinished folder goes on."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _train(a, "model=ann", "trainer.max_epochs=1")
    _train(b, "model=ann", "trainer.max_epochs=1", "seed=5")
    before = {p: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    args = ["model=ann", "trainer.max_epochs=2", f"ckpt_path={b}"]
    with pytest.raises(ValueError, match=f"already holds the results.*continue ckpt_path={b} "
                                         "in another hydra.run.dir"):
        train(compose_config([*TINY, *args], output_dir=a))
    assert {p: p.read_bytes() for p in a.rglob("*") if p.is_file()} == before
    _, ck, _ = _train(c, *args)  # the way the message names
    assert ck["epoch"] == 1
    (c / "metrics.json").unlink()  # as if stopped during the test: the command runs again
    _, ck, _ = _train(c, *args)
    assert ck["epoch"] == 1


def test_a_requeued_job_continuing_another_run_goes_on_from_its_own_progress(tmp_path,
                                                                            monkeypatch):
    """A job started with ``ckpt_path=B`` (continuing run B in its own folder), preempted after
    an epoch and requeued with the same command: it goes on from its own last.ckpt, not from
    B again (its finished epochs retrained and its last.ckpt overwritten), and ends as an
    uninterrupted continuation of B."""
    b = tmp_path / "b"
    _train(b, "model=ann", "trainer.max_epochs=1", "test=false")
    args = ["model=ann", "trainer.max_epochs=3", "test=false", f"ckpt_path={b}"]
    _, full, m_full = _train(tmp_path / "full", *args)
    job = tmp_path / "job"
    _preempted(monkeypatch, tmp_path, job, args, epoch=2)
    assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    seen = []
    real = MRFRegressor.on_train_start
    monkeypatch.setattr(MRFRegressor, "on_train_start",
                        lambda self: (seen.append(self.current_epoch), real(self))[1])
    _, resumed, m_res = _train(job, *args)
    assert seen == [2]  # from its own epoch-1 checkpoint, not from B's
    _same_weights(full["state_dict"], resumed["state_dict"])
    assert m_res == m_full


def test_a_run_stopped_before_it_saved_anything_is_told_to_start_again(tmp_path):
    """Killed before its config was saved, a run's folder holds only Hydra's .hydra/:
    ``ckpt_path=last`` there names the command that works, which does."""
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("{}")
    with pytest.raises(ValueError, match="starts again without ckpt_path"):
        train(compose_config([*TINY, "model=ann", "ckpt_path=last"], output_dir=out))
    _, ck, _ = _train(out, "model=ann", "trainer.max_epochs=1")
    assert ck["epoch"] == 0
