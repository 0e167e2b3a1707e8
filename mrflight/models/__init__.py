"""Trainable regressors: plain ``nn.Module``s sharing one contract.

Contract (every model): ``forward(x)`` takes L2-normalised fingerprints ``(B, T)`` (one channel,
the magnitude) or ``(B, C, T)`` (``C = in_channels``, e.g. 2 for real and imaginary parts) and
returns ``(B, P)``: the *scaled* targets (T1 / scale_T1, T2 / scale_T2[, B1 / scale_B1], see
:class:`mrflight.regressor.MRFRegressor`). Every model multiplies its input by ``sqrt(T)``
first so that
the unit-norm fingerprint has values of order one.

Adding a model is one class here (a subclass of :class:`Regressor`), one YAML file in
``mrflight/configs/model/`` and one entry in the test parametrisation. A user's own network
outside the package is built once trusted (:func:`trust`; see the README, "Your own model").
"""

from .base import Regressor, build_net, net_config, trust
from .cnn import CNNRegressor
from .mlp import ANNRegressor
from .recurrent import GRURegressor, LSTMRegressor, RecurrentRegressor
from .subspace import SubspaceRegressor

REGISTRY = {
    "lstm": LSTMRegressor,
    "gru": GRURegressor,
    "ann": ANNRegressor,
    "cnn": CNNRegressor,
    "subspace": SubspaceRegressor,
}

__all__ = [
    "Regressor", "RecurrentRegressor", "LSTMRegressor", "GRURegressor", "ANNRegressor",
    "CNNRegressor", "SubspaceRegressor", "REGISTRY", "build_net", "net_config",
    "trust",
]
