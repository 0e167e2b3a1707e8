"""1D convolutional regressor after Hoppe et al. 2017."""

from __future__ import annotations

import torch
from torch import nn

from .base import Regressor

__all__ = ["CNNRegressor"]


class CNNRegressor(Regressor):
    """1D CNN: convolution blocks (conv, ReLU, max-pool 2) then two fully connected layers.

    Hoppe et al. use a stack of 1D convolutions with pooling along the time axis followed by
    fully connected layers; their exact sizes are tied to their 1000-point FISP train, so the
    sizes here are our choice, kept small for CPU training: four blocks of ``channels`` =
    (16, 32, 64, 128) filters of width ``kernel_size`` = 7 ("same" padding), each followed by
    max-pooling by 2; an adaptive average pool to ``pooled_length`` = 8 positions makes the head
    independent of ``T``; then FC ``128*8 -> fc_size`` (256, ReLU) and ``fc_size -> 2``.

    Args:
        input_length: ``T``.
        in_channels: 1 (magnitude) or 2 (real, imaginary).
        channels: filters of each convolution block.
        kernel_size: odd width of every convolution.
        pooled_length: positions kept by the final adaptive pooling.
        fc_size: width of the hidden fully connected layer.
        dropout: dropout before the last layer.

    References:
        Hoppe et al., Deep learning for magnetic resonance fingerprinting: a new approach for
        predicting quantitative parameter values from time series, Stud Health Technol Inform
        2017;243:202.
    """

    def __init__(self, input_length: int, in_channels: int = 1,
                 channels: tuple[int, ...] | list[int] = (16, 32, 64, 128),
                 kernel_size: int = 7, pooled_length: int = 8, fc_size: int = 256,
                 dropout: float = 0.0) -> None:
        super().__init__(input_length, in_channels)
        self.channels = tuple(int(c) for c in channels)
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive counts, got "
                             f"{channels}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.pooled_length = int(pooled_length)
        self.fc_size = int(fc_size)
        self.dropout = float(dropout)
        blocks: list[nn.Module] = []
        c_in = self.in_channels
        for c in self.channels:
            blocks += [nn.Conv1d(c_in, c, self.kernel_size, padding=self.kernel_size // 2),
                       nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)]
            c_in = c
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool1d(self.pooled_length))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * self.pooled_length, self.fc_size), nn.ReLU(),
            nn.Dropout(self.dropout), nn.Linear(self.fc_size, 2),
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
