"""Fresh simulated training data (data=simulated), B1 as a target, and the losses."""

import math

import numpy as np
import pytest
import torch

from mrflight.data import Batch, ParameterPrior, SimulatedDataModule, preprocess
from mrflight.physics import Sequence, oksuz2019, simulate
from mrflight.regressor import MRFRegressor

SMALL = dict(targets=["t1", "t2", "b1"], batch_size=16, batches_per_epoch=3, n_val=32,
             n_test=32, eval_noise_levels=[0.01], num_workers=0, progress=False, seed=5)


@pytest.fixture(scope="module")
def seq() -> Sequence:
    return oksuz2019(n_pulses=100, lobe_length=20)


def test_prior_ranges_and_distribution():
    prior = ParameterPrior(t1_range=(50, 5000), t2_range=(5, 600), b1_range=(0.7, 1.3),
                           noise_std=(0.005, 0.03))
    p, noise = prior.sample(20000, np.random.default_rng(0))
    t1, t2, b1 = p.T
    assert (t1 >= 50).all() and (t1 <= 5000).all()
    assert (t2 >= 5).all() and (t2 <= np.minimum(t1, 600)).all()
    assert (b1 >= 0.7).all() and (b1 <= 1.3).all()
    assert (noise >= 0.005).all() and (noise <= 0.03).all()
    # log-uniform: the median of T1 is the geometric mean of the range, not the midpoint
    assert abs(np.median(t1) / math.sqrt(50 * 5000) - 1) < 0.05
    assert abs(np.median(noise) / math.sqrt(0.005 * 0.03) - 1) < 0.05
    # uniform B1: mean at the centre
    assert abs(b1.mean() - 1.0) < 0.01
    fixed = ParameterPrior(noise_std=0.01, b1_range=None)
    p, noise = fixed.sample(100, np.random.default_rng(1))
    assert (noise == 0.01).all() and (p[:, 2] == 1).all()
    # the extremes the simulation's truncation is verified for cover every draw
    for t2_le_t1 in (True, False):
        short = ParameterPrior(t1_range=(100, 400), t2_range=(10, 500), t2_le_t1=t2_le_t1)
        p, _ = short.sample(5000, np.random.default_rng(3))
        top = short.bounds()
        assert top["t2_max"] == (400 if t2_le_t1 else 500) >= p[:, 1].max() > 0.9 * top["t2_max"]
        assert top["t1_max"] == 400 >= p[:, 0].max()


@pytest.mark.parametrize("distribution", ["log-uniform", "uniform"])
def test_prior_t2_below_t1_in_its_distribution_and_b1_over_its_whole_range(distribution):
    """Given T1, T2 is drawn from [5 ms, min(T1, 600 ms)] in the prior's distribution (its
    position in that interval, in log or linear units, is uniform: mean 1/2, quartiles 1/4 and
    3/4), and B1 is uniform over the whole of b1_range (its ends reached, std 0.6 / sqrt(12))."""
    prior = ParameterPrior(t1_range=(50, 5000), t2_range=(5, 600), b1_range=(0.7, 1.3),
                           noise_std=(0.005, 0.03), distribution=distribution)
    p, _ = prior.sample(20000, np.random.default_rng(2))
    t1, t2, b1 = p.T
    hi = np.minimum(t1, 600)
    f = np.log if distribution == "log-uniform" else (lambda x: x)
    u = (f(t2) - f(5.0)) / (f(hi) - f(5.0))  # uniform on [0, 1] under the prior
    assert abs(u.mean() - 0.5) < 0.01
    np.testing.assert_allclose(np.quantile(u, [0.25, 0.75]), [0.25, 0.75], atol=0.015)
    assert b1.min() < 0.705 and b1.max() > 1.295
    assert abs(b1.std() / (0.6 / math.sqrt(12)) - 1) < 0.02


@pytest.mark.parametrize("bad", [dict(t1_range=(0, 10)), dict(noise_std=(0.0, 0.1)),
                                 dict(distribution="normal"), dict(t2_range=(100, 200),
                                                                   t1_range=(50, 300)),
                                 dict(noise_std=float("inf"))])
