"""The regressors: one contract, correct step reshaping, config round trips."""

import numpy as np
import pytest
import torch
from torch import nn

from mrflight.models import (
    REGISTRY,
    ANNRegressor,
    CNNRegressor,
    GRURegressor,
    LSTMRegressor,
    RecurrentRegressor,
    SubspaceRegressor,
    build_net,
    net_config,
)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("channels", [1, 2])
def test_contract_and_rebuild(name, channels):
    torch.manual_seed(0)
    net = REGISTRY[name](input_length=101, in_channels=channels)
    if not getattr(net, "has_basis", True):  # a subspace basis: any orthonormal one will do
        net.set_basis(torch.linalg.qr(torch.randn(101, net.rank)).Q)
    x = torch.randn(5, 101) if channels == 1 else torch.randn(5, 2, 101)
    y = net(x)
    assert y.shape == (5, 2) and torch.isfinite(y).all()
    # every sample is mapped independently: changing one input changes only its row
    x2 = x.clone()
    x2[0] += 1.0
    y2 = net(x2)
    assert not torch.allclose(y2[0], y[0]) and torch.allclose(y2[1:], y[1:], atol=1e-6)
    # (B, C*T) flattened input is accepted for C=2 and gives the same result
    if channels == 2:
        assert torch.allclose(net(x.reshape(5, -1)), y)
    # the recorded config rebuilds an identical architecture
    twin = build_net(net_config(net))
    twin.load_state_dict(net.state_dict())
    assert torch.equal(twin(x), y)
    with pytest.raises(ValueError, match="expects input"):
        net(torch.randn(5, 100))


