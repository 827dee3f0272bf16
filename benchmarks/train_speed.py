"""Training throughput (images/s: forward, loss, backward, RAdam step) of the U-Net.

Synthetic counts, so only the network is timed (data loading runs in workers and is measured by
synthesis_speed.py). Reports the hours that the paper's ~20M sample passes (400k images x 50
epochs) would take at the measured rate.

    python benchmarks/train_speed.py [--device cpu] [--threads 2] [--sizes 128 224] [--batch 16]
                                     [--archs paper laptop]

Architectures: ``paper`` (encoder depth 5, decoder 256-128-64-32-16) and ``laptop`` (the default
config: depth 4, decoder 128-64-32-16).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from blurflow.model import PAPER_DECODER, FlowNet, loss_fn
from blurflow.train import TrainConfig

PAPER_SAMPLES = 400_000 * 50
ARCHS = {"paper": (5, PAPER_DECODER), "laptop": (TrainConfig.encoder_depth, TrainConfig.decoder_channels)}


def rate(encoder: str, arch: str, size: int, batch: int, device: torch.device, steps: int, amp: bool) -> float:
    model = FlowNet(encoder, depth=ARCHS[arch][0], decoder_channels=ARCHS[arch][1]).to(device, memory_format=torch.channels_last)
    opt = torch.optim.RAdam(model.parameters(), lr=1e-3)
    image = torch.poisson(torch.full((batch, 1, size, size), 300.0)).to(device)
    target = torch.rand(batch, 4, size, size, device=device)
    valid = torch.ones(batch, 1, size, size, device=device)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out = model(image)
        loss = loss_fn(out.float(), target, valid, "ours", "doubled_angle")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--encoders", nargs="+", default=["resnet18", "resnet34"])
    ap.add_argument("--archs", nargs="+", choices=sorted(ARCHS), default=["paper"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    rows = []
    for encoder, arch, size in itertools.product(args.encoders, args.archs, args.sizes):
        r = rate(encoder, arch, size, args.batch, device, args.steps, amp)
        rows.append(
            {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads}",
                "encoder": encoder,
                "arch": arch,
                "image_px": size,
                "batch": args.batch,
                "amp_bf16": amp,
                "images_per_s": round(r, 1),
                "hours_for_paper_20M_samples": round(PAPER_SAMPLES / r / 3600, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