def test_prior_rejects_bad_ranges(bad):
    with pytest.raises(ValueError, match="data.|distribution"):
        ParameterPrior(**bad)


def test_batch_is_a_function_of_seed_epoch_index(seq):
    dm = SimulatedDataModule(seq, **SMALL)
    dm.setup("fit")
    ds = dm.train_set
    a, b = ds[(0, 1)], ds[(0, 1)]
    assert torch.equal(a.signal, b.signal) and torch.equal(a.params_ms, b.params_ms)
    c = ds[(1, 1)]
    assert not torch.equal(a.params_ms, c.params_ms)
    # another data module with the same seed (a resumed run, a loader worker) draws the same
    dm2 = SimulatedDataModule(seq, **SMALL)
    dm2.setup("fit")
    assert torch.equal(dm2.train_set[(0, 1)].signal, a.signal)
    # drawn on the loader, realised on the device later (one batch per launch): the same batch
    dm3 = SimulatedDataModule(seq, **SMALL, batches_per_launch=1)
    dm3.setup("fit")
    dm3.train_set.simulate_here = False
    late = dm3.on_after_batch_transfer(dm3.train_set[(0, 1)], 0)
    assert torch.allclose(late.signal, a.signal, atol=1e-4)


def test_training_noise_is_fresh_in_every_epoch_and_batch(seq):
    """Each training batch draws its own noise: batch i of epoch 1 does not repeat the noise of
    batch i of epoch 0 (nor of batch j of the same epoch). Without a random phase the imaginary
    channel of a complex input is the noise alone (the fingerprint of a 0/180-degree train is
    real), so two batches sharing their noise would have imaginary channels of correlation
    +-1 (measured: |cos| > 0.98 when the noise stream ignored the epoch; ~0.1 apart)."""
    dm = SimulatedDataModule(seq, **{**SMALL, "input_mode": "complex", "random_phase": False,
                                     "noise_std": 0.01})
    dm.setup("fit")
    ds = dm.train_set

    def imag(epoch, i):
        return ds[(epoch, i)].signal[:, 1].double()

    ref = imag(0, 1)
    assert float(ref.std(dim=1).median()) > 0.005  # the noise (std 0.01 / ||x||) is there
    for other in (imag(1, 1), imag(2, 1), imag(0, 2)):
        cos = torch.nn.functional.cosine_similarity(ref, other, dim=1).abs()
        assert float(cos.median()) < 0.5, cos


def _device_batches(seq, first=0, **kw):
    dm = SimulatedDataModule(seq, **{**SMALL, "batches_per_epoch": 5, "batches_per_launch": 2,
                                     "simulate_on": "device", **kw})
    dm.setup("fit")
    dm.train_set.simulate_here = False
    return dm, [dm.on_after_batch_transfer(dm.train_set[(0, i)], 0) for i in range(first, 5)]


def test_device_simulation_launches_several_batches_at_once(seq, monkeypatch):
    """On the device, one call simulates and noises batches_per_launch batches; each batch keeps
    its own parameters and noise level, its clean signal matches the per-batch simulation (up to
    the truncation shared by a launch's atoms, <= tol), its noise has the drawn level and differs
    from its neighbours', and a run resumed inside a launch gets the same batches."""
    calls = []
    sim = SimulatedDataModule.simulator.fget

    def counting(self):
        s = sim(self)
        if not hasattr(s, "_counted"):
            inner = s.simulate
            s.simulate = lambda p: calls.append(len(p)) or inner(p)
            s._counted = True
        return s
    monkeypatch.setattr(SimulatedDataModule, "simulator", property(counting))
    dm, got = _device_batches(seq)
    assert calls == [32, 32, 16]  # batches (0, 1), (2, 3), (4)
    ds = dm.train_set
    ds.simulate_here = True
    for i, g in enumerate(got):
        ref = ds[(0, i)]
        assert torch.equal(g.params_ms, ref.params_ms) and torch.equal(g.key, ref.key)
        assert g.signal.shape == ref.signal.shape
    # noise-free: the per-batch simulation; noisy: residuals at each sample's drawn level
    cdm, clean = _device_batches(seq, noise_std=0.0)
    cdm.train_set.simulate_here = True
    for i, c in enumerate(clean):
        ref = cdm.train_set[(0, i)]
        assert (c.signal - ref.signal).norm() <= 1e-3 * ref.signal.norm() + 1e-6
    res = torch.cat([g.signal - c.signal for g, c in zip(got, clean)])
    std = torch.cat([g.noise_std for g in got])
    # magnitude of (unit fingerprint + complex noise): residual std ~ noise std per sample
    # (measured: 0.967; a noise std 1/sqrt(2) too small gave 0.69)
    ratio = res.std(dim=1) / std
    assert 0.9 < float(ratio.median()) < 1.05
    assert not torch.allclose(got[0].signal - clean[0].signal, got[1].signal - clean[1].signal)
    _, resumed = _device_batches(seq, first=3)
    assert torch.equal(resumed[0].signal, got[3].signal)
    with pytest.raises(ValueError, match="batches_per_launch"):
        SimulatedDataModule(seq, **{**SMALL, "batches_per_launch": 0})