@pytest.mark.parametrize("cls,rnn", [(GRURegressor, nn.GRU), (LSTMRegressor, nn.LSTM)])
@pytest.mark.parametrize("vps", [1, 4, 7])
def test_recurrent_steps_match_manual_reshape(cls, rnn, vps):
    """values_per_step=k feeds k consecutive time points per step (zero-padded at the end)."""
    torch.manual_seed(1)
    t = 30
    net = cls(input_length=t, hidden_size=8, values_per_step=vps)
    assert isinstance(net, RecurrentRegressor) and isinstance(net.rnn, rnn)
    x = torch.randn(3, t)
    steps = -(-t // vps)
    xp = torch.nn.functional.pad(x, (0, steps * vps - t)) * t ** 0.5
    out, _ = net.rnn(xp.reshape(3, steps, vps))
    expected = net.fc(out[:, -1])
    assert torch.allclose(net(x), expected, atol=1e-6)


def test_bidirectional_multilayer_lstm_uses_both_directions():
    torch.manual_seed(2)
    net = LSTMRegressor(input_length=40, hidden_size=6, num_layers=2, bidirectional=True,
                        dropout=0.1, values_per_step=5).eval()
    assert net.fc.in_features == 12
    x = torch.randn(2, 40)
    # reversing time changes the result (a real sequence model, not a bag of values)
    assert not torch.allclose(net(x), net(x.flip(-1)))


def test_recurrent_head_between_state_and_output():
    """head_sizes puts ReLU layers between the last hidden state and the output layer; without
    it the state dict is the paper's (rnn + fc), so older checkpoints still load."""
    torch.manual_seed(3)
    net = GRURegressor(input_length=20, in_channels=2, n_outputs=3, hidden_size=6,
                       values_per_step=5, head_sizes=[7, 5])
    assert [m.out_features for m in net.head if isinstance(m, nn.Linear)] == [7, 5]
    assert net.fc.in_features == 5 and net.fc.out_features == 3
    x = torch.randn(4, 2, 20)
    _, h = net.rnn((x * 20 ** 0.5).reshape(4, 2, 4, 5).permute(0, 2, 3, 1).reshape(4, 4, 10))
    assert torch.allclose(net(x), net.fc(net.head(h[-1])), atol=1e-6)
    assert sorted(GRURegressor(20, hidden_size=6).state_dict()) == [
        "fc.bias", "fc.weight", "rnn.bias_hh_l0", "rnn.bias_ih_l0", "rnn.weight_hh_l0",
        "rnn.weight_ih_l0"]
    with pytest.raises(ValueError, match="head_sizes"):
        GRURegressor(20, head_sizes=[4, 0])


def test_sizes_from_the_papers():
    assert GRURegressor(1750).hidden_size == 100 and GRURegressor(1750).rnn.hidden_size == 100
    ann = ANNRegressor(1750)
    assert [m.out_features for m in ann.net if isinstance(m, nn.Linear)] == [300, 300, 2]
    cnn = CNNRegressor(1750)
    assert [m.out_channels for m in cnn.features if isinstance(m, nn.Conv1d)] == [16, 32, 64, 128]


@pytest.mark.parametrize("kwargs", [
    {"input_length": 0}, {"input_length": 10, "values_per_step": 0},
    {"input_length": 10, "dropout": 1.5},
])
def test_bad_recurrent_arguments(kwargs):
    with pytest.raises(ValueError):
        GRURegressor(**kwargs)


def test_bad_cnn_and_ann_arguments():
    with pytest.raises(ValueError, match="kernel_size"):
        CNNRegressor(100, kernel_size=4)
    with pytest.raises(ValueError, match="hidden_sizes"):
        ANNRegressor(100, hidden_sizes=[])
    with pytest.raises(ValueError, match="_target_"):
        build_net({"hidden_size": 3})


@pytest.mark.parametrize("mode,channels", [("complex", 2), ("magnitude", 1)])
def test_subspace_basis_captures_fresh_fingerprints(mode, channels):
    """The fitted basis is orthonormal and holds the prior's fingerprints (other draws than
    those it was fitted to): the features are a near-sufficient statistic."""
    from mrflight.physics import oksuz2019, simulate
    from mrflight.transforms import preprocess

    seq = oksuz2019(n_pulses=200, lobe_length=40)
    net = SubspaceRegressor(200, channels, 3, rank=24, hidden_sizes=[16])
    with pytest.raises(RuntimeError, match="no basis yet"):
        net(torch.randn(2, channels, 200))
    net.fit_basis(seq, t1_range=(100.0, 3000.0), t2_range=(10.0, 300.0), b1_range=(0.8, 1.2))
    v = net.basis.double()
    assert torch.allclose(v.T @ v, torch.eye(24, dtype=torch.float64), atol=1e-5)
    g = torch.Generator().manual_seed(3)
    t1 = 100 + 2900 * torch.rand(300, generator=g, dtype=torch.float64)
    t2 = 10 + (t1.clamp(max=300) - 10) * torch.rand(300, generator=g, dtype=torch.float64)
    b1 = 0.8 + 0.4 * torch.rand(300, generator=g, dtype=torch.float64)
    z = preprocess(simulate(seq, t1, t2, b1, dtype=torch.float64), mode).double()
    z = z[:, 0] if z.ndim == 3 else z
    kept = ((z @ v) ** 2).sum(1)
    # (the magnitude's kinks at the zero crossings make it less compressible)
    assert kept.min() > 1 - (1e-3 if mode == "complex" else 5e-3), kept.min()
    # the energy outside the subspace grows with the noise level (the network's noise feature)
    x = preprocess(simulate(seq, t1[:50], t2[:50], b1[:50]), mode)
    x = x if x.ndim == 3 else x[:, None]
    noisy = x + 0.02 * torch.randn(x.shape, generator=g)
    noisy = noisy / torch.linalg.vector_norm(noisy.flatten(1), dim=1)[:, None, None]
    assert (net.features(noisy)[:, -1] > net.features(x)[:, -1] + 2).all()
    # with a training noise floor: cleaner inputs read as at that noise, noisier ones untouched
    free = net.features(x)[:, -1]
    net.set_basis(net.basis, noise_min=0.01,
                  fingerprints=simulate(seq, t1, t2, b1, dtype=torch.float64))
    floor = float(net.log_outside_floor)
    assert torch.allclose(net.features(x)[:, -1], torch.full_like(free, floor))
    assert (net.features(noisy)[:, -1] > floor).all()
    with pytest.raises(ValueError, match="orthonormal"):
        net.set_basis(2 * net.basis)
    with pytest.raises(ValueError, match="rank must be"):
        SubspaceRegressor(50, 2, 3, rank=60)


def _fitted_subspace_net(channels: int, noise_min: float, n: int, seed: int):
    """A rank-24 subspace net fitted to a 200-pulse train's prior (T1 100-3000 ms, T2 10-300 ms,
    B1 0.8-1.2) with the lowest training noise ``noise_min``, and ``n`` noise-free complex
    fingerprints of other draws from that prior."""
    from mrflight.physics import oksuz2019, simulate

    seq = oksuz2019(n_pulses=200, lobe_length=40)
    net = SubspaceRegressor(200, channels, 3, rank=24, hidden_sizes=[16])
    net.fit_basis(seq, noise_min=noise_min, t1_range=(100.0, 3000.0), t2_range=(10.0, 300.0),
                  b1_range=(0.8, 1.2))
    g = torch.Generator().manual_seed(seed)
    t1 = 100 + 2900 * torch.rand(n, generator=g, dtype=torch.float64)
    t2 = 10 + (t1.clamp(max=300) - 10) * torch.rand(n, generator=g, dtype=torch.float64)
    b1 = 0.8 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64)
    return net, simulate(seq, t1, t2, b1, dtype=torch.float64)


