"""A real bead z-stack split in two halves by bead: calibrate on one half (blurflow calibrate's
model), fit the other half's beads plane by plane as static beads (blurflow particles --psf
--static), and score the depths against the stack's known steps (docs/particles.md, "A real
stack"). Beside each rmse, the Cramér-Rao bound's: the rmse an efficient estimator
would reach on the same planes (the root-mean-square of the fits' std).

Scores: the rmse of z against the steps after one offset per bead (its focus), as a share of the
calibrated range, over the planes whose depth lies inside the model's range less 0.5 um at each
end; the share of planes more than ``--clear-um`` from a bead's focus whose depth sign is right;
each bead's slope of fitted against true z (1 when the depth scale is right). Then the halves swap.

Data used in docs/particles.md (fetch from GitHub; CC BY 4.0): hoogenboom-group/PSF-Extractor at
48bbcf3db19d7858a543697ccf5f75b83507832e, data/sample_zstack (34 planes, 200 nm beads, NA 0.95,
520 nm, 108 nm px, 300 nm step) and data/sample_zstack_astigmatism (80 planes, NA 0.85, 520 nm,
63.5 nm px, 100 nm step; notebooks/walkthrough.ipynb), each folder's planes stacked in name order.

    python benchmarks/psf_real_stack.py STACK.tif --z-step-um 0.3 --pixel-um 0.108 --na 0.95 --wavelength-um 0.52 [--n 1.0] [--window 24] [--snr-min 20]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import tifffile
import torch

from blurflow.optics import MotionScales, Optics
from blurflow.particles import BeadFitter
from blurflow.particles.calibrate import auto_window, calibrate, find_beads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stack")
    parser.add_argument("--z-step-um", type=float, required=True)
    parser.add_argument("--pixel-um", type=float, required=True, help="pixel in the sample (um)")
    parser.add_argument("--na", type=float, required=True)
    parser.add_argument("--n", type=float, default=1.0)
    parser.add_argument("--wavelength-um", type=float, required=True)
    parser.add_argument("--window", type=int, help="px per bead (default as blurflow calibrate)")
    parser.add_argument("--clear-um", type=float, default=0.5, help="depth from focus beyond which a sign is scored")
    parser.add_argument("--snr-min", type=float, default=20.0, help="as blurflow calibrate --snr-min")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stack = tifffile.imread(args.stack)
    optics = Optics(na=args.na, n=args.n, wavelength_um=args.wavelength_um, magnification=1.0, camera_pixel_um=args.pixel_um)
    window = args.window or auto_window(optics, (len(stack) - 1) * args.z_step_um / 2)
    saturated = stack >= np.iinfo(stack.dtype).max if np.issubdtype(stack.dtype, np.integer) else np.zeros(stack.shape, bool)
    centres, left = find_beads(stack.astype(np.float64), window, saturated)
    half = np.arange(len(centres)) % 2 == 0  # alternate beads in the detector's (row-major) order
    print(json.dumps({"stack": args.stack, "shape": list(stack.shape), "window": window, "beads": len(centres), "left_out": left}), flush=True)
    for name, use in (("even beads -> odd", half), ("odd beads -> even", ~half)):
        t0 = time.perf_counter()
        model = calibrate(stack, args.z_step_um, optics, window=window, use=use, snr_min=args.snr_min)
        seconds = time.perf_counter() - t0
        test = centres[~use]
        fitter = BeadFitter(optics, MotionScales(1.0, 1.0), window, psf=model, static=True)
        w = window // 2
        counts = torch.from_numpy(np.stack([stack[:, y - w : y + w, x - w : x + w] for y, x in test]).astype(np.float32))  # (B, Z, w, w)
        b, z = counts.shape[:2]
        t0 = time.perf_counter()
        fit = fitter.fit(counts.reshape(b * z, window, window))
        rate = b * z / (time.perf_counter() - t0)
        fitted = fit.params[:, 5].reshape(b, z)  # um (A = 1 um)
        truth = np.arange(z) * args.z_step_um
        lo, hi = model.z_range_um
        if fitter.signed:
            offset = np.median(fitted - truth, 1, keepdims=True)  # each bead's focus
            inside = (truth + offset > lo + 0.5) & (truth + offset < hi - 0.5)
            err = np.where(inside, fitted - truth - offset, np.nan)
            offset = offset + np.nanmean(err, 1, keepdims=True)  # the least-squares offset over the planes inside
        else:  # a symmetric model: depth folded (>= 0), each bead's focus where |truth - focus| fits best
            offset = -np.array([_best_focus(fitted[i], truth, args.z_step_um, hi) for i in range(b)])[:, None]
            inside = np.abs(truth + offset) < hi - 0.5
        focus = -offset  # the bead's focus on the stack's z axis
        depth_true = truth - focus if fitter.signed else np.abs(truth - focus)
        err = np.where(inside, fitted - depth_true, np.nan)
        rmse = float(np.sqrt(np.nanmean(err**2)))
        clear = inside & (np.abs(truth - focus) > args.clear_um)
        sign_right = float((np.sign(fitted - offset - focus) == np.sign(truth - focus))[clear].mean()) if fitter.signed else None
        slopes = [float(np.polyfit(depth_true[i, m], fitted[i, m], 1)[0]) for i, m in enumerate(inside) if m.sum() > 3]
        depth = np.round((truth - focus) / args.z_step_um).astype(int)  # planes from each bead's focus
        by_depth = {int(d): round(float(np.sqrt(np.nanmean(err[depth == d] ** 2))), 3) for d in np.unique(depth[inside])}
        std = np.where(inside, fit.std[:, 5].reshape(b, z), np.nan)  # Cramér-Rao std of each depth (x the dispersion's root)
        bound_by_depth = {int(d): round(float(np.sqrt(np.nanmean(std[depth == d] ** 2))), 3) for d in np.unique(depth[inside])}
        print(json.dumps({
            "split": name, "calibration_beads": model.beads, "test_beads": b, "planes": z, "calibrate_s": round(seconds, 1),
            "z_range_um": [round(lo, 3), round(hi, 3)], "asymmetry": round(model.asymmetry, 3), "signed": fitter.signed,
            "rmse_z_um": round(rmse, 4), "share_of_range": round(rmse / (hi - lo), 4), "depth_sign_right": sign_right and round(sign_right, 4),
            "slope_median": round(float(np.median(slopes)), 3), "static_beads_per_s": round(rate, 1),
            "rmse_um_by_planes_from_focus": by_depth, "bound_rmse_z_um": round(float(np.sqrt(np.nanmean(std**2))), 4),
            "bound_um_by_planes_from_focus": bound_by_depth,
        }), flush=True)  # fmt: skip


def _folded_error(fitted: np.ndarray, truth: np.ndarray, focus: float, reach: float) -> float:
    """Mean squared error (um²) of folded depths ``fitted`` against |``truth`` - ``focus``| over
    the planes within ``reach`` - 0.5 um of focus."""
    inside = np.abs(truth - focus) < reach - 0.5
    return float(np.mean((fitted[inside] - np.abs(truth[inside] - focus)) ** 2)) if inside.any() else np.inf


def _best_focus(fitted: np.ndarray, truth: np.ndarray, step: float, reach: float) -> float:
    """The focus (um, on the stack's axis) that fits folded depths best (:func:`_folded_error`):
    the best plane, then to 1/100 of a ``step`` within one step of it."""
    near = min(truth, key=lambda f: _folded_error(fitted, truth, f, reach))
    return min(near + step * np.linspace(-1, 1, 201), key=lambda f: _folded_error(fitted, truth, f, reach))


if __name__ == "__main__":
    main()
