"""1D convolutional regressor after Hoppe et al. 2017."""

from __future__ import annotations

import torch
from torch import nn

from mrflight.physics.checks import count

from .base import Regressor

__all__ = ["CNNRegressor"]


class CNNRegressor(Regressor):
    """1D CNN: convolution blocks (conv, ReLU, max-pool 2) then two fully connected layers.

    Hoppe et al. use a stack of 1D convolutions with pooling along the time axis followed by
    fully connected layers; their exact sizes are tied to their 1000-point FISP train, so the
    sizes here are our choice. Blocks of ``channels`` filters of width ``kernel_size`` ("same"
    padding), each followed by max-pooling by 2; the first convolution has stride
    ``stem_stride``; an adaptive average pool to ``pooled_length`` positions makes the head
    independent of ``T``; then FC ``channels[-1]*pooled_length -> fc_size`` (ReLU) and
    ``fc_size -> 2``. The default config (``mrflight/configs/model/cnn.yaml``: 16/32/32/32
    filters of
    width 5, stem stride 10, FC 128) costs 1.2 MFLOP per 1750-point signal; the unstrided
    16/32/64/128, width 7, FC 256 variant (the Python defaults) costs 45 MFLOP.

    Args:
        input_length: ``T``.
        in_channels: 1 (magnitude) or 2 (real, imaginary).
        n_outputs: estimated parameters (2: T1, T2; 3: T1, T2, B1).
        channels: filters of each convolution block.
        kernel_size: odd width of every convolution.
        pooled_length: positions kept by the final adaptive pooling.
        fc_size: width of the hidden fully connected layer.
        dropout: dropout before the last layer.
        stem_stride: stride of the first convolution (1 = none).

    References:
        Hoppe et al., Deep learning for magnetic resonance fingerprinting: a new approach for
        predicting quantitative parameter values from time series, Stud Health Technol Inform
        2017;243:202.
    """

    def __init__(self, input_length: int, in_channels: int = 1, n_outputs: int = 2,
                 channels: tuple[int, ...] | list[int] = (16, 32, 64, 128),
                 kernel_size: int = 7, pooled_length: int = 8, fc_size: int = 256,
                 dropout: float = 0.0, stem_stride: int = 1) -> None:
        super().__init__(input_length, in_channels, n_outputs)
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
        self.stem_stride = count(stem_stride, "stem_stride")
        blocks: list[nn.Module] = []
        c_in = self.in_channels
        for i, c in enumerate(self.channels):
            stride = self.stem_stride if i == 0 else 1
            blocks += [nn.Conv1d(c_in, c, self.kernel_size, stride=stride,
                                 padding=self.kernel_size // 2),
                       nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True)]
            c_in = c
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool1d(self.pooled_length))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * self.pooled_length, self.fc_size), nn.ReLU(),
            nn.Dropout(self.dropout), nn.Linear(self.fc_size, self.n_outputs),
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
