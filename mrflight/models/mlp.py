"""Fully connected regressor as in DRONE (Cohen et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Regressor, hidden_layers

__all__ = ["ANNRegressor"]


class ANNRegressor(Regressor):
    """Multilayer perceptron: flattened fingerprint -> hidden layers (ReLU) -> (T1, T2).

    Args:
        input_length: ``T``.
        in_channels: 1 (magnitude) or 2 (real, imaginary); the input is flattened to ``C*T``.
        n_outputs: estimated parameters (2: T1, T2; 3: T1, T2, B1).
        hidden_sizes: widths of the hidden layers (DRONE: two layers of 300).
        dropout: dropout after every hidden layer.

    References:
        Cohen, Zhu, Rosen, MR fingerprinting deep reconstruction network (DRONE), MRM 2018;
        80:885 (doi:10.1002/mrm.27198).
    """

    def __init__(self, input_length: int, in_channels: int = 1, n_outputs: int = 2,
                 hidden_sizes: tuple[int, ...] | list[int] = (300, 300),
                 dropout: float = 0.0) -> None:
        super().__init__(input_length, in_channels, n_outputs)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be a non-empty list of positive widths, got "
                             f"{hidden_sizes}")
        self.dropout = float(dropout)
        layers, width = hidden_layers(self.input_length * self.in_channels, self.hidden_sizes,
                                      self.dropout)
        self.net = nn.Sequential(nn.Flatten(), *layers, nn.Linear(width, self.n_outputs))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
