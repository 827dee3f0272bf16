"""Seconds to render one online training batch (blurflow.data.OnlineData.render: PSFs, blur, noise,
validity, labels), plain and with smooth-flow ramps, and the blur alone against the blur that
gives every image the batch's largest region count (one PSF and FFT pair per slot, as before
2026-12-04), in one run.

Config files as the training run's (default: config.yaml + the stage 5 presets), sources from
``--sources`` (the rule sources' train.h5 of that config); one thread; min and median of
``--repeats`` batches.

    python benchmarks/render_batch.py --sources results/sources/train.h5 [--batch 16] [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from blurflow import config as blurflow_config
from blurflow import data, synthesis
from blurflow.config import Setup

PRESETS = ["config.yaml", "workflow/presets/release_deep.yaml"]
SETTINGS = [(0.0, 8), (0.25, 8), (0.25, 16)]  # (synthesis.smooth_flow, smooth_flow_bands)


def slot_blur(canvas: torch.Tensor, regions: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """The blur with kernels (B, N, k, k) for every image: N FFT pairs per image whatever it holds."""
    b, c, _ = canvas.shape
    n, k = kernels.shape[1], kernels.shape[-1]
    padded = torch.zeros(b, n, c, c, dtype=kernels.dtype)
    padded[..., :k, :k] = kernels
    padded = torch.roll(padded, shifts=(-(k // 2), -(k // 2)), dims=(-2, -1))
    masks = regions[:, None] == torch.arange(n)[None, :, None, None]
    return torch.fft.irfft2((torch.fft.rfft2(masks * canvas[:, None]) * torch.fft.rfft2(padded)).sum(1), s=(c, c))


def timed(fn, inputs: list) -> dict:
    """Min and median seconds of ``fn(x)`` over the inputs."""
    times = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return {"min_s": round(min(times), 4), "median_s": round(statistics.median(times), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", required=True)
    ap.add_argument("--config", nargs="+", default=PRESETS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = blurflow_config.load(args.config)
    for share, bands in SETTINGS:
        config = blurflow_config.overlay(base, {"synthesis": {"smooth_flow": share, "smooth_flow_bands": bands}})
        online = data.OnlineData(args.sources, args.sources, Setup.from_config(config), args.batch, args.batch)
        keys = synthesis.shard_keys(config["seed"], "train", 0, args.batch * args.repeats)
        draws = [online.drawer.draw(synthesis.sample_rng(k)) for k in keys]
        batches = [draws[i * args.batch : (i + 1) * args.batch] for i in range(args.repeats)]
        online.render(batches[0])  # PSF tables built before the clock starts
        row = {"smooth_flow": share, "bands": bands, "batch": args.batch, "render": timed(online.render, batches)}
        syn = online.renderer
        blur_inputs = []
        for batch in batches:
            counts = [len(d["params"]) for d in batch]
            kernels = syn.psf(torch.from_numpy(np.concatenate([d["params"] for d in batch])))
            slots = torch.zeros(len(batch), max(counts), *kernels.shape[1:])
            slots[torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(counts)), torch.cat([torch.arange(n) for n in counts])] = kernels
            canvas = torch.from_numpy(np.stack([np.pad(d["sharp"], (syn.canvas_px - syn.cfg.image_px) // 2, mode="reflect") for d in batch]))
            regions = torch.from_numpy(np.stack([d["regions"] for d in batch]).astype(np.int64))
            blur_inputs.append((canvas, regions, kernels, torch.tensor(counts), slots))
        row["blur_per_region"] = timed(lambda x: synthesis.blur(*x[:4]), blur_inputs)
        row["blur_per_slot"] = timed(lambda x: slot_blur(x[0], x[1], x[4]), blur_inputs)
        row["slot_over_region_median"] = round(row["blur_per_slot"]["median_s"] / row["blur_per_region"]["median_s"], 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
