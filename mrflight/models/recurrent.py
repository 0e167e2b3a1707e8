"""LSTM and GRU regressors (Oksuz et al. 2019) sharing one recurrent base class."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Regressor, hidden_layers
from .fused_gru import CPU_MIN_BATCH, folded_weights, fused_gru_available, run_fused_gru
from .subspace import SubspaceBasis

__all__ = ["RecurrentRegressor", "LSTMRegressor", "GRURegressor"]


class RecurrentRegressor(SubspaceBasis, Regressor):
    """A recurrent net over the fingerprint followed by a fully connected layer to (T1, T2).

    The fingerprint of ``T`` time points (and ``C`` channels) is cut into
    ``ceil(T / values_per_step)`` consecutive chunks; each chunk (``values_per_step * C`` values,
    zero-padded at the end of the last chunk) is one step of the recurrence. ``values_per_step=1``
    is the literal per-time-point model of the paper (1750 steps: very slow on a CPU); the default
    is chosen by measurement (see the README). The last hidden state of the top layer (both
    directions when bidirectional) feeds a linear layer to ``n_outputs`` outputs, through the
    hidden layers ``head_sizes`` when given.

    A GRU in eval mode without autograd (``torch.inference_mode()``, as ``predict_parameters``
    runs it) runs :func:`mrflight.models.fused_gru.run_fused_gru` instead of ``nn.GRU``: on CUDA
    the Triton kernels (the one-launch scan of a one-layer GRU, else the per-step gates; measured
    by ``benchmarks/gpu_check.py``), and with a subspace basis on the CPU the torch gates on the
    projections folded from the coordinates (the fingerprint is never rebuilt).
    ``MRFLIGHT_NO_TRITON=1`` or a missing Triton on CUDA, training, autograd, a GRU without a
    basis on the CPU and the LSTM run ``nn.GRU``/``nn.LSTM``.

    Args:
        input_length: ``T``.
        in_channels: 1 (magnitude) or 2 (real, imaginary).
        n_outputs: estimated parameters (2: T1, T2; 3: T1, T2, B1).
        hidden_size: recurrent units (100 in the paper).
        num_layers: stacked recurrent layers.
        bidirectional: run the recurrence both ways.
        dropout: dropout between stacked layers (only used when ``num_layers > 1``).
        values_per_step: time points fed per recurrent step.
        head_sizes: widths of hidden layers (ReLU) between the last hidden state and the output
            layer (empty: the paper's linear read-out).
        rank: 0 (the paper: the recurrence reads the fingerprint as it is) or ``R``: the
            fingerprint is first projected on a rank-``R`` SVD basis of the prior's
            fingerprints (fitted when training starts, as for
            :class:`~mrflight.models.SubspaceRegressor`), so the recurrence reads it without
            the noise outside that subspace, and the log energy left outside (the noise level)
            joins the last hidden state as one more input of the read-out.

    References:
        Oksuz et al., Magnetic resonance fingerprinting using recurrent neural networks,
        ISBI 2019.
    """

    rnn_class: type[nn.RNNBase] = nn.GRU

    def __init__(self, input_length: int, in_channels: int = 1, n_outputs: int = 2,
                 hidden_size: int = 100, num_layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, values_per_step: int = 50,
                 head_sizes: tuple[int, ...] | list[int] = (), rank: int = 0,
                 head_coordinates: bool = False) -> None:
        super().__init__(input_length, in_channels, n_outputs)
        if values_per_step < 1:
            raise ValueError(f"values_per_step must be >= 1, got {values_per_step}")
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(f"model.hidden_size and model.num_layers must be positive integers, "
                             f"got hidden_size={hidden_size}, num_layers={num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bidirectional = bool(bidirectional)
        self.dropout = float(dropout)
        self.values_per_step = int(values_per_step)
        self.head_sizes = tuple(int(h) for h in head_sizes)
        if self.head_sizes and min(self.head_sizes) < 1:
            raise ValueError(f"head_sizes must be positive widths (or empty), got {head_sizes}")
        if int(rank) < 0:
            raise ValueError(f"rank must be 0 (no projection) or in [1, {self.input_length}], "
                             f"got {rank}")
        self._init_basis(rank)
        self.head_coordinates = bool(head_coordinates) and self.rank > 0  # rank 0: none
        self.n_steps = math.ceil(self.input_length / self.values_per_step)
        self.pad = self.n_steps * self.values_per_step - self.input_length
        self.rnn = self.rnn_class(
            input_size=self.values_per_step * self.in_channels, hidden_size=self.hidden_size,
            num_layers=self.num_layers, batch_first=True, bidirectional=self.bidirectional,
            dropout=self.dropout if self.num_layers > 1 else 0.0,
        )
        layers, width = hidden_layers(
            self.hidden_size * (2 if self.bidirectional else 1) + (1 if self.rank else 0)
            + (self.in_channels * self.rank if self.head_coordinates else 0), self.head_sizes)
        self.head = nn.Sequential(*layers)  # empty: no parameters, the paper's read-out
        self.fc = nn.Linear(width, self.n_outputs)

    @property
    def cpu_batch_size(self) -> int:
        """``predict_parameters``' CPU chunk: 1024 for a GRU with a subspace basis, which runs
        the folded projections from :data:`~mrflight.models.fused_gru.CPU_MIN_BATCH` signals on
        (1.2-1.4x nn.GRU's best batch, 1.35-1.47x at 1024, in
        ``benchmarks/inference_speed.py``), else 256."""
        return 2 * CPU_MIN_BATCH if self.rank and self.rnn_class is nn.GRU else 256

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        noise = h = coef = None
        if self.rank:
            coef, noise = self.project(x, self.input_scale)
            if fused_gru_available(self.rnn, x, folded=True):  # projections from the coordinates
                h = run_fused_gru(self.rnn, coef, fold=folded_weights(
                    self.rnn, self.basis, self.values_per_step))
            if h is None:
                x = coef @ self.basis.T.to(x.dtype)
        if h is None:
            h = self._recurrence(x)
        if isinstance(h, tuple):  # LSTM: (h_n, c_n)
            h = h[0]
        h = h.view(self.num_layers, 2 if self.bidirectional else 1, b, self.hidden_size)[-1]
        h = h.permute(1, 0, 2).reshape(b, -1)
        if noise is not None:
            h = torch.cat([h, noise[:, None].to(h.dtype)], dim=1)
        if self.head_coordinates:
            h = torch.cat([h, (coef.flatten(1) / self.input_scale).to(h.dtype)], dim=1)
        return self.fc(self.head(h))

    def _recurrence(self, x: torch.Tensor):
        """The final states of the recurrence over ``x`` ``(B, C, T)`` (``nn.GRU``/``nn.LSTM``'s
        ``h_n``, or ``(h_n, c_n)``)."""
        b = x.shape[0]
        if self.pad:
            x = nn.functional.pad(x, (0, self.pad))
        # (B, C, S*V) -> (B, S, V*C): each step holds values_per_step consecutive time points
        x = x.reshape(b, self.in_channels, self.n_steps, self.values_per_step)
        x = x.permute(0, 2, 3, 1).reshape(b, self.n_steps, self.values_per_step * self.in_channels)
        h = run_fused_gru(self.rnn, x) if fused_gru_available(self.rnn, x) else None
        return self.rnn(x)[1] if h is None else h


class LSTMRegressor(RecurrentRegressor):
    """LSTM regressor; see :class:`RecurrentRegressor` for the arguments.

    References:
        Oksuz et al., ISBI 2019; Hochreiter & Schmidhuber, Neural Computation 1997.
    """

    rnn_class = nn.LSTM


class GRURegressor(RecurrentRegressor):
    """GRU regressor (the paper's best model); see :class:`RecurrentRegressor`.

    References:
        Oksuz et al., ISBI 2019; Cho et al., EMNLP 2014.
    """

    rnn_class = nn.GRU
