"""Particle mode against bead density: fraction fitted, R² per component, coverage, beads/s.

Frames of ``--size`` px rendered by the project's own renderer as the pipeline's dense bead test
set is (blurflow.testsets.write_beads_dense: one-pixel beads, each its own region with its own
motion drawn in the training ranges with v2 >= 0, the training camera), ``--densities`` beads per
128 x 128 px of the frame at uniform random path midpoints at least 8 px apart, where a fit window
fits. Every frame is detected and fitted (blurflow.particles.detect, fit_frames: all frames in one
batch, neighbours together); a fit whose midpoint lies within 3 px of a bead's is that bead's
(blurflow.particles.match).
Reported per density: the fraction of beads fitted (matched, not flagged), R² of |v1|, |v2|,
v3, z0 (blurflow.particles.bead_scores), the share of errors within 1 and 2 predicted std,
beads/s (detection and fits; the kernel bank is built before the clock: its time is printed
once as the start-up), and in the same run the floor of that speed: beads/s of detection and each
streak's fit alone (fit_frames with no rounds with neighbours and no splits), what every bead
costs before its neighbours are fitted with it. ``--repeat`` times both that many times (the fits
are the same each time). With ``--stages``, one more pass under cProfile prints the seconds
spent in each stage of fit_frames (cumulative, so nested stages count in their callers too).

    python benchmarks/particle_density.py [--densities 1 3 6 10] [--frames 4] [--size 512] [--threads 2] [--repeat 1] [--stages]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch

from blurflow import testsets
from blurflow.particles import BeadFitter, bead_scores, detect, fit_frames, match
from blurflow.synthesis import Setup


def frames_and_truth(setup: Setup, size: int, density: float, frames: int, seed: int, folder: Path) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Frames (camera counts), true midpoints (one (M, 2) array per frame) and motions (M_total, 4)
    of a dense bead set (blurflow.testsets.write_beads_dense) of ``frames`` images of ``size`` px."""
    path = folder / f"dense_{density:g}.h5"
    testsets.write_beads_dense(path, replace(setup, seed=seed), size, frames, density, progress=False)
    with h5py.File(path) as f:
        images, params = list(f["image"][()].astype(np.float32)), f["params"][()]
        rows, cols = json.loads(f.attrs["bead_rows"]), json.loads(f.attrs["bead_cols"])
    midpoints = [np.stack([r, c], 1) for r, c in zip(rows, cols)]
    return images, midpoints, np.concatenate([p[: len(m)] for p, m in zip(params, midpoints)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[1, 3, 6, 10], help="beads per 128 x 128 px")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="timings of each density")
    ap.add_argument("--stages", action="store_true", help="also the seconds of each stage of one pass (cProfile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = Setup.from_config({})
    t0 = time.perf_counter()
    window = testsets.dense_window(args.size)
    fitter = BeadFitter(setup.optics, setup.scales, window)
    fitter.bank()
    print(json.dumps({"startup_s": round(time.perf_counter() - t0, 2)}), flush=True)
    for density in args.densities:
        with tempfile.TemporaryDirectory() as tmp:
            frames, midpoints, truth = frames_and_truth(setup, args.size, density, args.frames, args.seed, Path(tmp))
        beads, speed, alone = len(truth), [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            found = [detect(f, window) for f in frames]
            fit_frames(fitter, frames, found, rounds=0, splits=0)
            t1 = time.perf_counter()
            found = [detect(f, window) for f in frames]
            parts = fit_frames(fitter, frames, found)
            t2 = time.perf_counter()
            alone.append(round(beads / (t1 - t0), 1))
            speed.append(round(beads / (t2 - t1), 1))
        index = np.concatenate(match(parts, midpoints))
        fit, fitted = parts.fit, index[index >= 0]
        row = {"beads_per_128px": density, "beads": beads, "fitted": round(len(fitted) / beads, 3), "beads_per_s": speed, "alone_beads_per_s": alone}
        if len(fitted) > 2:
            scores = bead_scores(
                truth[index >= 0], fit.params[fitted, 2:6], setup.scales, setup.optics.pixel_um, fit.std[fitted, 2:6], fit.direction_resolved[fitted]
            )
            row.update(r2={k: round(v, 3) for k, v in scores["r2"].items()}, within_1_std=scores["within_1_std"], within_2_std=scores["within_2_std"])
            row["jointly"] = round(float((parts.neighbours[fitted] > 0).mean()), 3)
        print(json.dumps(row), flush=True)
        if args.stages:
            print(json.dumps({"beads_per_128px": density, "stage_s": stages(fitter, frames, window)}), flush=True)


STAGES = {
    "detection": "detect", "fits_with_neighbours": "_fit_groups", "coarse_search": "_starts", "splits": "_split", "pair_trials": "_pair_trial",
    "finish": "_finish", "joint_std": "joint_std", "total": "fit_frames",
}  # fmt: skip


def stages(fitter: BeadFitter, frames: list[np.ndarray], window: int) -> dict[str, float]:
    """Seconds (cumulative) in each of STAGES' functions over one detection and fit of ``frames``."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    fit_frames(fitter, frames, [detect(f, window) for f in frames])
    profile.disable()
    seconds = {name: ct for (_, _, name), (_, _, _, ct, _) in pstats.Stats(profile).stats.items()}
    return {stage: round(seconds.get(name, 0.0), 2) for stage, name in STAGES.items()}


if __name__ == "__main__":
    main()
