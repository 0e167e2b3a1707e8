"""Throughput of map reconstruction (voxels per second) on a 256 x 256 slice.

A 256 x 256 brain-phantom slice (mrflight.phantoms.brain_phantom) is simulated with the default
1750-pulse sequence (complex, M0-scaled, complex Gaussian noise of std 0.01 relative to the mean
fingerprint norm), saved as a complex64 ``.npy`` series (917 MB) and reconstructed from that file
with :func:`mrflight.maps.reconstruct_series` (reading, the automatic mask, reconstruction and M0 --
everything but writing the output files), by:

* exhaustive complex dictionary matching against the paper's grid (about 115 000 atoms) -- on a
  band of rows of the slice (``--exhaustive-rows``), its rate is extrapolated to the slice;
* SVD rank-25 complex matching against the same grid, whole slice;
* a GRU (hidden size 100, the paper's) -- the checkpoint given by ``--ckpt``, else a freshly
  initialised :class:`mrflight.models.GRURegressor` (speed does not depend on the weights) --
  with and without the least-squares M0 (one EPG simulation per voxel), whole slice.

Set-up (simulating or loading the cached dictionary, building matchers) is reported separately.

Usage::

    python benchmarks/maps_throughput.py [--ckpt CKPT] [--device cuda] [--quick]

Prints a markdown table and writes ``benchmarks/results/maps_throughput.md`` (not with --quick).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_line, write_result  # benchmarks/

from mrflight import maps
from mrflight.dictionary import generate, paper_grid
from mrflight.phantoms import brain_phantom
from mrflight.physics import oksuz2019, simulate


def _series(size: int, seq, noise: float, path: Path) -> tuple[np.ndarray, int]:
    ph = brain_phantom(size)
    mask = ph.mask
    pairs, inv = np.unique(np.stack([ph.t1_ms[mask], ph.t2_ms[mask]], 1), axis=0,
                           return_inverse=True)
    fp = simulate(seq, torch.tensor(pairs[:, 0]), torch.tensor(pairs[:, 1])).numpy()
    scale = float(np.linalg.norm(fp, axis=1).mean())
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.complex64,
                                    shape=(size, size, len(seq)))
    rng = np.random.default_rng(0)
    m0 = ph.m0[mask]
    rows = np.flatnonzero(mask.ravel())
    flat = out.reshape(-1, len(seq))
    for r0 in range(0, size, 16):  # row bands: bounded memory while writing
        band = slice(r0 * size, min(size, r0 + 16) * size)
        n = band.stop - band.start
        flat[band] = noise * scale * (rng.standard_normal((n, len(seq)))
                                      + 1j * rng.standard_normal((n, len(seq))))
    flat[rows] += (fp[inv.ravel()] * m0[:, None]).astype(np.complex64)
    out.flush()
    del out
    return mask, int(mask.sum())


class _GRUModule(torch.nn.Module):
    """A freshly initialised GRU with the checkpoint module's ``predict_parameters``."""

    def __init__(self, seq, device):
        super().__init__()
        from mrflight.regressor import MRFRegressor

        self.inner = MRFRegressor({"_target_": "mrflight.models.GRURegressor",
                                   "input_length": len(seq), "hidden_size": 100},
                                  sequence=seq.to_dict()).to(device).eval()
        self.hparams = self.inner.hparams
        # steer the untrained output to about (1000, 100) ms so that M0 is defined
        with torch.no_grad():
            self.inner.net.fc.weight.mul_(0.01)
            self.inner.net.fc.bias.copy_(torch.tensor([1000.0, 100.0], device=device)
                                         / self.inner.target_scale)

    @property
    def device(self):
        return self.inner.device

    def predict_parameters(self, signals):
        return self.inner.predict_parameters(signals)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="a trained checkpoint (default: fresh GRU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--exhaustive-rows", type=int, default=16,
                    help="rows of the slice matched exhaustively (rate extrapolated)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 x 64, 300 pulses")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "maps_throughput.md"))
    args = ap.parse_args(argv)
    size = 64 if args.quick else args.size
    seq = oksuz2019(n_pulses=300) if args.quick else oksuz2019()
    dev = args.device
    rows = []
    setup = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slice.npy"
        (mask, n_mask), t_sim = _timed(lambda: _series(size, seq, 0.01, path))
        setup.append(f"series {size} x {size} x {len(seq)} complex64 simulated and written in "
                     f"{t_sim:.1f} s; {n_mask} voxels in the phantom")
        grid = paper_grid()
        if args.quick:
            grid = grid[::40]
        d, t_dict = _timed(lambda: generate(seq, grid, cache_dir=True, progress=False))
        which = "paper grid, every 40th atom" if args.quick else "paper grid"
        setup.append(f"dictionary {len(d)} atoms x {d.n_timepoints} ({which}): "
                     f"generated or loaded from cache in {t_dict:.1f} s")

        def run(rec, mask_arg=None):
            return _timed(lambda: maps.reconstruct_series(path, rec, mask=mask_arg,
                                                          chunk_voxels=8192))

        # exhaustive: a band of rows in the middle of the slice
        ex, t_b = _timed(lambda d=d: maps.MatchingReconstructor.from_dictionary(
            d, complex_matching=True, device=dev))
        setup.append(f"exhaustive matcher built in {t_b:.1f} s")
        band = np.zeros_like(mask)
        r0 = size // 2 - args.exhaustive_rows // 2
        band[r0: r0 + args.exhaustive_rows] = mask[r0: r0 + args.exhaustive_rows]
        res, t = run(ex, band)
        n = int(res.mask.sum())
        rows.append(("exhaustive complex matching (paper grid)", n, t, True))
        del ex
        svd, t_b = _timed(lambda d=d: maps.MatchingReconstructor.from_dictionary(
            d, complex_matching=True, rank=25, device=dev))
        setup.append(f"SVD rank-25 matcher built in {t_b:.1f} s")
        res, t = run(svd)
        rows.append(("SVD rank-25 complex matching (paper grid)", int(res.mask.sum()), t, False))
        auto_mask_voxels = int(res.mask.sum())
        del svd, d

        if args.ckpt:
            import mrflight

            module = mrflight.load_checkpoint(args.ckpt, map_location=dev)
            label = f"GRU checkpoint {Path(args.ckpt).name}"
        else:
            module = _GRUModule(seq, dev)
            label = "GRU (hidden 100, freshly initialised)"
        for m0 in (True, False):
            rec = maps.NetworkReconstructor(module, seq, compute_m0=m0, source=args.ckpt)
            res, t = run(rec)
            rows.append((f"{label}{' + M0' if m0 else ', no M0'}", int(res.mask.sum()), t, False))

    lines = [
        "# Map reconstruction throughput",
        "",
        f"- machine: {machine_line(dev)}; device: {dev}",
        f"- slice: {size} x {size} brain phantom, sequence {seq.name} ({len(seq)} pulses), "
        "complex series read from a .npy file; automatic (temporal-SNR) mask keeps "
        f"{auto_mask_voxels} voxels",
        *[f"- {s}" for s in setup],
        "- time = reconstruct_series (read, mask, reconstruct, M0), output files not written",
        "",
        "| method | voxels | time (s) | voxels/s | time for the masked slice (s) |",
        "|---|---|---|---|---|",
    ]
    for name, n, t, extrap in rows:
        rate = n / t
        full = auto_mask_voxels / rate
        lines.append(f"| {name} | {n}{' (band)' if extrap else ''} | {t:.2f} | {rate:,.0f} | "
                     f"{full:.1f}{' (extrapolated)' if extrap else ''} |")
    cmd = "python benchmarks/maps_throughput.py" + (" --quick" if args.quick else "") + (
        f" --ckpt {args.ckpt}" if args.ckpt else "")
    lines += ["", f"Command: `{cmd}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result(Path(args.out), text)
    return text


if __name__ == "__main__":
    main()