@pytest.mark.parametrize("mode,channels", [("complex", 2), ("magnitude", 1)])
@pytest.mark.parametrize("noise_min", [0.005, 0.02])
def test_noise_floor_reads_cleaner_inputs_as_at_the_lowest_training_noise(mode, channels,
                                                                          noise_min):
    """The floor lies just below the mean noise feature at the lowest training noise, for complex
    inputs (the formula) and magnitudes (measured: their rectified noise leaves far less outside
    the basis than the complex formula says, which once put the floor above every training
    input at a fixed noise of 0.01 and left the noise feature constant)."""
    from mrflight.efficiency import _measure
    from mrflight.transforms import preprocess

    net, clean = _fitted_subspace_net(channels, noise_min, 1000, seed=11)

    def at_floor(std):
        z = preprocess(_measure(clean, np.ones(1), std, 3), mode)
        _, log_out = net.project(z if z.ndim == 3 else z[:, None])
        return float((log_out <= net.log_outside_floor).double().mean())

    assert 0.05 < at_floor(noise_min) < 0.6  # some inputs at the lowest noise (37-49 %), not all
    assert at_floor(noise_min / 2) == 1.0  # every cleaner one
    assert at_floor(1.5 * noise_min) < 0.01
    if mode == "magnitude":
        with pytest.raises(ValueError, match="fingerprints"):
            net.set_basis(net.basis, noise_min=noise_min)


def test_a_full_rank_basis_has_no_noise_floor_or_ceiling():
    """With rank = T nothing lies outside the basis: no floor or ceiling, and no log(0)."""
    import math

    from mrflight.physics import oksuz2019

    net = SubspaceRegressor(30, 2, 3, rank=30, hidden_sizes=[8])
    net.fit_basis(oksuz2019(n_pulses=30, lobe_length=10), noise_min=0.01)
    net.set_noise_ceiling(0.03)
    assert float(net.log_outside_floor) == -math.inf
    assert float(net.log_outside_ceiling) == math.inf
    assert torch.isfinite(net(torch.randn(2, 2, 30))).all()


