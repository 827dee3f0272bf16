"""Train from config files for a set number of minutes, without Snakemake (for a lent GPU machine
that has PyTorch but not the workflow's tools): sources are built in OUTDIR/sources unless
they are there already (from the same sources config and seed: checked), then the model, its learning curve
and its checkpoint are written to OUTDIR (model.pt, training_log.csv, checkpoint.pt: a second call
resumes). The config is config.yaml, the given files over it, and train.max_minutes = MINUTES;
train.data must be online.
    python tools/gpu_train.py 6 /tmp/stage6 workflow/presets/release_deep.yaml ...
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from blurflow import config as blurflow_config
from blurflow import sources, train

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_train")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("minutes", type=float, help="training time (train.max_minutes)")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("configs", nargs="*", type=Path, help="config files over config.yaml, later ones on top")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = blurflow_config.load([ROOT / "config.yaml", *args.configs])
    config["train"]["max_minutes"] = args.minutes
    error = blurflow_config.schema_error(config)
    if error:
        sys.exit(f"gpu_train: bad config: {error}")
    if config["train"]["data"] != "online":
        sys.exit("gpu_train: needs train.data: online (images are synthesised on the training device; shards need the workflow)")
    for warning in blurflow_config.check(config):
        log.warning(warning)
    torch.set_num_threads(config["train"]["threads"])
    split_files = {}
    for split in ("train", "val"):
        path = split_files[split] = args.outdir / "sources" / f"{split}.h5"
        cfg = blurflow_config.for_sources(config, split)
        if not path.exists():
            sources.write_split(split, cfg, config["seed"], ROOT / "resources", path)
        elif sources.recorded_hash(path) != blurflow_config.config_hash(cfg, config["seed"]):
            sys.exit(f"gpu_train: {path} was built from another sources config or seed: remove it or choose another OUTDIR")
    out = args.outdir
    rows = train.run_config(
        blurflow_config.for_training(config), config["train"], [split_files["train"]], [split_files["val"]],
        out / "model.pt", out / "training_log.csv", out / "checkpoint.pt",
    )  # fmt: skip
    last = rows[-1]
    print(f"gpu_train: {last['samples']} images in {last['minutes']:.1f} min, validation R2 {last['val_r2_mean']:.3f}: wrote {out / 'model.pt'}")


if __name__ == "__main__":
    main()
