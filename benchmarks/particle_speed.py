"""Particles per second of the maximum-likelihood bead fit (blurflow.particles.BeadFitter), and its
accuracy on the same beads.

Random isolated beads of the default optics and blur scales (L 24 px, A 10 um): motions uniform in
the training ranges (v1, v2 in [-1, 1], v3 and z0 in [0, 1]), 1,000-20,000 photons, half-normal
background (scale 5 counts), sub-pixel position within +-0.5 px, Poisson noise; 64 px windows.
The kernel bank is built before the clock starts (once per fitter), and the fit runs once on 200
beads first (the operators of the kernel boxes are built when first needed). Prints one JSON line per
timing and one with R^2 per component, calibration (median |error| / predicted std, shares within
1 and 2 std; the lateral error of a bead whose direction is not resolved is taken up to its sign)
and the share of resolved directions and of those resolved the right way.

With --table1, also the paper's Table 1 bead cases a-d: ``--beads`` beads of each motion, with
the same photon and background draws, and the mean fit per case against the truth.

With --true-start, each timing also fits from the true parameters instead of the coarse search's
start: the speed and R² a perfect start proposer (a network trained on simulated windows, as
DECODE's) could give at no cost of its own, the ceiling of that lever.

With --psf, the beads are fitted with that PSF model file (blurflow calibrate; simulated with the
ideal optics as ever): ``blurflow calibrate --out ideal.h5`` gives the same fits as without it.

    python benchmarks/particle_speed.py [--beads 200] [--repeats 3] [--threads 2] [--table1] [--true-start] [--psf PSF.h5] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from blurflow.optics import MotionScales, Optics, paper_sign
from blurflow.particles import BeadFitter, bead_scores, canonical
from blurflow.psfmodel import PSFModel


def random_beads(n: int, seed: int) -> torch.Tensor:
    """Bead parameters (n, 8) in blurflow.particles.PARAMS order."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    background = (torch.randn(n, generator=g) * 5).abs() + 0.01
    return torch.stack(
        [uniform(-0.5, 0.5), uniform(-0.5, 0.5), uniform(-1, 1), uniform(-1, 1), uniform(0, 1), uniform(0, 1), uniform(1000, 20000), background], 1
    )


def accuracy(fitter: BeadFitter, truth: torch.Tensor, fit) -> dict:
    """blurflow.particles.bead_scores of the fit against the (canonical) truth."""
    t = canonical(truth).numpy()[:, 2:6]
    return bead_scores(t, fit.params[:, 2:6], fitter.scales, fitter.optics.pixel_um, fit.std[:, 2:6], fit.direction_resolved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beads", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table1", action="store_true", help="also fit Table 1's bead cases a-d")
    parser.add_argument("--psf", help="fit with this PSF model file (blurflow calibrate)")
    parser.add_argument("--true-start", action="store_true", help="also time fits that start from the true parameters (a perfect start)")
    parser.add_argument("--device", default="cpu", help="fit on this torch device (cuda: the prepared GPU check)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    psf = PSFModel.read(args.psf) if args.psf else None
    fitter = BeadFitter(Optics(), MotionScales(24, 10), 64, device=args.device, psf=psf)
    fitter.bank()
    truth = random_beads(args.beads, seed=0)
    simulator = fitter if psf is None and args.device == "cpu" else BeadFitter(Optics(), MotionScales(24, 10), 64)
    counts = simulator.simulate(truth, torch.Generator().manual_seed(1))
    fitter.fit(counts[:200])  # warm-up: the kernel boxes' operators are built when first needed
    for start in [None, truth] if args.true_start else [None]:
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fit = fitter.fit(counts, start=start)
            rates.append(args.beads / (time.perf_counter() - t0))
            row = {"beads": args.beads, "threads": args.threads, "device": args.device, "start": "search" if start is None else "truth"}
            print(json.dumps({**row, "particles_per_s": round(rates[-1], 2)}), flush=True)
        print(json.dumps({"min_per_s": round(min(rates), 2), "median_per_s": round(statistics.median(rates), 2), **accuracy(fitter, truth, fit)}))
    if args.table1:
        from blurflow.testsets import TABLE1

        for case, (motion, source) in TABLE1.items():
            if source != "beads":
                continue
            beads = truth.clone()
            beads[:, 2:6] = torch.tensor(motion)
            fit = fitter.fit(fitter.simulate(beads, torch.Generator().manual_seed(2)))
            mean = paper_sign(fit.params[:, 2:6], fit.direction_resolved).mean(0)
            error = [round(float(v), 3) for v in mean - np.array(motion)]
            row = {"case": case, "truth": motion, "fit_mean": [round(float(v), 3) for v in mean], "error": error}
            print(json.dumps({**row, "resolved": round(float(fit.direction_resolved.mean()), 2)}))


if __name__ == "__main__":
    main()