def test_noise_ceiling_reads_noisier_inputs_as_at_the_top_training_noise():
    """Complex inputs noisier than the training noise: the noise feature stops at what noise a
    quarter above the top leaves outside the basis (the formula checked against simulated
    noise), the coordinates are scaled to the energy a unit-norm input then keeps, their
    direction unchanged; inputs at the training noise are left exactly as they were."""
    import math

    from mrflight.efficiency import _measure
    from mrflight.transforms import preprocess

    net, clean = _fitted_subspace_net(2, 0.005, 400, seed=5)
    assert float(net.log_outside_ceiling) == math.inf  # no ceiling unless asked for

    def inputs(std):
        return preprocess(_measure(clean, np.ones(1), std, 7), "complex")

    at_top, beyond = inputs(0.03), inputs(0.08)
    free_top, free_beyond = net.project(at_top), net.project(beyond)
    o_sim = 1 - (net.project(inputs(1.25 * 0.03))[0] ** 2).sum((1, 2))
    net.set_noise_ceiling(0.03)
    ceiling = float(net.log_outside_ceiling)
    # the formula is the mean of what simulated noise leaves outside the basis
    assert math.exp(ceiling) == pytest.approx(float(o_sim.mean()), rel=0.01)
    # at the top training noise nothing is touched
    coef, log_out = net.project(at_top)
    assert torch.equal(coef, free_top[0]) and torch.equal(log_out, free_top[1])
    assert float(free_top[1].max()) < ceiling
    # beyond it: the ceiling, and coordinates of the energy 1 - o, in the same direction
    coef, log_out = net.project(beyond)
    assert (free_beyond[1] > ceiling).all()
    assert torch.allclose(log_out, torch.full_like(log_out, ceiling))
    energy = (coef.double() ** 2).sum((1, 2))
    assert torch.allclose(energy, torch.full_like(energy, 1 - math.exp(ceiling)), rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(coef.flatten(1), free_beyond[0].flatten(1))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    # magnitude inputs (rectified noise: the formula does not hold) get none
    mag = SubspaceRegressor(200, 1, 3, rank=24, hidden_sizes=[16])
    mag.set_noise_ceiling(0.03)
    assert float(mag.log_outside_ceiling) == math.inf


def test_a_checkpoint_without_the_noise_ceiling_gets_it_from_its_training_noise():
    """State dicts written before the ceiling existed load strictly; the module sets the
    ceiling from the run's recorded training noise (the same value a new run saves)."""
    from mrflight.regressor import MRFRegressor

    cfg = {"_target_": "mrflight.models.GRURegressor", "input_length": 60, "in_channels": 2,
           "n_outputs": 3, "hidden_size": 4, "values_per_step": 20, "rank": 5,
           "head_coordinates": True}
    kw = dict(net=cfg, input_mode="complex", noise_std=[0.005, 0.03],
              targets=["t1", "t2", "b1"], target_scale_ms=[2000.0, 500.0, 2.0])
    module = MRFRegressor(**kw)
    module.net.set_basis(torch.linalg.qr(torch.randn(60, 5, dtype=torch.float64))[0])
    expected = float(module.net.log_outside_ceiling)
    assert expected < 0
    old = {k: v for k, v in module.state_dict().items() if "ceiling" not in k}
    loaded = MRFRegressor(**kw)
    loaded.load_state_dict(old)  # strict
    assert float(loaded.net.log_outside_ceiling) == expected
    assert loaded.net.has_basis and torch.equal(loaded.net.basis, module.net.basis)
    # a run without a recorded noise level has no ceiling
    assert float(MRFRegressor(**{**kw, "noise_std": None}).net.log_outside_ceiling) > 1e30


@pytest.mark.parametrize("cls", [GRURegressor, LSTMRegressor])
def test_recurrent_reads_the_projected_fingerprint(cls):
    """rank=R: the recurrence reads the fingerprint projected on the basis (the noise outside it
    removed) and the read-out also gets the log energy outside; it needs a basis first."""
    torch.manual_seed(4)
    t, r = 40, 6
    net = cls(input_length=t, in_channels=2, n_outputs=3, hidden_size=5, values_per_step=8,
              head_sizes=[4], rank=r)
    assert net.head[0].in_features == 5 + 1
    with pytest.raises(RuntimeError, match="no basis yet"):
        net(torch.randn(2, 2, t))
    basis, _ = torch.linalg.qr(torch.randn(t, r, dtype=torch.float64))
    net.set_basis(basis.float(), noise_min=0.01)
    x = torch.randn(3, 2, t)
    x = x / torch.linalg.vector_norm(x.flatten(1), dim=1)[:, None, None]
    v = net.basis
    inside = (x @ v) @ v.T
    outside = torch.log((x - inside).square().sum((1, 2))).clamp_min(net.log_outside_floor)
    steps = (inside * t ** 0.5).reshape(3, 2, 5, 8).permute(0, 2, 3, 1).reshape(3, 5, 16)
    _, h = net.rnn(steps)
    h = h[0] if isinstance(h, tuple) else h
    expected = net.fc(net.head(torch.cat([h[-1], outside[:, None]], dim=1)))
    assert torch.allclose(net(x), expected, atol=1e-5)
    # what lies outside the basis no longer reaches the recurrence: only the noise feature moves
    ortho = torch.randn(3, 2, t)
    ortho = ortho - (ortho @ v) @ v.T
    moved = x + 0.05 * ortho
    assert torch.allclose(net.rnn(steps)[0], net.rnn(
        (((moved @ v) @ v.T) * t ** 0.5).reshape(3, 2, 5, 8).permute(0, 2, 3, 1)
        .reshape(3, 5, 16))[0], atol=1e-5)
    twin = build_net(net_config(net))
    twin.load_state_dict(net.state_dict())
    assert twin.has_basis and torch.equal(twin(x), net(x))
    assert GRURegressor(t).has_basis and "basis" not in GRURegressor(t).state_dict()
    with pytest.raises(ValueError, match="rank must be"):
        GRURegressor(t, rank=-1)
    with pytest.raises(ValueError, match="without a subspace basis"):
        GRURegressor(t).set_basis(basis)


@pytest.mark.parametrize("cls", [GRURegressor, LSTMRegressor])
def test_recurrent_head_reads_the_coordinates(cls):
    """head_coordinates: the read-out gets the unit-norm fingerprint's coordinates in the basis
    (the subspace model's features) beside the last state and the noise feature."""
    torch.manual_seed(6)
    t, r = 40, 6
    net = cls(input_length=t, in_channels=2, n_outputs=3, hidden_size=5, values_per_step=8,
              head_sizes=[4], rank=r, head_coordinates=True)
    assert net.head[0].in_features == 5 + 1 + 2 * r
    net.set_basis(torch.linalg.qr(torch.randn(t, r, dtype=torch.float64))[0].float())
    x = torch.randn(3, 2, t)
    x = x / torch.linalg.vector_norm(x.flatten(1), dim=1)[:, None, None]
    v = net.basis
    coef = x @ v
    outside = torch.log((x - coef @ v.T).square().sum((1, 2)))
    steps = ((coef @ v.T) * t ** 0.5).reshape(3, 2, 5, 8).permute(0, 2, 3, 1).reshape(3, 5, 16)
    h = net.rnn(steps)[1]
    h = h[0] if isinstance(h, tuple) else h
    features = torch.cat([h[-1], outside[:, None], coef.flatten(1)], dim=1)
    assert torch.allclose(net(x), net.fc(net.head(features)), atol=1e-5)
    twin = build_net(net_config(net))
    twin.load_state_dict(net.state_dict())
    assert twin.head_coordinates and torch.equal(twin(x), net(x))
    # the paper's unprojected net (rank 0) has no coordinates: the option does nothing there
    plain = cls(input_length=t, hidden_size=5, head_coordinates=True)
    assert not plain.head_coordinates and plain.fc.in_features == 5


# --------------------------------------------------------------------------------------------
# the fused inference GRU (mrflight.models.fused_gru), with the pure-torch gates on the CPU; the
# Triton gate kernel is checked through the interpreter in tests/test_triton.py
# --------------------------------------------------------------------------------------------

#: |h| < 1: absolute bounds on the final states. float64: rounding only (measured 3e-16);
#: float32 against the float64 nn.GRU: a few float32 ulps per step, not growing over the steps
#: (measured 2e-7, as nn.GRU's own float32 error)
FUSED_F64_TOL = 1e-13
FUSED_F32_TOL = 2e-6


@pytest.mark.parametrize("inp,hid,layers,bidir,batch,steps", [
    (7, 13, 1, False, 5, 6), (50, 100, 1, False, 1, 35), (4, 10, 2, True, 3, 5),
    (3, 17, 3, False, 4, 4), (6, 9, 1, True, 2, 1),
])
def test_fused_gru_matches_nn_gru(inp, hid, layers, bidir, batch, steps):
    from mrflight.models.fused_gru import fused_gru

    torch.manual_seed(3)
    rnn = nn.GRU(inp, hid, layers, batch_first=True, bidirectional=bidir).double().eval()
    x = 3 * torch.randn(batch, steps, inp, dtype=torch.float64)
    with torch.no_grad():
        _, ref = rnn(x)
        got = fused_gru(rnn, x)
        assert got.shape == ref.shape and got.dtype == torch.float64
        assert (got - ref).abs().max() < FUSED_F64_TOL
        got32 = fused_gru(rnn.float(), x.float())
    assert got32.dtype == torch.float32
    assert (got32.double() - ref).abs().max() < FUSED_F32_TOL


def test_fused_gru_under_bf16_autocast_keeps_float32_gates():
    """Autocast turns the GEMMs' operands (and outputs) into bfloat16; the gate function still
    gets a float32 state to write, and the result stays within bfloat16 rounding of float32."""
    from mrflight.models.fused_gru import fused_gru, gru_gates_torch

    torch.manual_seed(4)
    rnn = nn.GRU(50, 100, batch_first=True).eval()
    x = torch.randn(64, 35, 50)
    seen = set()

    def spy(gi, gh, h, bias, out):
        seen.add((gi.dtype, None if gh is None else gh.dtype, out.dtype, bias.dtype))
        gru_gates_torch(gi, gh, h, bias, out)

    with torch.no_grad():
        _, ref = rnn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused_gru(rnn, x, spy)
    bf, f32 = torch.bfloat16, torch.float32
    assert seen == {(bf, None, f32, f32), (bf, bf, f32, f32)}
    assert got.dtype == f32
    err = (got - ref).abs().max()
    assert 1e-4 < err < 5e-2  # bfloat16 operands did change the result, by their rounding only


def _use_fused(monkeypatch, gates=None):
    """Make RecurrentRegressor take the GPU's fused per-step path on the CPU (with ``gates`` as
    the kernel; the one-launch scan off)."""
    from mrflight.models import fused_gru, recurrent

    monkeypatch.setattr(fused_gru._KERNEL, "value", gates or fused_gru.gru_gates_torch)
    monkeypatch.setattr(fused_gru._SCAN, "value", None)
    monkeypatch.setattr(fused_gru, "_triton_device", lambda x: True)
    monkeypatch.setattr(recurrent, "fused_gru_available",
                        lambda rnn, x, folded=False: type(rnn) is nn.GRU)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=2, values_per_step=7, hidden_size=12),
    dict(in_channels=1, values_per_step=4, hidden_size=9, num_layers=2, bidirectional=True),
    # a subspace basis: the first layer's projections folded from the coordinates
    dict(in_channels=2, values_per_step=7, hidden_size=12, rank=5),
    dict(in_channels=2, values_per_step=7, hidden_size=12, rank=5, head_coordinates=True),
    dict(in_channels=1, values_per_step=4, hidden_size=9, num_layers=2, bidirectional=True,
         rank=6),
])
def test_regressor_runs_the_fused_gru_as_nn_gru(monkeypatch, kwargs):
    """The regressor's fused path (padded steps, channels, stacked and reversed layers, the
    folded projection of a basis) gives the outputs of its nn.GRU path."""
    from mrflight.models.fused_gru import gru_gates_torch

    torch.manual_seed(5)
    net = GRURegressor(input_length=30, **kwargs).double().eval()
    if net.rank:
        net.set_basis(torch.linalg.qr(torch.randn(30, net.rank, dtype=torch.float64))[0])
    x = torch.randn(3, kwargs["in_channels"], 30, dtype=torch.float64)
    calls = []

    def counted(*args):
        calls.append(1)
        gru_gates_torch(*args)

    with torch.no_grad():
        ref = net(x)
        _use_fused(monkeypatch, counted)
        got = net(x)
    # one gate step per step, direction and layer
    n = net.n_steps * net.num_layers * (2 if net.bidirectional else 1)
    assert len(calls) == n and net.pad > 0
    assert (got - ref).abs().max() < FUSED_F64_TOL