def test_noise_free_batch_is_the_normalised_simulation(seq):
    dm = SimulatedDataModule(seq, **{**SMALL, "noise_std": 0.0})
    dm.setup("fit")
    batch = dm.train_set[(0, 0)]
    p = batch.sim_params
    ref = simulate(seq, p[:, 0], p[:, 1], p[:, 2], dtype=torch.float64)
    ref = ref.abs() / ref.abs().norm(dim=1, keepdim=True)
    assert torch.allclose(batch.signal.double(), ref, atol=2e-4)
    # targets: T1, T2 in ms, B1 as a ratio, scaled by the default 2000 / 500 / 2
    assert torch.allclose(batch.params_ms, p.float())
    assert torch.allclose(batch.target, p.float() / torch.tensor([2000.0, 500.0, 2.0]))


def test_random_phase_and_realisations(seq):
    dm = SimulatedDataModule(seq, **{**SMALL, "input_mode": "complex", "realizations": 4,
                                     "noise_std": 0.0})
    dm.setup("fit")
    batch = dm.train_set[(0, 0)]
    assert batch.signal.shape == (4 * 16, 2, len(seq))
    z = torch.complex(batch.signal[:, 0], batch.signal[:, 1])
    # noise-free realisations of one fingerprint are identical; phases differ between atoms
    assert torch.allclose(z[0], z[3])
    p = batch.sim_params
    ref = simulate(seq, p[:, 0], p[:, 1], p[:, 2], dtype=torch.float64)
    ref = ref / ref.norm(dim=1, keepdim=True)
    inner = (z[::4].conj().to(torch.complex128) * ref).sum(1)
    assert torch.allclose(inner.abs(), torch.ones(16, dtype=torch.float64), atol=1e-4)
    assert inner.angle().std() > 0.5  # random global phases


def test_fixed_sets_are_seeded_and_reported_at_levels(seq):
    dm = SimulatedDataModule(seq, **SMALL)
    v1 = dm.fixed_sets("val")
    v2 = SimulatedDataModule(seq, **SMALL).fixed_sets("val")
    assert torch.equal(v1["params"], v2["params"])
    assert torch.equal(v1["sets"][1].signals, v2["sets"][1].signals)
    assert dm.eval_set_names == ["", "@0.01"]
    assert len(v1["sets"]) == 2
    t = dm.fixed_sets("test")
    assert not torch.equal(t["params"][:32], v1["params"])


def test_fixed_sets_draw_distinct_noise_at_every_level(seq, monkeypatch):
    """Every validation and test set has its own noise stream, with more than ten noise levels
    too (the first ten keep the seeds of the published results)."""
    from mrflight.data import simulated

    seeds, realise = [], simulated.realise

    def spy(clean, std, g, *args, **kw):
        seeds.append(g.initial_seed())
        return realise(clean, std, g, *args, **kw)

    monkeypatch.setattr(simulated, "realise", spy)
    levels = [0.001 * (i + 1) for i in range(12)]
    dm = SimulatedDataModule(seq, **{**SMALL, "n_val": 4, "n_test": 4,
                                     "eval_noise_levels": levels})
    dm.fixed_sets("val"), dm.fixed_sets("test")
    assert len(seeds) == 2 * 13 and len(set(seeds)) == len(seeds)
    assert seeds[:3] == [1_000_003 + 10, 1_000_003 + 11, 1_000_003 + 12]


