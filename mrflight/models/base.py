"""The shared base class of the regressors and helpers to rebuild a net from its config."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from mrflight.physics.checks import count

__all__ = ["Regressor", "hidden_layers", "build_net", "net_config", "allowed_targets"]


class Regressor(nn.Module):
    """Base class: validates and reshapes the input, and records the constructor arguments.

    Args:
        input_length: number of time points ``T`` of the fingerprints (``len(sequence)``).
        in_channels: 1 for magnitude input ``(B, T)``, 2 for real/imaginary input ``(B, 2, T)``.
        n_outputs: number of estimated parameters ``P`` (2: T1, T2; 3: T1, T2, B1).

    Subclasses call ``super().__init__(input_length, in_channels, n_outputs)`` and implement
    :meth:`_forward` on ``(B, C, T)`` inputs already scaled by ``sqrt(T)``.
    """

    #: inference chunk of ``predict_parameters`` on a CPU: 256 is the fastest or close to it for
    #: every default model (larger chunks fall out of cache; ``benchmarks/inference_speed.py``)
    cpu_batch_size = 256

    def __init__(self, input_length: int, in_channels: int = 1, n_outputs: int = 2) -> None:
        super().__init__()
        if int(input_length) < 1:
            raise ValueError(f"input_length must be a positive number of time points, got "
                             f"{input_length}")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1 (1 magnitude, 2 real/imag), got "
                             f"{in_channels}")
        self.n_outputs = count(n_outputs, "n_outputs", hint=" (2: T1, T2; 3: with B1)")
        self.input_length = int(input_length)
        self.in_channels = int(in_channels)
        self.input_scale = math.sqrt(self.input_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised fingerprints ``(B, T)`` or ``(B, C, T)`` to scaled ``(B, P)``."""
        if x.ndim == 2:
            if self.in_channels == 1:
                x = x.unsqueeze(1)
            elif x.shape[1] == self.in_channels * self.input_length:
                x = x.reshape(x.shape[0], self.in_channels, self.input_length)
        if x.ndim != 3 or x.shape[1:] != (self.in_channels, self.input_length):
            raise ValueError(
                f"{type(self).__name__} expects input (B, {self.input_length}) or "
                f"(B, {self.in_channels}, {self.input_length}), got {tuple(x.shape)}"
            )
        return self._forward(x * self.input_scale)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def hidden_layers(width: int, sizes, dropout: float = 0.0) -> tuple[list[nn.Module], int]:
    """``Linear -> ReLU (-> Dropout)`` for every width in ``sizes``, from ``width`` inputs: the
    layers and the width they end with (the caller adds its output layer)."""
    layers: list[nn.Module] = []
    for h in sizes:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return layers, width


def net_config(net: nn.Module) -> dict:
    """The config ``{"_target_": class path, **init kwargs}`` that rebuilds ``net``.

    Reads the constructor arguments back from the attributes of the same names, so every
    regressor stores each ``__init__`` argument as an attribute.
    """
    cls = type(net)
    cfg = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = getattr(net, name)
        cfg[name] = list(value) if isinstance(value, tuple) else value
    return cfg


#: class paths of the user's own networks that :func:`trust` allows :func:`build_net` to build
_TRUSTED: dict[str, type] = {}
#: how a user allows a network of their own (the end of the error that refuses one)
TRUST_HINT = ("if you trust it, allow it: eval.py trust=[{t}], in Python "
              "mrflight.models.trust('{t}') before loading (train.py trusts the model its own "
              "command names)")


def trust(*targets: str) -> None:
    """Allow :func:`build_net` (so :func:`mrflight.load_checkpoint`, ``eval.py`` and a resume)
    to build the user's own networks, named by class path (``mymodels.MyNet``): a checkpoint
    names its network as text, so only registered and trusted classes are ever imported.

    A network takes ``input_length``, ``in_channels`` and ``n_outputs`` (the pipeline passes
    them), keeps every constructor argument as an attribute of the same name and maps
    ``(B, T)`` or ``(B, C, T)`` fingerprints to ``(B, n_outputs)`` scaled targets.

    Raises:
        ValueError: a path that does not name an ``nn.Module`` class.
    """
    import importlib

    for target in targets:
        module, _, name = str(target).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name) if module else None
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot trust network {target!r}: {e} (is its module on "
                             "PYTHONPATH?)") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"cannot trust network {target!r}: it is not an nn.Module class "
                             "(give its class path, module.Class)")
        _TRUSTED[str(target)] = cls


def allowed_targets() -> dict[str, type]:
    """``{class path: class}`` of the networks :func:`build_net` may build.

    The regressors registered in :data:`mrflight.models.REGISTRY`, under their module path
    (``mrflight.models.recurrent.GRURegressor``) and their package path
    (``mrflight.models.GRURegressor``), and the user's networks given to :func:`trust`.
    """
    from mrflight.models import REGISTRY

    out = {}
    for cls in REGISTRY.values():
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
        out[f"mrflight.models.{cls.__name__}"] = cls
    return {**out, **_TRUSTED}


def build_net(cfg: dict) -> nn.Module:
    """Instantiate a regressor from ``{"_target_": "mrflight.models.Class", **kwargs}``.

    The target must be one of :func:`allowed_targets` (a checkpoint names its network as text:
    importing and calling any other name could run arbitrary code).

    Raises:
        ValueError: the target is not a registered mrflight regressor, or a bad argument.
    """
    cfg = dict(cfg)
    target = cfg.pop("_target_", None)
    allowed = allowed_targets()
    cls = allowed.get(target) if isinstance(target, str) else None
    if cls is None:
        names = sorted(t for t in allowed if t.count(".") == 2)
        if not target:
            raise ValueError(f"net config needs a '_target_' class path, one of "
                             f"{', '.join(names)}")
        raise ValueError(f"network {target!r} is not an mrflight regressor: allowed are "
                         f"{', '.join(names)}; {TRUST_HINT.format(t=target)}")
    if not all(isinstance(k, str) and k.isidentifier() for k in cfg):
        raise ValueError(f"network config of {target} has invalid argument names: {list(cfg)}")
    try:
        return cls(**cfg)
    except TypeError as e:
        raise ValueError(f"network {target}: {e}") from None
