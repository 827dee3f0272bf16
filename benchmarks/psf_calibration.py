"""A measured PSF against the ideal one (docs/particles.md, "A real microscope"), in three parts.

1. Same physics: a PSF model file of the ideal optics (blurflow.psfmodel.PSFModel.from_optics)
   against blurflow.optics.MotionPSF on 1,000 random motions of the training ranges with sub-pixel
   offsets (relative L2 of the kernels: median and max).
2. An aberrated microscope: the default optics with astigmatism and spherical aberration (Zernike
   Noll 6 and 11, ``--aberration`` rad rms each) imaging beads of ``--bead-um`` diameter
   (blurflow.optics.SpherePSF). A calibration stack of 16 such beads (planes every 0.5 um over
   +-24 um, focus spread +-0.5 um, 200,000 photons, background 10, Poisson) -> blurflow calibrate's
   model. Then ``--beads`` motion-blurred beads (v1, v2 in [-1, 1]; start depth z0 in [-1, 1] A
   either side of focus, moving away from it by |v3| in [0, 1] A; 5,000-20,000 photons) fitted
   with the calibrated model (depth signed) and with the ideal optics (depth folded, the fit
   of today): R^2 of |v1|, |v2|, v3 and z0 *with their signs*, and the share of depth signs right
   where |z0 + v3 / 2| > 0.1 A. Depths count from the plane of the sharpest image of the true PSF
   (what calibration calls z = 0).
3. Static beads of the same microscope at depths uniform over the calibrated range less 2 um at
   each end: rmse of z against the truth for the calibrated fit (``--static``), as a share of the
   calibrated range, and the rate in beads/s.

    python benchmarks/psf_calibration.py [--beads 300] [--aberration 0.5] [--bead-um 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from blurflow.optics import MotionPSF, MotionScales, Optics, PupilPSF, SpherePSF
from blurflow.particles import BeadFitter, bead_scores
from blurflow.particles.calibrate import bead_stack, calibrate, sharpest_plane
from blurflow.psfmodel import PSFModel

SCALES = MotionScales(24, 10)
WINDOW = 64


def same_physics(optics: Optics, n: int = 1000) -> dict:
    """Relative L2 of the model file's motion PSFs against MotionPSF's (median, max)."""
    model = PSFModel.from_optics(optics, (-2.5 * SCALES.axial_scale_um, 2.5 * SCALES.axial_scale_um), WINDOW)
    reach = (-2 * SCALES.axial_scale_um, 2 * SCALES.axial_scale_um)
    g = torch.Generator().manual_seed(0)
    motion = torch.rand(n, 4, generator=g) * torch.tensor([2.0, 2.0, 1.0, 1.0]) - torch.tensor([1.0, 1.0, 0.0, 0.0])
    offset = torch.rand(n, 2, generator=g) - 0.5
    ref = MotionPSF(optics, SCALES, WINDOW, z_range_um=reach)(motion, offset_px=offset, chunk=64)
    new = MotionPSF(model, SCALES, WINDOW, z_range_um=reach)(motion, offset_px=offset, chunk=64)
    err = ((ref - new).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).numpy()
    return {"kernels": n, "rel_l2_median": float(np.median(err)), "rel_l2_max": float(err.max())}


def sharpest_um(source, z_um: np.ndarray) -> float:
    """Depth (um) of the sharpest image (blurflow.particles.calibrate.sharpest_plane over ``z_um``)
    of a PSF source, on the camera grid: what calibration calls z = 0."""
    psf = MotionPSF(source, MotionScales(1.0, 1.0), WINDOW, z_range_um=(float(z_um[0]) - 1, float(z_um[-1]) + 1))
    kernels = psf(torch.stack([torch.zeros(len(z_um)), torch.zeros(len(z_um)), torch.zeros(len(z_um)), torch.from_numpy(z_um).float()], 1))
    return float(z_um[0] + sharpest_plane(kernels.double().numpy()) * (z_um[1] - z_um[0]))


def signed_scores(truth: np.ndarray, fit, pixel_um: float) -> dict:
    """bead_scores with z0 and v3 signed, and the share of depth signs right where the path's mean
    depth is more than 0.1 A from focus."""
    est = fit.params[:, 2:6]
    scores = bead_scores(truth, est, SCALES, pixel_um, fit.std[:, 2:6], fit.direction_resolved)
    mean_true, mean_est = truth[:, 3] + truth[:, 2] / 2, est[:, 3] + est[:, 2] / 2
    clear = np.abs(mean_true) > 0.1
    scores["depth_sign_right"] = float((np.sign(mean_true) == np.sign(mean_est))[clear].mean())
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beads", type=int, default=300)
    parser.add_argument("--aberration", type=float, default=0.5, help="rad rms of astigmatism and of spherical aberration each")
    parser.add_argument("--bead-um", type=float, default=1.0, help="bead diameter in um")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ideal = Optics()
    print(json.dumps({"part": "same physics", **same_physics(ideal)}), flush=True)

    waves = args.aberration / (2 * math.pi)
    optics = Optics(zernike={6: waves, 11: waves})
    true_psf = SpherePSF(PupilPSF(optics), args.bead_um)
    z_stack = np.arange(-48, 49) * 0.5
    focus = sharpest_um(true_psf, np.linspace(-10, 10, 201))
    t0 = time.perf_counter()
    stack, _ = bead_stack(true_psf, z_stack + focus, shape=(360, 360), beads=16, photons=2e5, background=10.0, focus_spread_um=0.5, spacing_px=72)
    model = calibrate(np.clip(stack, 0, 65535).astype(np.uint16), 0.5, ideal, window=64)
    calibrated = {
        "beads": model.beads, "left_out": model.extra["left_out"], "z_range_um": model.z_range_um, "asymmetry": round(model.asymmetry, 3),
        "relative_residual": round(model.extra["relative_residual"], 4), "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    print(json.dumps({"part": "calibration", "aberration_rad_rms": args.aberration, "bead_um": args.bead_um, **calibrated}), flush=True)

    # motion-blurred beads: start depth either side of focus, moving away from it (the signed report's representative)
    g = torch.Generator().manual_seed(1)
    n = args.beads

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    z0 = uniform(-1, 1)
    v3 = uniform(0, 1) * torch.sign(z0)
    truth = torch.stack([uniform(-0.5, 0.5), uniform(-0.5, 0.5), uniform(-1, 1), uniform(-1, 1), v3, z0, uniform(5000, 20000), uniform(2, 6)], 1)
    simulate = BeadFitter(ideal, SCALES, WINDOW, psf=_shifted(true_psf, focus, model))
    counts = simulate.simulate(truth, g)
    for name, fitter in (("calibrated", BeadFitter(ideal, SCALES, WINDOW, psf=model)), ("ideal optics", BeadFitter(ideal, SCALES, WINDOW))):
        fitter.bank()
        t0 = time.perf_counter()
        fit = fitter.fit(counts)
        rate = n / (time.perf_counter() - t0)
        scores = signed_scores(truth[:, 2:6].numpy(), fit, ideal.pixel_um)
        keep = ("r2", "depth_sign_right", "directions_resolved", "resolved_directions_right", "within_2_std")
        print(json.dumps({"part": "moving beads", "fit": name, "beads": n, "beads_per_s": round(rate, 1), **{k: scores[k] for k in keep}}), flush=True)

    # static beads over the calibrated range
    lo, hi = model.z_range_um
    depth = uniform(lo + 2, hi - 2) / SCALES.axial_scale_um
    still = torch.stack([uniform(-0.5, 0.5), uniform(-0.5, 0.5), torch.zeros(n), torch.zeros(n), torch.zeros(n), depth, uniform(5000, 20000), uniform(2, 6)], 1)
    counts = simulate.simulate(still, g)
    fitter = BeadFitter(ideal, SCALES, WINDOW, psf=model, static=True)
    fitter.bank()
    t0 = time.perf_counter()
    fit = fitter.fit(counts)
    rate = n / (time.perf_counter() - t0)
    err = (fit.params[:, 5] - depth.numpy()) * SCALES.axial_scale_um
    rmse = float(np.sqrt(np.mean(err**2)))
    share = round(rmse / (hi - lo), 5)
    print(json.dumps({"part": "static beads", "beads": n, "beads_per_s": round(rate, 1), "rmse_z_um": round(rmse, 4), "share_of_range": share}))


class _shifted:
    """A PSF source read ``focus`` um deeper: depths counted from its sharpest plane, over the
    calibrated model's range (the truth of the simulation, in the calibration's frame)."""

    def __init__(self, source, focus: float, model: PSFModel):
        self.source, self.focus, self.z_range_um = source, focus, model.z_range_um
        for name in ("pixel_um", "oversample", "axial_step_um", "support_per_px"):
            setattr(self, name, getattr(source, name))
        self.symmetric = False

    def otf(self, z_um: torch.Tensor, m: int) -> torch.Tensor:
        return self.source.otf(z_um + self.focus, m)


if __name__ == "__main__":
    main()