@pytest.mark.parametrize("rank", [0, 6])
def test_a_subspace_gru_runs_the_folded_projections_on_the_cpu_in_inference(monkeypatch, rank):
    """On the CPU, in eval mode without autograd, a GRU with a subspace basis runs the torch
    gates on the projections folded from its coordinates (the outputs of nn.GRU on the rebuilt
    fingerprint to float32 rounding) for batches of CPU_MIN_BATCH and more; with autograd,
    below that batch, or without a basis, nn.GRU runs."""
    from mrflight.models import fused_gru

    calls = []
    gates = fused_gru.gru_gates_torch
    monkeypatch.setattr(fused_gru, "gru_gates_torch",
                        lambda *a: (calls.append(1), gates(*a)))
    torch.manual_seed(7)
    net = GRURegressor(input_length=30, in_channels=2, hidden_size=12, values_per_step=7,
                       rank=rank, head_coordinates=True).eval()
    if rank:
        net.set_basis(torch.linalg.qr(torch.randn(30, rank, dtype=torch.float64))[0])
    x = torch.randn(fused_gru.CPU_MIN_BATCH, 2, 30)
    with torch.no_grad():
        got = net(x)
        assert len(calls) == (net.n_steps if rank else 0)
        calls.clear()
        small = net(x[:33])  # a small batch: nn.GRU
        assert not calls
    ref = net(x)  # autograd on: nn.GRU
    assert not calls
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small, ref[:33].detach(), rtol=1e-5, atol=1e-6)


