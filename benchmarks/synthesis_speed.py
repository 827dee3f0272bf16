"""Synthesis throughput: images/s for 224 x 224 images with 2 regions (``--regions``), one shard job per core.

The schema's default optics, blur scales and kernel (L 24 px, A 10 um, 64 px kernels: what the
default run synthesises); numbers recorded before 2026-11-30 were measured at L 8 px, 48 px kernels.

Runs ``--jobs`` shard writers in parallel processes (one thread each, as `snakemake --cores N`
schedules synthesize_shard jobs) and reports the aggregate rate, plus where the time goes in one
writer (cProfile, cumulative seconds per stage).

    python benchmarks/synthesis_speed.py [--jobs 2] [--images 256] [--image-px 224] [--regions 2 2]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from blurflow import sources, synthesis
from blurflow.synthesis import Setup

STAGES = {  # (module, function) of blurflow -> stage
    ("synthesis", "draw"): "draws (numpy)",
    ("synthesis", "crop"): "crops",
    ("synthesis", "voronoi"): "region masks",
    ("optics", "_kernels"): "motion PSFs",
    ("synthesis", "blur"): "FFT blur",
    ("synthesis", "validity"): "validity map",
    ("synthesis", "forward"): "renderer (crops, masks, PSFs, blur, validity)",
    ("camera", "forward"): "Poisson + background noise",
}


def writer(args: tuple) -> float:
    src, out, image_px, images, shard, regions = args
    torch.set_num_threads(1)
    setup = Setup.from_config({}).with_synthesis(image_px=image_px, regions=regions)  # the schema's defaults otherwise
    t0 = time.perf_counter()
    synthesis.write_shard(out, src, setup, "train", shard, images, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--images", type=int, default=256, help="images per job")
    ap.add_argument("--image-px", type=int, default=224)
    ap.add_argument("--regions", type=int, nargs=2, default=(2, 2), metavar=("MIN", "MAX"), help="regions per image (the default run: 1 2)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "sources.h5"
        sources.write_sources(sources.skimage_images(sources.SKIMAGE_TRAIN), src, 256, "skimage")
        regions = tuple(args.regions)
        jobs = [(src, Path(tmp) / f"shard{i}.h5", args.image_px, args.images, i, regions) for i in range(args.jobs)]
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.jobs) as pool:
            per_job = list(pool.map(writer, jobs))
        wall = time.perf_counter() - t0
        shard_mb = (Path(tmp) / "shard0.h5").stat().st_size / 2**20

        prof = cProfile.Profile()
        prof.runcall(writer, (src, Path(tmp) / "profiled.h5", args.image_px, args.images, 99, regions))
        stats = pstats.Stats(prof).stats
        total = next(v[3] for k, v in stats.items() if k[2] == "write_shard")
        stages = {}
        for (file, _, name), v in stats.items():
            for (module, function), stage in STAGES.items():
                if name == function and file.endswith(f"blurflow/{module}.py"):
                    stages[stage] = round(v[3] / total, 3)
    result = {
        "jobs": args.jobs,
        "image_px": args.image_px,
        "regions": list(regions),
        "images": args.jobs * args.images,
        "wall_s": round(wall, 2),
        "images_per_s": round(args.jobs * args.images / wall, 1),
        "images_per_s_per_job": [round(args.images / s, 1) for s in per_job],
        "hours_for_400k": round(400_000 / (args.jobs * args.images / wall) / 3600, 2),
        "shard_mb_per_1000_images": round(shard_mb / args.images * 1000, 1),
        "time_fraction_single_thread": stages,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
