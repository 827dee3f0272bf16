"""Static particles per second over a deep axial range (defocusing particle tracking), with a PSF
calibrated on the same microscope (docs/particles.md, "Speed").

The microscope of a public defocus-tracking data set: 10x / 0.45 air objective, 1.6 um pixels,
0.6 um emission, 2 um particles (blurflow.optics.SpherePSF) and 0.1 waves rms of spherical
aberration (an air objective focusing into water: the PSF is asymmetric in depth). Calibration: a
stack of 16 particles, planes every 1 um over +-55 um (blurflow calibrate). Frames: 512 x 512 px,
``--particles`` particles at depths uniform over +-``--depth-um`` (default 85 over +-48 um), 50,000
photons, background 100, Poisson. Timed from the frame's counts to the fits: detection
(blurflow.particles.detect) and the static fit of every particle with its neighbours
(blurflow.particles.fit_frames), ``--repeats`` times (min, median); then the rmse of depth
against the truth and the share of particles found.

    python benchmarks/particle_static.py [--frames 4] [--particles 85] [--depth-um 48] [--window 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from blurflow.optics import MotionScales, Optics, PupilPSF, SpherePSF
from blurflow.particles import BeadFitter, detect, fit_frames
from blurflow.particles.calibrate import bead_stack, calibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--particles", type=int, default=85)
    parser.add_argument("--depth-um", type=float, default=48.0)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optics = Optics(na=0.45, n=1.0, wavelength_um=0.6, magnification=10, camera_pixel_um=16.0, zernike={11: 0.1})
    given = Optics(na=0.45, n=1.0, wavelength_um=0.6, magnification=10, camera_pixel_um=16.0)  # what the user knows
    source = SpherePSF(PupilPSF(optics), 2.0)
    t0 = time.perf_counter()
    stack, _ = bead_stack(source, np.arange(-55, 56) * 1.0, shape=(320, 320), beads=16, photons=5e4, background=100.0, spacing_px=64, size_px=64)
    model = calibrate(stack, 1.0, given, window=args.window)
    print(json.dumps({"calibration_s": round(time.perf_counter() - t0, 1), "beads": model.beads, "z_range_um": model.z_range_um,
                      "asymmetry": round(model.asymmetry, 3)}), flush=True)  # fmt: skip
    frames, truth = [], []
    for f in range(args.frames):
        frame, bead = bead_stack(
            source, np.zeros(1), shape=(512, 512), beads=args.particles, photons=5e4, background=100.0, focus_spread_um=args.depth_um,
            seed=100 + f, spacing_px=44, size_px=64,
        )  # fmt: skip
        frames.append(frame[0])
        truth.append(np.stack([bead["rows"], bead["cols"], -bead["focus_um"]], 1))  # depth = -focus offset
    fitter = BeadFitter(given, MotionScales(1.0, 1.0), args.window, psf=model, static=True)
    fitter.bank()
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        parts = fit_frames(fitter, frames, [detect(frame, args.window) for frame in frames])
        rates.append(args.frames * args.particles / (time.perf_counter() - t0))
    errors, found = [], 0
    for f, t in enumerate(truth):
        mine = np.flatnonzero(parts.frame == f)
        at = parts.centres[mine] + parts.fit.params[mine][:, [1, 0]]
        dist = np.hypot(*(at[:, None] - t[None, :, :2]).transpose(2, 0, 1))
        for i, j in enumerate(dist.argmin(1)):
            if dist[i, j] < 2:
                errors.append(parts.fit.params[mine[i], 5] - t[j, 2])
        found += len(set(dist.argmin(1)[dist.min(1) < 2]))
    errors = np.array(errors)
    inside = np.abs(errors) < 10  # a wrong optimum is an outlier, counted apart
    print(json.dumps({
        "frames": args.frames, "particles_per_frame": args.particles, "window": args.window, "per_s": [round(r, 1) for r in rates],
        "min_per_s": round(min(rates), 1), "median_per_s": round(statistics.median(rates), 1),
        "seconds_per_frame": round(args.frames * args.particles / statistics.median(rates) / args.frames, 3),
        "found": round(found / (args.frames * args.particles), 4), "rmse_z_um": round(float(np.sqrt(np.mean(errors[inside] ** 2))), 3),
        "outliers": round(float(1 - inside.mean()), 4), "range_um": round(model.z_range_um[1] - model.z_range_um[0], 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