def _same_tensors(a: Batch, b: Batch) -> bool:
    """Every field equal in values, dtype, shape and strides (or None in both)."""
    return all((x is None and y is None) or (
        x is not None and y is not None and x.dtype == y.dtype and x.shape == y.shape
        and x.stride() == y.stride() and torch.equal(x, y)) for x, y in zip(a, b))


def test_evaluation_batches_are_the_stacked_samples(seq):
    """An evaluation loader's batch (taken from the fixed set at once) is the stack of its
    samples, in the loader's order, the last one short."""
    from mrflight.data.batches import collate

    dm = SimulatedDataModule(seq, **{**SMALL, "n_val": 37, "eval_batch_size": 16})
    dm.with_bound = True
    for loader in dm.val_dataloader():
        ds, n = loader.dataset, 0
        for b in loader:
            items = [ds[i] for i in range(n, n + len(b.signal))]
            assert _same_tensors(b, collate(items)) and b.bound is not None
            n += len(b.signal)
        assert n == 37


def test_ddp_ranks_each_train_every_batch_of_their_own_stream(seq):
    """Under DDP Lightning shares a training loader's keys out among the ranks unless its
    sampler is a DistributedSampler. Each rank draws its own batches (its rank is in every
    draw), so the keys must reach every rank whole and in order: shared out, each rank would
    train a random part of the epoch (and on a GPU simulate whole launches to use a part)."""
    import lightning as L
    from lightning.pytorch.trainer.states import RunningStage

    dm = SimulatedDataModule(seq, **SMALL)
    dm.setup("fit")
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)
    assert trainer._accelerator_connector.is_distributed
    loader = trainer._data_connector._prepare_dataloader(dm.train_dataloader(), shuffle=True,
                                                         mode=RunningStage.TRAINING)
    assert list(loader.sampler) == [(0, 0), (0, 1), (0, 2)]


def _loader_batches(num_workers: int) -> list:
    """The training batches of a small data module through a DataLoader with workers."""
    seq = oksuz2019(n_pulses=100, lobe_length=20)
    dm = SimulatedDataModule(seq, **{**SMALL, "num_workers": num_workers})
    dm.setup("fit")
    dm.train_set.simulate_here = True
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    return [b.signal for b in loader]


def test_loader_workers_start_in_a_joblib_launcher_job():
    """Hydra's joblib launcher (hydra/launcher=parallel) runs each job in a loky worker,
    whose default multiprocessing start method is "loky": a DataLoader left to it could not
    start its workers ("'Process' object has no attribute 'env'"), so every data=simulated job
    (one loader worker by default) failed. In such a job the loader workers start with the
    platform's method and yield the batches of a run without workers, each batch once."""
    from joblib import Parallel, delayed

    from mrflight.data.batches import loader_context

    assert loader_context(0) is None and loader_context(1) is None  # here: the default
    out = Parallel(n_jobs=2, backend="loky")(delayed(_loader_batches)(w) for w in (1, 2))
    expected = _loader_batches(0)
    assert len(expected) == SMALL["batches_per_epoch"]
    for got in out:
        assert len(got) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(expected[0], expected[1])


def _module(loss="mse", bias_weight=0.0, targets=("t1", "t2", "b1")):
    net = {"_target_": "mrflight.models.ANNRegressor", "input_length": 10,
           "n_outputs": len(targets), "hidden_sizes": [8]}
    return MRFRegressor(net, target_scale_ms=[4000.0, 500.0, 1.0][:len(targets)],
                        targets=list(targets), loss=loss, bias_weight=bias_weight)


