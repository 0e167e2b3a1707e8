"""The regressors: one contract, correct step reshaping, config round trips."""

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
    build_net,
    net_config,
)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("channels", [1, 2])
def test_contract_and_rebuild(name, channels):
    torch.manual_seed(0)
    net = REGISTRY[name](input_length=101, in_channels=channels)
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
