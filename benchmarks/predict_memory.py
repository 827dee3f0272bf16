"""Peak memory and wall time of `blurflow predict` on large images, measured with /usr/bin/time -v.

A model of the default architecture (random weights: memory and speed do not depend on them) and a
uint16 camera image of each size are written to a temporary folder; `blurflow predict` runs on
each in its own process, and the maximum resident set size it reached is reported.

    python benchmarks/predict_memory.py [--sizes 4000 10000] [--threads 2] [--model models/blurflow.pt]

``--model``: measure that model file instead, read as it says (e.g. the shipped model: dihedral mean
and edge-preserving smoothing).
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

from blurflow.optics import Optics
from blurflow.train import TrainConfig


def model_file(folder: Path) -> Path:
    """A model file of the default (config.yaml) architecture with random weights."""
    from blurflow.modelfile import save_model

    cfg = TrainConfig()
    path = folder / "model.pt"
    save_model(
        cfg.build_model(),
        path,
        {"optics": Optics().to_dict(), "scales": {"lateral_scale_px": 24.0, "axial_scale_um": 10.0}, "image_px": 64, "output_smoothing_px": 12.0},
    )
    return path


def measure(model: Path, size: int, folder: Path, threads: int) -> dict:
    image = folder / f"image_{size}.tif"
    rng = np.random.default_rng(0)
    data = tifffile.memmap(image, shape=(size, size), dtype=np.uint16)
    for y in range(0, size, 1000):  # written in bands: the benchmark itself stays small
        data[y : y + 1000] = rng.poisson(200, (min(1000, size - y), size))
    data.flush()
    del data
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    run = subprocess.run(
        ["/usr/bin/time", "-v", "blurflow", "predict", str(model), str(image), "--quiet"], capture_output=True, text=True, check=False, env=env
    )
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    out = folder / f"image_{size}_flow.tif"
    return {
        "size_px": size,
        "pixels": size * size,
        "peak_rss_mb": round(peak_kb / 1024),
        "bytes_per_pixel": round(peak_kb * 1024 / size**2, 1),
        "wall_s": round(wall, 1),
        "output_mb": round(out.stat().st_size / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 10000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--model", type=Path, help="a model file to measure (default: the default architecture with random weights)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        model = args.model.resolve() if args.model else model_file(folder)
        for size in args.sizes:
            print(json.dumps(measure(model, size, folder, args.threads)), flush=True)


if __name__ == "__main__":
    main()