def test_losses_by_hand():
    torch.manual_seed(0)
    target = torch.rand(5, 3) + 0.1
    pred = target + 0.1 * torch.randn(5, 3)
    bound_units = torch.rand(5, 3) + 0.5
    batch = Batch(torch.empty(0), target, target * torch.tensor([4000.0, 500.0, 1.0]),
                  bound=bound_units * torch.tensor([4000.0, 500.0, 1.0]))
    assert torch.allclose(_module("mse").loss(pred, batch), ((pred - target) ** 2).mean())
    assert torch.allclose(_module("relative").loss(pred, batch),
                          (((pred - target) / target) ** 2).mean())
    assert torch.allclose(_module("crb").loss(pred, batch),
                          (((pred - target) / bound_units) ** 2).mean())
    # log: the net's outputs are the logs of the scaled targets, mapped back by exp
    log_module = _module("log")
    assert torch.allclose(log_module.loss(pred, batch), ((pred - target.log()) ** 2).mean())
    assert torch.allclose(log_module.to_params(target.log()), batch.params_ms)
    assert torch.allclose(_module("mse").to_params(target), batch.params_ms)
    assert torch.allclose(_module("l1").loss(pred, batch), (pred - target).abs().mean())
    # K = 3 realisations per fingerprint: mean e^2 + w * mean(bias^2)
    k = 3
    pk = target.repeat_interleave(k, 0) + 0.1 * torch.randn(15, 3)
    e = pk - target.repeat_interleave(k, 0)
    bias = e.view(5, k, 3).mean(1)
    got = _module("mse", bias_weight=2.0).loss(pk, batch)
    assert torch.allclose(got, (e ** 2).mean() + 2.0 * (bias ** 2).mean())
    with pytest.raises(ValueError, match="bound"):
        _module("crb").loss(pred, batch._replace(bound=None))


def test_module_validates_targets():
    with pytest.raises(ValueError, match="targets"):
        _module(targets=("t2", "t1"))
    with pytest.raises(ValueError, match="loss"):
        _module(loss="mae")
    net = {"_target_": "mrflight.models.ANNRegressor", "input_length": 10, "n_outputs": 2}
    with pytest.raises(ValueError, match="outputs"):
        MRFRegressor(net, target_scale_ms=[1, 1, 1], targets=["t1", "t2", "b1"])


