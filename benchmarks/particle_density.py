"""Particle mode against bead density: fraction fitted, R² per component, coverage, beads/s.

Frames of ``--size`` px rendered by the project's own renderer (blurflow.synthesis: one-pixel
beads, each its own region with its own motion drawn in the training ranges with v2 >= 0, the
training camera), ``--densities`` beads per 128 x 128 px at uniform random path midpoints at
least ``--spacing`` px apart, inside the part of the frame where a fit window fits. Every frame
is detected and fitted (blurflow.particles.detect, fit_frames: all frames in one batch,
neighbours together); a fit whose midpoint lies within 3 px of a bead's is that bead's.
Reported per density: the fraction of beads fitted (matched, not flagged), R² of |v1|, |v2|,
v3, z0 (blurflow.particles.bead_scores), the share of errors within 1 and 2 predicted std,
beads/s (detection and fits; the kernel bank is built before the clock: its time is printed
once as the start-up).

    python benchmarks/particle_density.py [--densities 1 3 6 10] [--frames 4] [--size 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from blurflow import synthesis
from blurflow.config import Setup
from blurflow.particles import BeadFitter, bead_scores, detect, fit_frames


def bead_positions(count: int, size: int, margin: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """(count, 2) integer (row, col) uniform in [margin, size - margin), at least ``spacing`` apart."""
    out: list[np.ndarray] = []
    while len(out) < count:
        p = rng.integers(margin, size - margin, 2)
        if all(np.hypot(*(p - q)) >= spacing for q in out):
            out.append(p)
    return np.array(out)


def render(setup: Setup, size: int, positions: list[np.ndarray], seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames (camera counts) with one-pixel beads at ``positions`` (one array per frame) and the
    true (v1, v2, v3, z0) of every bead (v2 >= 0)."""
    setup = setup.with_synthesis(image_px=size, source_zoom=(1.0, 1.0))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "blank.h5"
        with h5py.File(src, "w") as f:  # the renderer wants tiles; the beads replace them
            f["images"] = np.zeros((1, size, size), np.uint16)
        syn = synthesis.Synthesizer(src, setup)
    frames, truth = [], []
    for i, pos in enumerate(positions):
        rng = synthesis.sample_rng((seed, i))
        draws = syn.draws.draw(1, rng)
        motions = syn.draws.motions((1, len(pos)), rng)
        motions[motions[..., 1] < 0, :2] *= -1
        draws["params"] = motions
        sharp = np.zeros((1, size, size), np.float32)
        sharp[0, pos[:, 0], pos[:, 1]] = 1.0
        lo = (syn.canvas_px - size) // 2
        grid = np.arange(syn.canvas_px) - lo
        d = (grid[None, :, None] - pos[:, 0, None, None]) ** 2 + (grid[None, None, :] - pos[:, 1, None, None]) ** 2
        regions = torch.from_numpy(d.argmin(0)[None])  # each bead's own region: the nearest midpoint
        out = syn.batch(draws, sharp=torch.from_numpy(sharp), regions=regions, check=True)
        frames.append(out["image"][0].numpy())
        truth.append(motions[0])
    return frames, truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[1, 3, 6, 10], help="beads per 128 x 128 px")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--spacing", type=float, default=8.0, help="least distance between path midpoints (px)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = Setup.from_config({})
    t0 = time.perf_counter()
    fitter = BeadFitter(setup.optics, setup.scales, args.window)
    fitter.bank()
    print(json.dumps({"startup_s": round(time.perf_counter() - t0, 2)}), flush=True)
    half = args.window // 2
    for density in args.densities:
        rng = np.random.default_rng(args.seed)
        count = round(density * ((args.size - 2 * half) / 128) ** 2)
        positions = [bead_positions(count, args.size, half, args.spacing, rng) for _ in range(args.frames)]
        frames, truth = render(setup, args.size, positions, args.seed)
        t0 = time.perf_counter()
        found = [detect(f, args.window) for f in frames]
        parts = fit_frames(fitter, frames, found)
        seconds = time.perf_counter() - t0
        fit = parts.fit
        midpoint = parts.centres + fit.params[:, [1, 0]]  # (row, col)
        good = ~fit.poor_fit()
        matched_truth, matched_fit = [], []
        for f, (pos, motion) in enumerate(zip(positions, truth)):
            mine = np.flatnonzero((parts.frame == f) & good)
            if not len(mine):
                continue
            dist = np.hypot(*(midpoint[mine, None, :] - pos[None]).transpose(2, 0, 1))
            for b in range(len(pos)):
                j = int(dist[:, b].argmin())
                if dist[j, b] < 3:
                    matched_truth.append(motion[b])
                    matched_fit.append(mine[j])
        fitted = np.array(matched_fit, int)
        row = {"beads_per_128px": density, "beads": count * args.frames, "fitted": round(len(fitted) / (count * args.frames), 3), "beads_per_s": round(count * args.frames / seconds, 1)}
        if len(fitted) > 2:
            scores = bead_scores(np.array(matched_truth), fit.params[fitted, 2:6], setup.scales, setup.optics.pixel_um, fit.std[fitted, 2:6], fit.direction_resolved[fitted])
            row.update(r2={k: round(v, 3) for k, v in scores["r2"].items()}, within_1_std=scores["within_1_std"], within_2_std=scores["within_2_std"])
            row["jointly"] = round(float((parts.neighbours[fitted] > 0).mean()), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
