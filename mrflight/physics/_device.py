"""Check a requested torch device before any work is done on it."""

from __future__ import annotations

import torch

__all__ = ["check_device"]


def check_device(device) -> torch.device:
    """``torch.device(device)``, or a ValueError naming the fix when it cannot be used here.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``...

    Raises:
        ValueError: an unknown device string, CUDA asked of a torch built without CUDA or of a
            machine without a usable GPU, or a GPU index that does not exist.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e}): use device=cpu or "
                         "device=cuda") from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError("CUDA is not available in this torch build: use device=cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA GPU is usable on this machine "
                             "(torch.cuda.is_available() is False): use device=cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device={device!r} does not exist: this machine has {n} GPU(s) "
                             f"(cuda:0 to cuda:{n - 1})")
    return dev