def test_train_simulated_end_to_end(tmp_path):
    from mrflight.pipeline import compose_config, train

    cfg = compose_config(["data=simulated", "sequence.n_pulses=100", "sequence.lobe_length=20",
                          "data.batches_per_epoch=4", "data.n_val=64", "data.n_test=64",
                          "data.batch_size=32", "data.num_workers=0", "trainer.max_epochs=2",
                          "logger=csv", "~callbacks.rich_progress_bar",
                          "++trainer.enable_progress_bar=false"], output_dir=tmp_path)
    train(cfg)
    import json

    import mrflight

    m = json.loads((tmp_path / "metrics.json").read_text())
    for k in ("test/t1_rmse_ms", "test/b1_rmse_pct", "val@0.01/t2_mae_ms", "val/loss"):
        assert math.isfinite(m[k]), k
    module = mrflight.load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert module.parameter_names == ["t1_ms", "t2_ms", "b1"]
    x = simulate(oksuz2019(n_pulses=100, lobe_length=20), [1000.0, 500.0], [80.0, 40.0],
                 [1.0, 0.9])
    out = module.predict_parameters(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    # maps of a series from a B1-estimating network carry a TB1map beside T1/T2/M0
    from mrflight.maps import NetworkReconstructor, make_maps

    seq = oksuz2019(n_pulses=100, lobe_length=20)
    t1 = torch.tensor([[800.0, 1200.0], [400.0, 2000.0]]).reshape(-1)
    t2 = torch.tensor([[60.0, 90.0], [40.0, 200.0]]).reshape(-1)
    b1 = torch.tensor([[0.9, 1.0], [1.1, 0.8]]).reshape(-1)
    series = simulate(seq, t1, t2, b1).abs().reshape(2, 2, -1).numpy()
    np.save(tmp_path / "series.npy", series)
    files = make_maps(tmp_path / "series.npy", NetworkReconstructor(module), tmp_path / "maps",
                      mask=np.ones((2, 2), bool))
    assert "TB1map.nii.gz" in files and "TB1map.json" in files
    b1map = np.load(files["TB1map.npy"])
    expect = module.predict_parameters(series.reshape(4, -1))[:, 2].reshape(2, 2).numpy()
    assert np.allclose(b1map, expect, rtol=1e-5)


def test_preprocess_unchanged_for_magnitude():
    x = torch.randn(3, 10, dtype=torch.complex64)
    y = preprocess(x, "magnitude")
    assert torch.allclose(y, x.abs() / x.abs().norm(dim=1, keepdim=True))


def test_align_phase_removes_any_global_phase():
    from mrflight.transforms import align_phase

    seq = oksuz2019()
    x = simulate(seq, [1000.0, 300.0, 3000.0, 60.0], [80.0, 30.0, 400.0, 50.0],
                 [1.0, 0.8, 1.2, 1.0], dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    ref = align_phase(x)
    assert ref.imag.abs().max() < 1e-10  # a 0/180-degree FISP train is real up to its phase
    for phi in (0.3, 2.0, -2.5, math.pi):
        y = x * complex(math.cos(phi), math.sin(phi))
        assert torch.allclose(align_phase(y), ref, atol=1e-10)
    inp = preprocess(x * 1j, "complex")
    assert inp.shape == (4, 2, len(seq)) and inp[:, 1].abs().max() < 1e-6


def test_a_run_without_seed_resumes_with_its_own_training_stream(tmp_path, monkeypatch):
    """seed=null: the training stream's seed is drawn at setup and kept in the checkpoint, so
    the resumed run trains on the stream it started on, not on a new random one."""
    from mrflight.pipeline import compose_config, train

    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    base = ["sequence.n_pulses=100", "sequence.lobe_length=20", "data.batches_per_epoch=2",
            "data.n_val=16", "data.n_test=16", "data.batch_size=8", "data.num_workers=0",
            "model.hidden_size=8", "logger=none", "~callbacks.rich_progress_bar",
            "++trainer.enable_progress_bar=false", "~callbacks.scatter_plot",
            "trainer.max_epochs=2", "test=false", "seed=null"]
    out = tmp_path / "run"
    seeds = []
    for i, extra in enumerate(("+trainer.max_steps=2", "ckpt_path=last")):
        # a resumed run is a new process, whose torch.initial_seed() is another random one
        torch.manual_seed(1000 + i)
        train(compose_config([*base, extra], output_dir=out))
        ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
        seeds.append(ck["SimulatedDataModule"]["seed"])
    assert ck["global_step"] == 4
    assert seeds[0] == seeds[1] == 1000  # the first process's, kept by the resumed run


#: three epochs of three batches of fresh fingerprints, in seconds
_SHORT_RUN = ["sequence.n_pulses=100", "sequence.lobe_length=20", "data.batches_per_epoch=3",
              "data.n_val=32", "data.n_test=32", "data.batch_size=16", "model.hidden_size=8",
              "logger=none", "~callbacks.rich_progress_bar",
              "++trainer.enable_progress_bar=false", "~callbacks.scatter_plot",
              "trainer.max_epochs=3", "test=false"]


def _short_run(out, *extra):
    """Train :data:`_SHORT_RUN` with ``extra`` into ``out``: its last.ckpt and metrics.json."""
    import json

    from mrflight.pipeline import compose_config, train

    train(compose_config([*_SHORT_RUN, *extra], output_dir=out))
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    return ck, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("callbacks", ["default", "[default,ema]"])
def test_simulated_run_resumes_to_the_same_result(tmp_path, monkeypatch, callbacks):
    """A batch is a function of (seed, epoch, index, rank): an interrupted run resumed from
    last.ckpt ends with the weights of an uninterrupted one, with a loader worker too, and
    with the moving average of the weights (callbacks=[default,ema]) the average as well."""
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))

    def run(out, *extra):
        return _short_run(out, "data.num_workers=1", f"callbacks={callbacks}", *extra)

    full, m_full = run(tmp_path / "full")
    part, _ = run(tmp_path / "cut", "+trainer.max_steps=3")
    assert part["global_step"] == 3
    resumed, m_res = run(tmp_path / "cut", "ckpt_path=last")
    assert resumed["global_step"] == full["global_step"] == 9
    states = ["state_dict"]
    if callbacks != "default":
        # the checkpoint holds the average; the raw weights differ from it and resume too
        states.append("current_model_state")
        assert full["averaging_state"]["n_averaged"].item() == 9
        assert not all(torch.equal(full["state_dict"][k], full["current_model_state"][k])
                       for k in full["state_dict"])
    for state in states:
        for k in full[state]:
            assert torch.equal(full[state][k], resumed[state][k]), (state, k)
    assert m_res["val/loss"] == m_full["val/loss"]
    if callbacks != "default":
        # testing a checkpoint keeps its averaged weights; a resumed fit goes on from the raw
        from types import SimpleNamespace

        import mrflight
        from mrflight.callbacks import WeightEMA

        ck_path = tmp_path / "full" / "checkpoints" / "last.ckpt"
        for fn, state in (("test", "state_dict"), ("fit", "current_model_state")):
            module = mrflight.load_checkpoint(ck_path)
            cb = WeightEMA()
            cb.on_load_checkpoint(SimpleNamespace(state=SimpleNamespace(fn=fn)), module, full)
            for k, v in module.state_dict().items():
                assert torch.equal(v, full[state][k]), (fn, k)