def test_predict_parameters_gives_a_subspace_gru_chunks_of_1024_on_the_cpu():
    """The folded projections run from CPU_MIN_BATCH signals on: predict_parameters' CPU chunk
    is 1024 for a GRU with a basis, 256 for the others (a GRU without one, the LSTM)."""
    from mrflight.models import LSTMRegressor
    from mrflight.models.fused_gru import CPU_MIN_BATCH
    from mrflight.regressor import MRFRegressor

    def net(cls, rank):
        n = cls(input_length=30, hidden_size=4, values_per_step=10, rank=rank)
        if rank:
            n.set_basis(torch.linalg.qr(torch.randn(30, rank, dtype=torch.float64))[0])
        return n

    gru = net(GRURegressor, 3)
    assert gru.cpu_batch_size == 2 * CPU_MIN_BATCH == 1024
    assert net(GRURegressor, 0).cpu_batch_size == net(LSTMRegressor, 3).cpu_batch_size == 256
    module = MRFRegressor(gru, input_mode="magnitude")
    seen = []
    gru.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    module.predict_parameters(torch.rand(2500, 30))
    assert seen == [1024, 1024, 452]


def test_fused_gru_failure_warns_and_falls_back(monkeypatch):
    from mrflight.models import fused_gru

    def broken(*args):
        raise RuntimeError("no kernel for this GPU")

    torch.manual_seed(6)
    net = GRURegressor(input_length=20, hidden_size=8, values_per_step=5).eval()
    x = torch.randn(2, 20)
    with torch.no_grad():
        ref = net(x)
        _use_fused(monkeypatch, broken)
        with pytest.warns(RuntimeWarning, match="fused GRU kernel failed"):
            got = net(x)
        assert fused_gru._KERNEL.value is None  # disabled for the rest of the process
    assert torch.equal(got, ref)


