"""Training throughput (images/s: forward, loss, backward, RAdam step: blurflow.train.train_step) of the U-Net.

Synthetic counts, so only the network is timed (data loading runs in workers and is measured by
synthesis_speed.py). Reports the hours that the paper's ~20M sample passes (400k images x 50
epochs) would take at the measured rate.

    python benchmarks/train_speed.py [--device cpu] [--threads 2] [--sizes 128 224] [--batch 16]
                                     [--archs paper laptop] [--repeats 3]

Architectures (``--archs``): ``paper`` (encoder depth 5, decoder 256-128-64-32-16), ``laptop`` (the
default config, blurflow.train.TrainConfig), and the alternatives compared in docs/experiments.md:
``depth4`` (depth 4, decoder 128-64-32-16), ``depth4-stem1`` (its first convolution at stride 1),
``depth3`` (decoder 64-32-16), ``depth4-unshuffle2`` and ``depth3-unshuffle2`` (2 x 2 pixels to 4
channels, U-Net at half resolution).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import replace

import torch

from blurflow.model import PAPER_DECODER, FlowNet
from blurflow.train import TrainConfig, make_optimizer, train_step

PAPER_SAMPLES = 400_000 * 50
D4, D3 = {"depth": 4, "decoder_channels": (128, 64, 32, 16)}, {"depth": 3, "decoder_channels": (64, 32, 16)}
LAPTOP = TrainConfig()
ARCHS = {  # FlowNet arguments
    "paper": {"depth": 5, "decoder_channels": PAPER_DECODER},
    "laptop": {"depth": LAPTOP.encoder_depth, "decoder_channels": LAPTOP.decoder_channels, "stem_stride": LAPTOP.stem_stride, "unshuffle": LAPTOP.unshuffle},
    "depth4": D4,
    "depth4-stem1": {**D4, "stem_stride": 1},
    "depth3": D3,
    "depth4-unshuffle2": {**D4, "unshuffle": 2},
    "depth3-unshuffle2": {**D3, "unshuffle": 2},
}


def rates(encoder: str, arch: str, size: int, batch: int, device: torch.device, steps: int, repeats: int, amp: bool) -> list[float]:
    """Images/s of ``repeats`` timings of ``steps`` training steps each, after two warm-up steps."""
    model = FlowNet(encoder, **ARCHS[arch]).to(device, memory_format=torch.channels_last)
    cfg = replace(LAPTOP, amp=amp, lr=1e-3)
    opt = make_optimizer(model, cfg, device)
    data = {
        "image": torch.poisson(torch.full((batch, 1, size, size), 300.0)).to(device),
        "target": torch.rand(batch, 4, size, size, device=device),
        "valid": torch.ones(batch, 1, size, size, device=device),
    }

    def step() -> None:
        train_step(model, opt, data, cfg, device)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t0)

    for _ in range(2):
        step()
    return [timed() for _ in range(repeats)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--encoders", nargs="+", default=["resnet18", "resnet34"])
    ap.add_argument("--archs", nargs="+", choices=sorted(ARCHS), default=["paper"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timings per case; min and median are reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    rows = []
    for encoder, arch, size in itertools.product(args.encoders, args.archs, args.sizes):
        r = rates(encoder, arch, size, args.batch, device, args.steps, args.repeats, amp)
        median = statistics.median(r)
        rows.append(
            {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads}",
                "encoder": encoder,
                "arch": arch,
                "image_px": size,
                "batch": args.batch,
                "amp_bf16": amp,
                "images_per_s_median": round(median, 1),
                "images_per_s_min": round(min(r), 1),
                "hours_for_paper_20M_samples": round(PAPER_SAMPLES / median / 3600, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