@pytest.mark.parametrize("options", [
    [],
    # validation after every batch, and only in every other epoch (not in the last)
    ["+trainer.val_check_interval=1", "trainer.check_val_every_n_epoch=2"],
], ids=["default", "validation_not_at_every_epochs_end"])
def test_a_run_cut_mid_epoch_resumes_from_its_last_finished_epoch(tmp_path, monkeypatch,
                                                                   options):
    """last.ckpt holds the end of every finished epoch and only that: an epoch cut short (by
    max_steps here, as by max_time) is trained again on resume, batch for batch as in an
    uninterrupted run; Lightning's checkpoint of the cut epoch recorded it as finished (the
    resumed run skipped its other batches and its learning-rate step), and where validation
    does not end every epoch it saved after a validation only (mid-epoch, or not at all in the
    last epoch)."""
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    options = ["data.num_workers=0", *options]
    full, m_full = _short_run(tmp_path / "full", *options)
    assert full["global_step"] == 9
    part, _ = _short_run(tmp_path / "cut", *options, "+trainer.max_steps=4")
    assert (part["epoch"], part["global_step"]) == (0, 3)
    resumed, m_res = _short_run(tmp_path / "cut", *options, "ckpt_path=last")
    assert resumed["global_step"] == 9
    for k in full["state_dict"]:
        assert torch.equal(full["state_dict"][k], resumed["state_dict"][k]), k
    assert m_res["val/loss"] == m_full["val/loss"]


def test_a_run_finished_by_max_steps_is_not_resumed_into_its_own_results(tmp_path,
                                                                         monkeypatch):
    """A run stopped by trainer.max_steps has finished (metrics.json): ckpt_path=last with the
    same limit trained nothing and tested again, rewriting metrics.json without its training
    and validation metrics. It is refused, naming the way on, which works."""
    from mrflight.pipeline import compose_config, train

    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    _short_run(out, "data.num_workers=0", "+trainer.max_steps=3")
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(ValueError, match=r"has finished its 3 step\(s\).*raise "
                                         r"\+trainer.max_steps above 3 \(-1: no limit\)"):
        train(compose_config([*_SHORT_RUN, "data.num_workers=0", "+trainer.max_steps=3",
                              "ckpt_path=last"], output_dir=out))
    assert (out / "metrics.json").read_bytes() == before
    ck, metrics = _short_run(out, "data.num_workers=0", "+trainer.max_steps=6", "ckpt_path=last")
    assert ck["global_step"] == 6 and "val/loss" in metrics


