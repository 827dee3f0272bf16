"""The online training step on whatever device runs it: op counts, host reads, graph breaks, payload, images/s.

One step is what ``train.data: online`` runs: the batch's draws on the host (numbers only), the
renderer and the camera on the device (blurflow.synthesis), forward, loss, backward and the RAdam
step (blurflow.train.train_step). For each batch size it reports

- ``aten_ops``: aten operators dispatched per step (the same for every batch size when the step
  has static shapes), and ``host_reads``: ``_local_scalar_dense`` calls (values read back to the
  host: a device sync on a GPU), the optimiser's counted apart (on the CPU RAdam keeps its step
  count on the host; on CUDA training makes it capturable, so it reads nothing);
- images/s of synthesis alone, the network alone (one batch repeated) and both (median of
  ``--repeats`` timings of ``--steps`` steps each, after two warm-up steps);

and once: the renderer's graph breaks under ``torch._dynamo.explain`` and the draws' bytes per
image (pickled, what a worker process would send). Config files as for the workflow (config.yaml,
then the given files on top); ``--image-px`` overrides the image size.

    python benchmarks/gpu_step.py [--config config.yaml PRESET ...] [--batches 64 256 1024]
        [--image-px 32] [--steps 5] [--repeats 3] [--compile auto] [--threads 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blurflow import sources, train
from blurflow.data import OnlineData
from blurflow.devices import compile_enabled, pick_device
from blurflow.schema import load
from blurflow.synthesis import Setup, Synthesizer

ROOT = Path(__file__).resolve().parents[1]


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while it is active (autograd's backward included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def counts(data: OnlineData, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: train.TrainConfig, device: torch.device) -> dict:
    """Ops and host reads of one step (the optimiser's step counted apart)."""
    with OpCounter() as step:
        batch = data.render(data.renderer, data.draws(0))
        image, target, valid = (batch[k] for k in ("image", "target", "valid"))
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            out = model(image.contiguous(memory_format=torch.channels_last))
        loss = train.loss_fn(out.float(), target, valid, cfg.loss, cfg.encoding, cfg.gamma, cfg.component_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with OpCounter() as optimiser:
        opt.step()
    return {
        "aten_ops": sum(step.ops.values()) + sum(optimiser.ops.values()),
        "host_reads": step.ops["aten._local_scalar_dense"],
        "optimizer_host_reads": optimiser.ops["aten._local_scalar_dense"],
    }


def timed(fn, steps: int, repeats: int, images: int, device: torch.device) -> float:
    """Median images/s of ``repeats`` timings of ``steps`` calls, after two warm-up calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(2):
        fn(i)
    rates = []
    for r in range(repeats):
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            fn(2 + r * steps + i)
        sync()
        rates.append(steps * images / (time.perf_counter() - t0))
    return statistics.median(rates)


def measure(src: Path, setup: Setup, train_cfg: dict, seed: int, batch: int, device: torch.device, args: argparse.Namespace) -> dict:
    """One batch size's row: counts (unless ``--no-counts``) and images/s."""
    cfg = train.TrainConfig.from_config(train_cfg, seed=seed)
    compiled = compile_enabled(cfg.compile, device)
    data = OnlineData(src, src, setup, batch, batch * 10, val_samples=(1, 16), device=device, compile=compiled)
    model = cfg.build_model().to(device, memory_format=torch.channels_last)
    opt = train.make_optimizer(model, cfg, device)
    row = {"batch": batch, **(counts(data, model, opt, cfg, device) if args.counts else {})}
    stepper = torch.compile(model) if compiled else model
    fixed = data.render(data.renderer, data.draws(0))

    def synthesis(s: int) -> dict:
        return data.render(data.renderer, data.draws(s))

    row["synthesis_images_per_s"] = round(timed(synthesis, args.steps, args.repeats, batch, device), 1)
    row["network_images_per_s"] = round(timed(lambda s: train.train_step(stepper, opt, fixed, cfg, device), args.steps, args.repeats, batch, device), 1)
    row["step_images_per_s"] = round(timed(lambda s: train.train_step(stepper, opt, synthesis(s), cfg, device), args.steps, args.repeats, batch, device), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=[str(ROOT / "config.yaml")], help="config files, later ones on top")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--image-px", type=int, default=None, help="override synthesis.image_px")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", default=None, choices=["auto", "true", "false"], help="override train.compile")
    ap.add_argument("--device", default=None, help="override train.device")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--counts", action=argparse.BooleanOptionalAction, default=True, help="count ops (slow for large batches)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = load(args.config)
    if args.image_px:
        config["synthesis"]["image_px"] = args.image_px
        config["sources"]["tile_px"] = max(config["sources"]["tile_px"], args.image_px)
    t = config["train"]
    if args.device:
        t["device"] = args.device
    if args.compile:
        t["compile"] = {"true": True, "false": False}.get(args.compile, args.compile)
    device = pick_device(t["device"])
    setup = Setup.from_config(config)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{args.threads}",
        "image_px": setup.synthesis.image_px,
        "compile": t["compile"],
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "sources.h5"
        sources.write_sources(sources.skimage_images(sources.SKIMAGE_TRAIN), src, config["sources"]["tile_px"], "skimage")
        syn = Synthesizer(src, setup, device, static=True)
        explained = torch._dynamo.explain(syn.renderer)(syn.tensors(syn.draws.step(4, (0,))))
        results["renderer_graph_breaks"] = explained.graph_break_count
        results["draw_bytes_per_image"] = round(len(pickle.dumps(syn.draws.step(256, (0,)))) / 256, 1)
        print(json.dumps({k: v for k, v in results.items() if k != "rows"}), flush=True)
        for batch in args.batches:
            results["rows"].append(measure(src, setup, t, config["seed"], batch, device, args))
            print(json.dumps(results["rows"][-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