def test_scan_failure_warns_and_falls_back_to_the_per_step_path(monkeypatch):
    """A scan kernel that fails (a GPU Triton cannot compile it for) warns once, is disabled for
    the rest of the process, and the per-step kernels give the estimates."""
    import types

    from mrflight.models import fused_gru

    def broken(*args):
        raise RuntimeError("out of resources: shared memory")

    torch.manual_seed(6)
    net = GRURegressor(input_length=20, hidden_size=8, values_per_step=5).eval()
    x = torch.randn(2, 20)
    calls = []
    with torch.no_grad():
        ref = net(x)
        _use_fused(monkeypatch, lambda *a: (calls.append(1), fused_gru.gru_gates_torch(*a)))
        monkeypatch.setattr(fused_gru._SCAN, "value", types.SimpleNamespace(scan=broken))
        # TF32 products (IEEE float32 ones skip the scan)
        monkeypatch.setattr(fused_gru, "_operands", lambda device: (torch.float32, "tf32"))
        with pytest.warns(RuntimeWarning, match="GRU scan kernel failed.*per-step"):
            got = net(x)
        assert fused_gru._SCAN.value is None
    assert len(calls) == net.n_steps
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_ieee_float32_products_take_the_per_step_path_not_the_scan(monkeypatch):
    """The scan spills on an H100 with IEEE float32 products (on the FMA units): with those the
    per-step kernels run; with TF32 or half-precision products the scan does."""
    import types

    from mrflight.models import fused_gru

    torch.manual_seed(6)
    net = GRURegressor(input_length=20, hidden_size=8, values_per_step=5).eval()
    x = torch.randn(2, 20)
    calls = []
    _use_fused(monkeypatch, lambda *a: (calls.append("step"), fused_gru.gru_gates_torch(*a)))
    monkeypatch.setattr(fused_gru._SCAN, "value", types.SimpleNamespace(
        scan=lambda *a: calls.append("scan")))
    for operands, path in (((torch.float32, "ieee"), "step"), ((torch.float32, "tf32"), "scan"),
                           ((torch.bfloat16, "ieee"), "scan")):
        calls.clear()
        monkeypatch.setattr(fused_gru, "_operands", lambda device, o=operands: o)
        with torch.no_grad():
            net(x)
        assert set(calls) == {path}, operands


