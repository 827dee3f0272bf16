"""The same test images drawn by the per-image renderer (commits before 2c73a92) and rendered by
this one: what the batched renderer changes, with the draws held fixed.

For every two-zone or cylinder set in OLD_SETS (written by tools/validation_sets.py with the
old tree's code), the old tree (a git worktree, OLD) replays its test-set writer's per-image draws
(the crop, region map, motions and camera of each image, from the same seed keys) into an .npz;
this tree renders those very draws (blurflow.synthesis.Synthesizer.batch with the crops and region
maps given) with its own camera noise into NEW_SETS, under the same file names, so that
``tools/validation_sets.py MODEL --sets NEW_SETS`` scores a model on them. Only the noise
draws (one per batch instead of one per image) and float rounding differ.

    python benchmarks/renderer_parity.py /tmp/old OLD_SETS NEW_SETS --sources results/sources/val.h5 \
        --config config.yaml workflow/presets/release/stage1.yaml
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from blurflow import synthesis, testsets
from blurflow.schema import load
from blurflow.synthesis import Setup

REPLAY = """
import json, sys
import h5py, numpy as np
from blurflow import testsets
from blurflow.schema import load
from blurflow.synthesis import Setup
from blurflow.synthesis import sample_rng
path, sources, out = sys.argv[1:4]
setup = Setup.from_config(load(sys.argv[4:]))
with h5py.File(path) as f:
    attrs = dict(f.attrs)
    n, image_px = f["image"].shape[0], f["image"].shape[-1]
kind = attrs["testset"]
syn = testsets._synthesizer(sources, setup, image_px, **({"v3_max": float(attrs["speed"])} if kind == "cylinder" else {}))
rows = {"sharp": [], "regions": [], "params": [], "photons": [], "quantum_efficiency": [], "background_sigma": []}
for i in range(n):
    rng = sample_rng((setup.seed, testsets.TESTSET_KEYS[kind], i))
    rows["sharp"].append(syn.crop(rng))
    if kind == "two_zone":
        rows["regions"].append(testsets.straight_split(syn.canvas_px, rng))
        rows["params"].append(syn.motions(2, rng))
    cam = syn.camera_draws(rng)
    for k in ("photons", "quantum_efficiency", "background_sigma"):
        rows[k].append(cam[k])
np.savez(out, **{k: np.array(v) for k, v in rows.items() if v})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path, help="the old tree (its src/ has the per-image renderer)")
    ap.add_argument("old_sets", type=Path)
    ap.add_argument("new_sets", type=Path)
    ap.add_argument("--sources", type=Path, required=True, help="the validation sources the old sets were built from")
    ap.add_argument("--config", nargs="+", default=["config.yaml"])
    args = ap.parse_args()
    config = load(args.config)
    setup = Setup.from_config(config)
    args.new_sets.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.old_sets.glob("*.h5")):
        with h5py.File(path) as f:
            if "image" not in f:  # a sources file
                continue
            kind, n = f.attrs.get("testset"), f["image"].shape[0]
            image_px = f["image"].shape[-1]
            attrs = dict(f.attrs)
        if kind not in ("two_zone", "cylinder"):
            continue
        name = path.stem
        sources = args.sources if name in ("two_zone", "cylinder") else args.old_sets / ("sources_" + name.replace("two_zone_", "") + ".h5")
        replay = args.new_sets / f"{name}.draws.npz"
        env = {**os.environ, "PYTHONPATH": str(args.old / "src")}
        subprocess.run([sys.executable, "-c", REPLAY, str(path), str(sources), str(replay), *args.config], env=env, check=True)
        old = dict(np.load(replay))
        syn = testsets._synthesizer(
            sources, setup, image_px, **({"v3_max": float(attrs["speed"]), "speed_max": float(attrs["speed"])} if kind == "cylinder" else {})
        )
        if kind == "cylinder":
            bands = min(image_px, 255)
            old["params"] = np.broadcast_to(testsets.cylinder_params(bands, attrs["speed"], attrs["z0"], attrs["direction_deg"]), (n, bands, 4))
            old["regions"] = np.broadcast_to(testsets.row_regions(syn.canvas_px, image_px, bands), (n, syn.canvas_px, syn.canvas_px))
        size = 1 if kind == "cylinder" else synthesis.RENDER_BATCH

        def render(b: int, k: int, old=old, syn=syn, size=size) -> dict:
            sl = slice(b * size, b * size + k)
            draws = {
                "params": np.array(old["params"][sl], np.float32),
                **{c: old[c][sl].astype(np.float32) for c in synthesis.CAMERA},
                "noise_seed": np.int64(b),
            }
            given = {k2: torch.from_numpy(np.array(old[k2][sl])) for k2 in ("sharp", "regions")}
            return syn.batch(draws, sharp=given["sharp"].float(), regions=given["regions"].long(), check=True)

        keep = {k: v for k, v in attrs.items() if k not in synthesis.describe(syn)}
        synthesis.write_samples(args.new_sets / path.name, render, n, old["params"].shape[1], {**synthesis.describe(syn), **keep}, batch=size, progress=False)
        print(f"{name}: {n} images re-rendered", flush=True)


if __name__ == "__main__":
    main()
