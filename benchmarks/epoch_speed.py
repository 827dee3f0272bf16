"""Training-loop throughput (images/s) of the default configuration on in-memory batches.

Times ``blurflow.train._train_epoch`` (the loop the rule ``train`` runs: learning-rate schedule,
steps, loss bookkeeping, progress) over ``--steps`` batches of synthetic counts, after one warm-up
epoch: what the loop itself costs beside the network, with no data loading. The same private
function has the same signature since 2026-11, so ``benchmarks/side_by_side.py`` can compare it
across commits:

    python benchmarks/side_by_side.py OLD_TREE --key images_per_s -- benchmarks/epoch_speed.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from blurflow import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-px", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = train.TrainConfig(epochs=3)
    device = torch.device("cpu")
    h = args.image_px
    batches = [
        {"image": torch.poisson(torch.full((args.batch, 1, h, h), 300.0)), "target": torch.rand(args.batch, 4, h, h), "valid": torch.ones(args.batch, 1, h, h)}
        for _ in range(args.steps)
    ]

    class Data:
        steps_per_epoch = args.steps

        def validation(self) -> list:
            return batches[:1]

    model, opt, _ = train._build(cfg, device, Data())
    train._train_epoch(model, opt, batches, 0, cfg, device, 0.0, args.steps, False)
    t0 = time.perf_counter()
    train._train_epoch(model, opt, batches, 1, cfg, device, 0.0, args.steps, False)
    print(json.dumps({"images_per_s": round(args.steps * args.batch / (time.perf_counter() - t0), 1), "steps": args.steps, "batch": args.batch, "image_px": h}))


if __name__ == "__main__":
    main()