def test_scan_takes_only_one_layer_unidirectional_float32_grus_of_at_most_128_units(
        monkeypatch):
    import types

    from mrflight.models import fused_gru

    monkeypatch.setattr(fused_gru._SCAN, "value", types.SimpleNamespace(scan=None))
    x = torch.zeros(2, 3, 4)
    assert fused_gru.scan_eligible(nn.GRU(4, 128, batch_first=True), x)
    for rnn in (nn.GRU(4, 129, batch_first=True), nn.GRU(4, 8, 2, batch_first=True),
                nn.GRU(4, 8, batch_first=True, bidirectional=True), nn.LSTM(4, 8),
                nn.GRU(4, 8, batch_first=True).double()):
        assert not fused_gru.scan_eligible(rnn, x.to(next(rnn.parameters()).dtype)), rnn
    monkeypatch.setattr(fused_gru._SCAN, "value", None)  # no Triton, or disabled
    assert not fused_gru.scan_eligible(nn.GRU(4, 8, batch_first=True), x)


def test_fused_gru_is_off_where_it_does_not_apply(monkeypatch):
    from mrflight.models import fused_gru

    monkeypatch.setattr(fused_gru._KERNEL, "value", fused_gru.gru_gates_torch)
    gru, x = nn.GRU(4, 3, batch_first=True).eval(), torch.randn(2, 3, 4)
    with torch.no_grad():
        assert not fused_gru.fused_gru_available(gru, x)  # CPU input
    monkeypatch.setenv("MRFLIGHT_NO_TRITON", "1")
    assert fused_gru.triton_gates() is None
    with pytest.raises(ValueError, match="batch_first"):
        fused_gru.fused_gru(nn.GRU(4, 3), x)
