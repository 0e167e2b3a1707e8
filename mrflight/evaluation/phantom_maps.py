"""Phantom maps: the brain and NIST phantoms simulated, noised and estimated by every method in
blocks of bounded memory; their maps (``phantoms/<name>.npz``) and figures."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

__all__ = ["phantom_maps"]

log = logging.getLogger("mrflight")

#: bound on the phantom signals held at once (clean, noise and noisy blocks), bytes
_PHANTOM_BLOCK_BYTES = 64 * 2**20
#: bytes per (voxel, time point) of one phantom block: complex64 clean, noise (two float32
#: draws and their complex), noisy, plus a method's working copy
_BYTES_PER_SAMPLE = 40


#: display ranges of the phantom figures, ms: (T1, T2)
_RANGES = {"brain": ((0.0, 3500.0), (0.0, 300.0)), "nist": ((0.0, 2500.0), (0.0, 600.0))}
#: the units of a phantom's ``.npz``
_UNITS = {"*_t1_ms": "ms", "*_t2_ms": "ms", "truth_m0": "a.u.", "mask": "bool",
          "labels": "index into regions", "noise_std": "relative to unit-norm fingerprint"}


def phantom_maps(group, predictors, settings, figures: dict, arrays: dict, tag: str) -> None:
    """Maps of every phantom of ``settings.phantoms`` by every predictor: the arrays go to
    ``arrays["phantoms/<name><tag>.npz"]``, the figures to ``figures["phantom_<name><tag>"]``."""
    from mrflight import phantoms as ph
    from mrflight import plots

    std = settings.phantom_noise_std
    std = settings.plot_noise_std if std is None else float(std)
    for k, name in enumerate(settings.phantoms):
        log.info("%s phantom: reconstructing with %d methods", name, len(predictors))
        phantom = (ph.brain_phantom if name == "brain" else ph.nist_phantom)(
            settings.phantom_size)
        gen = torch.Generator().manual_seed(settings.noise_seed * 7919 + k)
        estimates = _estimates(group.seq, phantom, predictors, std, gen)
        maps, payload = _payload(phantom, predictors, estimates, std)
        arrays[f"phantoms/{name}{tag}.npz"] = payload
        if settings.plots:
            t1r, t2r = _RANGES[name]
            figures[f"phantom_{name}{tag}"] = plots.parameter_maps(
                {"t1_ms": phantom.t1_ms, "t2_ms": phantom.t2_ms}, maps, mask=phantom.mask,
                t1_range=t1r, t2_range=t2r, outside=phantom.outside_range,
                title=f"{'NIST' if name == 'nist' else name} phantom, noise std {std:g}")


def _estimates(seq, phantom, predictors, std: float, gen: torch.Generator) -> dict:
    """``{id(predictor): (voxels, 2) estimates}`` of the phantom's noisy signals.

    The signals are simulated, noised and estimated block by block: memory is bounded by
    :data:`_PHANTOM_BLOCK_BYTES` whatever the phantom size, not 8 bytes x voxels x time points.
    """
    from mrflight.physics import normalize, simulate

    uniq, inv = np.unique(phantom.params, axis=0, return_inverse=True)  # a few tissues
    inv = torch.from_numpy(inv.ravel())
    atoms = normalize(simulate(seq, torch.from_numpy(uniq[:, 0]), torch.from_numpy(uniq[:, 1])))
    m0 = torch.from_numpy(phantom.m0[phantom.mask]).to(torch.float32)
    rows = max(1, _PHANTOM_BLOCK_BYTES // (_BYTES_PER_SAMPLE * len(seq)))
    estimates = {id(p): np.empty((len(inv), 2)) for p in predictors}
    for start in range(0, len(inv), rows):
        blk = slice(start, start + rows)
        clean = atoms[inv[blk]] * m0[blk, None]
        noise = torch.complex(torch.randn(clean.shape, generator=gen),
                              torch.randn(clean.shape, generator=gen))
        signals = clean + std * noise
        del clean, noise
        for p in predictors:
            estimates[id(p)][blk] = p(signals)[0]
        del signals
    return estimates


def _payload(phantom, predictors, estimates: dict, std: float) -> tuple[dict, dict]:
    """The maps of every method (``{key: {"t1_ms", "t2_ms"}}``) and the ``.npz`` payload."""
    maps = {}
    payload = {"truth_t1_ms": phantom.t1_ms, "truth_t2_ms": phantom.t2_ms,
               "truth_m0": phantom.m0, "mask": phantom.mask, "labels": phantom.labels,
               "outside_training_range": phantom.outside_range}
    for p in predictors:
        pred = estimates.pop(id(p))
        mp = {"t1_ms": phantom.to_image(pred[:, 0]), "t2_ms": phantom.to_image(pred[:, 1])}
        maps[p.key] = mp
        safe = p.key.replace(" ", "_").replace("[", "").replace("]", "").replace("/", "_")
        payload[f"{safe}_t1_ms"] = mp["t1_ms"]
        payload[f"{safe}_t2_ms"] = mp["t2_ms"]
    payload["units"] = np.array(json.dumps(_UNITS))
    payload["regions"] = np.array(phantom.regions)
    payload["noise_std"] = np.array(std)
    return maps, payload
