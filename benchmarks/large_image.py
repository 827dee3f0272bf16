"""Peak memory and wall time of `blurflow predict` and `blurflow particles` on one large compressed
TIFF (20,000 x 20,000 px by default; target: within 2 GB each), measured with /usr/bin/time -v.

The image (uint16 camera counts: a background of 20, a bead streak about every 200 px, Poisson
noise) is written as deflate-compressed 512 px tiles, tile by tile, so that the benchmark itself
stays small. Each command runs in its own process: predict with a model of the default architecture
and random weights (memory does not depend on the weights), or with ``--model`` read as its file
says; particles with config.yaml's optics.

    python benchmarks/large_image.py [--size 20000] [--height H] [--threads 2] [--model models/blurflow.pt]
        [--commands predict particles] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from blurflow.optics import MotionScales, Optics

TILE = 512  # px: the TIFF's tiles
BEADS_PER_TILE = 6


def bead_tiles(height: int, width: int, seed: int = 0):
    """The image's 512 px tiles, row by row (uint16): Poisson counts of a background of 20 and
    BEADS_PER_TILE bead streaks of random motion inside each tile."""
    from blurflow.particles import BeadFitter

    fitter = BeadFitter(Optics(), MotionScales.from_config({}), 64)
    rng = np.random.default_rng(seed)
    theta = torch.tensor([[0, 0, *rng.uniform(-0.6, 0.6, 2), *rng.uniform(0, 0.6, 2), 5000.0, 0.0] for _ in range(32)], dtype=torch.float32)
    streaks = fitter.expected(theta).numpy()
    for ty in range(0, height, TILE):
        for tx in range(0, width, TILE):
            mu = np.full((TILE, TILE), 20.0, np.float32)
            h, w = min(TILE, height - ty), min(TILE, width - tx)
            if min(h, w) > 64:
                for y, x, k in zip(rng.integers(0, h - 64, BEADS_PER_TILE), rng.integers(0, w - 64, BEADS_PER_TILE), rng.integers(0, 32, BEADS_PER_TILE)):
                    mu[y : y + 64, x : x + 64] += streaks[k]
            yield rng.poisson(mu).astype(np.uint16)


def run(command: list[str], threads: int) -> tuple[float, float, str]:
    """(peak resident memory in MB, wall time in s, stderr) of ``command`` under /usr/bin/time -v."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 1024, wall, done.stderr


def main() -> None:
    from predict_memory import model_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000, help="image width (and height) in px")
    parser.add_argument("--height", type=int, help="image height in px (default: --size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="predict with this model file (default: the default architecture, random weights)")
    parser.add_argument("--commands", nargs="+", default=["predict", "particles"], choices=["predict", "particles"])
    parser.add_argument("--dir", help="working folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    height, width = args.height or args.size, args.size
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        image = folder / "large.tif"
        t0 = time.perf_counter()
        tifffile.imwrite(image, bead_tiles(height, width), shape=(height, width), dtype=np.uint16, tile=(TILE, TILE), compression="zlib")
        written = time.perf_counter() - t0
        model = args.model or model_file(folder)
        for command in args.commands:
            line = ["blurflow", command, *([str(model)] if command == "predict" else []), str(image), "--quiet"]
            peak, wall, _ = run(line, args.threads)
            out = folder / ("large_flow.tif" if command == "predict" else "large_particles.csv")
            result = {
                "command": command, "height_px": height, "width_px": width, "file_mb": round(image.stat().st_size / 2**20),
                "written_s": round(written, 1), "peak_rss_mb": round(peak), "wall_s": round(wall, 1), "threads": args.threads,
                "model": str(args.model or "default architecture, random weights") if command == "predict" else None,
                "output_mb": round(out.stat().st_size / 2**20),
            }  # fmt: skip
            if command == "particles":
                result["rows"] = len(out.read_text().splitlines()) - 1
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