def test_checkpoints_record_the_priors_training_range_and_a_resume_keeps_it(tmp_path,
                                                                            monkeypatch):
    """Every checkpoint of a data=simulated run records the T1/T2 range of its training draws
    (``hparams["training_range"]``: the prior's ranges, T2's top capped at T1's), which maps
    read wherever the checkpoint goes; a resumed run records it again, and keeps its
    checkpoint's where the data module gives none."""
    import mrflight

    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    data = ["data.num_workers=0", "data.t1_range=[100.0,3000.0]", "data.t2_range=[10.0,5000.0]"]
    want = {"t1": [100.0, 3000.0], "t2": [10.0, 3000.0]}
    out = tmp_path / "run"
    ck, _ = _short_run(out, *data, "+trainer.max_steps=3")
    assert ck["hyper_parameters"]["training_range"] == want
    best = sorted((out / "checkpoints").glob("epoch_*.ckpt"))
    assert best and all(torch.load(b, weights_only=True)["hyper_parameters"]["training_range"]
                        == want for b in best)
    assert mrflight.load_checkpoint(best[0]).hparams["training_range"] == want
    monkeypatch.setattr(SimulatedDataModule, "training_range", property(lambda self: None))
    ck, _ = _short_run(out, *data, "+trainer.max_steps=6", "ckpt_path=last")
    assert ck["global_step"] == 6 and ck["hyper_parameters"]["training_range"] == want


def test_max_steps_ending_the_schedule_early_is_warned_about(tmp_path, monkeypatch, caplog):
    """The cosine schedule runs over trainer.max_epochs: a trainer.max_steps that ends training
    in an earlier epoch left the learning rate undecayed without a word."""
    import logging

    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.WARNING, logger="mrflight")
    _short_run(tmp_path / "run", "data.num_workers=0", "+trainer.max_steps=4")
    warned = [r.getMessage() for r in caplog.records if "max_steps" in r.getMessage()]
    assert warned == ["trainer.max_steps=4 stops training in epoch 2 of the 3 of the "
                      "learning-rate schedule (module.scheduler.T_max, which follows "
                      "trainer.max_epochs): the learning rate does not decay to its end; for "
                      "the whole schedule give trainer.max_epochs=2 (or "
                      "module.scheduler.T_max=2)"]


def _eval_indices_per_rank(dm, loader_fn, world: int) -> list[list[int]]:
    """The indices each of ``world`` DDP ranks evaluates, as Lightning prepares the loader."""
    import lightning as L
    from lightning.pytorch.trainer.states import RunningStage

    trainer = L.Trainer(strategy="ddp", devices=world, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False)
    out = []
    for rank in range(world):
        trainer.strategy.cluster_environment.set_global_rank(rank)  # as in rank's process
        dm.trainer = trainer
        loader = trainer._data_connector._prepare_dataloader(
            loader_fn(dm), shuffle=False, mode=RunningStage.VALIDATING)
        out.append(list(loader.sampler))
    return out


@pytest.mark.parametrize("kind", ["simulated", "stored"])
def test_ddp_evaluates_every_sample_once(seq, kind):
    """Under DDP the validation and test sets are split across the ranks and the metrics
    reduced over them: each sample must be scored exactly once. Lightning's default
    DistributedSampler pads a set to a multiple of the ranks with repeats (201 signals on 2
    ranks were scored as 202), so the metrics of a run on 2 processes were not those of 1."""
    from mrflight.data import FingerprintDataModule
    from mrflight.dictionary import random_params

    if kind == "simulated":
        dm = SimulatedDataModule(seq, **{**SMALL, "n_val": 33, "n_test": 35})
        sizes = {"val": 33, "test": 35}
    else:
        dm = FingerprintDataModule(sequence=seq, params=random_params(200, seed=3), n_test=35,
                                   val_fraction=0.2, batch_size=16, progress=False)
        dm.setup()
        sizes = {"val": len(dm.val_set), "test": 35}
    for split, fn in (("val", lambda d: d.val_dataloader()),
                      ("test", lambda d: d.test_dataloader())):
        first = lambda d, fn=fn: (lambda ls: ls[0] if isinstance(ls, list) else ls)(fn(d))
        ranks = _eval_indices_per_rank(dm, first, 2)
        assert sorted(i for r in ranks for i in r) == list(range(sizes[split])), split
        assert min(map(len, ranks)) >= 1
    one = SimulatedDataModule(seq, **{**SMALL, "n_val": 1})
    with pytest.raises(ValueError, match="data.n_val has 1 samples for 2 DDP processes"):
        _eval_indices_per_rank(one, lambda d: d.val_dataloader()[0], 2)
