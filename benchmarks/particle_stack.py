"""`blurflow particles` on a time-lapse stack: wall time, beads/s and the share of beads found.

A TIFF stack of ``--frames`` frames of ``--size`` px with ``--beads`` beads each: path midpoints at
least 8 px apart where a fit window fits (blurflow.testsets.dense_positions), motions uniform in
the training ranges (v1, v2 in [-1, 1], v3, z0 in [0, 1]), 2,000-20,000 photons, each bead the
motion PSF of the default optics (blurflow.particles.BeadFitter.expected: the pipeline's test-set
renderer holds a region per bead and needs beads x pixels of memory, 20 GB here), a background of
5 counts, Poisson counts as uint16. Then one run of the command line (``blurflow particles STACK
--config CONFIG``: one kernel bank, every frame detected and fitted in one batch, neighbours
together) timed from the call to the written table, start-up included. A bead is found when a
row of the table that is not flagged and converged lies within 3 px of its path midpoint. Prints
one JSON line.

    python benchmarks/particle_stack.py [--frames 20] [--size 1024] [--beads 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
import yaml

from blurflow import cli, testsets
from blurflow.particles import BeadFitter
from blurflow.synthesis import Setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--beads", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = Setup.from_config({})
    window = testsets.dense_window(args.size)
    fitter = BeadFitter(setup.optics, setup.scales, window)
    rng = np.random.default_rng(0)
    positions = [testsets.dense_positions(args.size, args.beads, rng) for _ in range(args.frames)]
    stack = np.full((args.frames, args.size, args.size), 5.0, np.float32)
    for frame, where in zip(stack, positions):
        n = len(where)
        theta = np.column_stack(
            [rng.uniform(-0.5, 0.5, (n, 2)), rng.uniform(-1, 1, (n, 2)), rng.uniform(0, 1, (n, 2)), rng.uniform(2000, 20000, n), np.zeros(n)]
        )
        kernels = fitter.expected(torch.from_numpy(theta).float()).numpy()
        for (y, x), kernel in zip(where, kernels):
            frame[y - window // 2 : y + window // 2, x - window // 2 : x + window // 2] += kernel
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tifffile.imwrite(folder / "stack.tif", np.minimum(rng.poisson(stack), 65535).astype(np.uint16))
        rows, cols = [p[:, 0] for p in positions], [p[:, 1] for p in positions]
        (folder / "config.yaml").write_text(yaml.safe_dump({}))
        start = time.perf_counter()
        status = cli.main(["particles", str(folder / "stack.tif"), "--config", str(folder / "config.yaml"), "--window", str(window), "--quiet"])
        seconds = time.perf_counter() - start
        table = pd.read_csv(folder / "stack_particles.csv")
    good = table[table["flag"].isna() & table["converged"].fillna(False).astype(bool)]
    found = 0
    for frame, (r, c) in enumerate(zip(rows, cols)):
        fits = good[good["frame"] == frame][["y", "x"]].to_numpy()
        if len(fits):
            distance = np.hypot(*(fits[None] - np.stack([r, c], 1)[:, None]).transpose(2, 0, 1))
            found += int((distance.min(1) < 3).sum())
    beads = sum(len(r) for r in rows)
    print(json.dumps({
        "status": status, "frames": args.frames, "size_px": args.size, "beads": beads, "rows": len(table), "found": round(found / beads, 3),
        "seconds": round(seconds, 1), "beads_per_s": round(beads / seconds, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
