"""Accuracy of the maps from a scan whose truth is known: the README's maps command, end to end.

Builds a 3-D scan as a user's would look: the package's brain phantom (``brain_phantom``: white
and grey matter, CSF, fat, BrainWeb 3 T values) repeated over ``--slices`` slices, a smooth B1
field from 0.8 to 1.2 over the field of view, a smooth background phase, proton densities of
0.70-0.95, a scale of 1e4 (scanner units) and complex Gaussian noise (``--noise``, relative to
the fingerprint norm of grey matter at proton density 1 and B1 = 1), simulated with the
checkpoint's (or dictionary's) sequence, saved as NIfTI with an oblique 1.2 x 1.2 x 3 mm
affine. Then runs ``python eval.py input=scan.nii ckpt_path=CKPT`` (or ``dictionary=``) as a
user would, output to a log file, and compares the maps with the truth: per tissue the median
error and interquartile range of T1, T2, B1 and M0 in %, the mask, the affine, the TB1 map
against the field, and the sidecars' ``RelativeNoise`` against the noise put in.

Usage::

    python benchmarks/maps_accuracy.py --ckpt RUN_DIR                 # a trained network
    python benchmarks/maps_accuracy.py --ckpt RUN_DIR --fit 15        # + maximum-likelihood fit
    python benchmarks/maps_accuracy.py --ckpt RUN_DIR --fit 15 --b1map  # at the true B1 map
    python benchmarks/maps_accuracy.py --dictionary dict.h5 [--b1map] [--magnitude]

CSF (T2 about 1650 ms) lies outside the default training prior (T2 <= 600 ms): its row shows
what a network does outside its range; the maps count (sidecars'
``EstimatesAboveTrainingRange``) and warn about voxels whose estimates exceed that range.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_line, markdown_table, publish  # benchmarks/

from mrflight.fileio import atomic_path
from mrflight.phantoms import brain_phantom
from mrflight.physics import simulate

HERE = Path(__file__).resolve().parent
SCALE = 1e4  # M0 at proton density 1, in the series' units


def _sequence(args):
    """The sequence of the checkpoint or dictionary the maps are made with."""
    if args.ckpt:
        import mrflight
        from mrflight.checkpoints import checkpoint_sequence, single_checkpoint

        return checkpoint_sequence(mrflight.load_checkpoint(single_checkpoint(args.ckpt)))
    from mrflight import dictionary

    seq = dictionary.load(args.dictionary).get_sequence()
    if seq is None:
        raise SystemExit(f"{args.dictionary} stores no sequence to simulate the scan with")
    return seq


def _oblique_affine() -> np.ndarray:
    """1.2 x 1.2 x 3 mm voxels, rotated 20 degrees about z and 10 about x, origin shifted."""
    def rot(axis, deg):
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        i, j = (a for a in range(3) if a != axis)
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        return r

    a = np.eye(4)
    a[:3, :3] = rot(2, 20) @ rot(0, 10) @ np.diag([1.2, 1.2, 3.0])
    a[:3, 3] = [-40.5, -35.2, 12.7]
    return a


def make_scan(seq, size: int, slices: int, noise: float, seed: int = 0) -> dict:
    """The scan ``(size, size, slices, T)`` complex64 and its truth."""
    ph = brain_phantom(size)
    lab = np.repeat(ph.labels[:, :, None], slices, 2)
    t1, t2, pd = (np.repeat(m[:, :, None], slices, 2) for m in (ph.t1_ms, ph.t2_ms, ph.m0))
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (size, size, slices)),
                          indexing="ij")
    field = 0.7 * x + 0.3 * (2 * y ** 2 - 1) * np.cos(np.pi * z / 2)
    b1 = 0.8 + 0.4 * (field - field.min()) / (field.max() - field.min())
    phase = 1.2 * x - 0.8 * y + 0.5 * z + 0.6 * x * y
    sel = lab > 0
    d = simulate(seq, torch.tensor(t1[sel]), torch.tensor(t2[sel]), torch.tensor(b1[sel]),
                 dtype=torch.float64).numpy()
    ref = simulate(seq, [1600.0], [100.0], dtype=torch.float64).numpy()  # grey matter, PD 1
    sigma = noise * SCALE * float(np.linalg.norm(ref))
    clean = SCALE * pd[sel][:, None] * np.exp(1j * phase[sel])[:, None] * d
    rng = np.random.default_rng(seed)
    scan = sigma * (rng.standard_normal(lab.shape + (len(seq),))
                    + 1j * rng.standard_normal(lab.shape + (len(seq),)))
    scan[sel] += clean
    rel = np.full(lab.shape, np.nan)
    rel[sel] = sigma / np.linalg.norm(clean, axis=1)
    return {"scan": scan.astype(np.complex64), "labels": lab, "regions": ph.regions, "t1": t1,
            "t2": t2, "b1": b1, "m0": SCALE * pd, "rel": rel}


def run_maps(scan_path: Path, out: Path, args) -> float:
    """The README's command; returns its wall time (its output goes to ``out/maps.log``)."""
    cmd = [sys.executable, str(HERE.parent / "eval.py"), f"input={scan_path}",
           f"hydra.run.dir={out}"]
    cmd += [f"ckpt_path={args.ckpt}"] if args.ckpt else [f"dictionary={args.dictionary}"]
    if args.fit:
        cmd.append(f"maps.fit_iterations={args.fit}")
    if args.b1map:
        cmd.append(f"b1map={scan_path.parent / 'b1_true.nii'}")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with atomic_path(out / "maps.log") as tmp, open(tmp, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        raise SystemExit(f"the maps command failed (exit {rc}): see {out / 'maps.log'}\n"
                         + " ".join(cmd))
    return time.perf_counter() - t0


def _stats(est: np.ndarray, true: np.ndarray) -> str:
    """Median error and interquartile range, % of the truth."""
    e = 100 * (est - true) / true
    e = e[np.isfinite(e)]
    if not e.size:
        return "-"
    q1, q2, q3 = np.percentile(e, [25, 50, 75])
    return f"{q2:+.1f} [{q3 - q1:.1f}]"


def report(truth: dict, out: Path, args, seconds: float) -> str:
    import nibabel as nib

    def load(name):
        p = out / f"scan_{name}.nii.gz"
        return nib.load(str(p)) if p.exists() else None

    imgs = {n: load(n) for n in ("T1map", "T2map", "M0map", "TB1map", "mask")}
    affine_ok = all(np.allclose(im.affine, truth["affine"], atol=1e-4)
                    for im in imgs.values() if im is not None)
    t1, t2, m0 = (imgs[n].get_fdata() for n in ("T1map", "T2map", "M0map"))
    b1 = imgs["TB1map"].get_fdata() if imgs["TB1map"] is not None else None
    mask = imgs["mask"].get_fdata() > 0
    lab = truth["labels"]
    rows = []
    for k, name in enumerate(truth["regions"], start=1):
        sel = (lab == k) & mask
        rows.append([name, int(sel.sum()), f"{truth['t1'][lab == k][0]:.0f} / "
                     f"{truth['t2'][lab == k][0]:.0f}",
                     _stats(1000 * t1[sel], truth["t1"][sel]),
                     _stats(1000 * t2[sel], truth["t2"][sel]),
                     _stats(b1[sel], truth["b1"][sel]) if b1 is not None else "-",
                     _stats(m0[sel], truth["m0"][sel])])
    side = json.loads((out / "scan_T1map.json").read_text())
    noise = side.get("RelativeNoise") or {}
    tissue = lab > 0
    lines = [
        "# Maps of a scan with known truth", "", machine_line(), "",
        f"Scan: brain phantom {lab.shape[0]} x {lab.shape[1]} x {lab.shape[2]} voxels, "
        f"{truth['T']} time points, B1 0.8-1.2, scale {SCALE:g}, noise {args.noise:g} "
        "relative to grey matter's fingerprint at proton density 1; oblique NIfTI affine. "
        f"Maps by `{' '.join(truth['command'])}` in {seconds:.1f} s (log: {out / 'maps.log'}).",
        "",
        "Median error [interquartile range] in % of the truth, over the masked voxels of "
        "each tissue:", "",
        markdown_table(["tissue", "voxels", "T1 / T2 ms", "T1", "T2", "B1", "M0"], rows), "",
        f"- mask: {100 * mask[tissue].mean():.1f} % of the tissue and {int(mask[~tissue].sum())} "
        f"of {int((~tissue).sum())} background voxels; affine and voxel grid as the input's: "
        f"{'yes' if affine_ok else 'NO'}",
    ]
    if b1 is not None:
        sel = mask & tissue & np.isfinite(b1)
        err = b1[sel] - truth["b1"][sel]
        lines.append(f"- TB1 map against the field: median error {np.median(err):+.3f}, median "
                     f"|error| {np.median(np.abs(err)):.3f}, correlation "
                     f"{np.corrcoef(b1[sel], truth['b1'][sel])[0, 1]:.2f}")
    if noise:
        rel = truth["rel"][tissue & mask]
        lines.append(f"- RelativeNoise (sidecar) 5th/50th/95th percentile: "
                     f"{noise.get('Percentile5', float('nan')):.4f} / "
                     f"{noise.get('Median', float('nan')):.4f} / "
                     f"{noise.get('Percentile95', float('nan')):.4f}; truth over the "
                     "masked tissue: "
                     f"{np.percentile(rel, 5):.4f} / {np.median(rel):.4f} / "
                     f"{np.percentile(rel, 95):.4f}")
    if side.get("Warnings"):
        lines.append("- warnings: " + " | ".join(side["Warnings"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a trained network: run folder or .ckpt")
    src.add_argument("--dictionary", help="a dictionary file (.h5, .mat, .npz) with its sequence")
    ap.add_argument("--noise", type=float, default=0.015, help="relative noise (default 0.015)")
    ap.add_argument("--size", type=int, default=64, help="in-plane size (default 64)")
    ap.add_argument("--slices", type=int, default=4, help="slices (default 4)")
    ap.add_argument("--fit", type=int, default=0, help="maps.fit_iterations (default 0)")
    ap.add_argument("--b1map", action="store_true", help="give the true B1 field as b1map=")
    ap.add_argument("--magnitude", action="store_true", help="a magnitude series")
    ap.add_argument("--out", help="folder for the scan and the maps (default: a new temporary "
                                  "one)")
    args = ap.parse_args(argv)
    import nibabel as nib

    seq = _sequence(args)
    folder = Path(args.out or tempfile.mkdtemp(prefix="mrflight-maps-accuracy-"))
    folder.mkdir(parents=True, exist_ok=True)
    truth = make_scan(seq, args.size, args.slices, args.noise)
    truth["affine"], truth["T"] = _oblique_affine(), len(seq)
    scan = np.abs(truth["scan"]) if args.magnitude else truth["scan"]
    scan_path = folder / "scan.nii"
    for path, arr in ((scan_path, scan), (folder / "b1_true.nii",
                                          truth["b1"].astype(np.float32))):
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # uncompressed: quick to write
            fh.write(nib.Nifti1Image(arr, truth["affine"]).to_bytes())
    out = folder / "maps"
    truth["command"] = ["python eval.py", "input=scan.nii",
                        f"ckpt_path={args.ckpt}" if args.ckpt else
                        f"dictionary={args.dictionary}"] + \
        ([f"maps.fit_iterations={args.fit}"] if args.fit else []) + \
        (["b1map=b1_true.nii"] if args.b1map else [])
    seconds = run_maps(scan_path, out, args)
    publish("maps_accuracy.md", report(truth, out, args, seconds))


if __name__ == "__main__":
    main()
