"""Choose a model file's readout again on its validation data, among the readouts training tries
now (blurflow.train.READOUTS: dihedral mean or not x Gaussian and edge-preserving smoothing
widths), and write the choice and every readout's scores into the model file (atomically). For a
model trained before a readout was added, e.g. the shipped one (docs/model.md):

    snakemake --cores all results/sources/train.h5 results/sources/val.h5 --configfile workflow/presets/release/stage4.yaml
    python tools/choose_readout.py models/blurflow.pt --config config.yaml workflow/presets/release/stage4.yaml

The validation data are those of the config (train.data online: synthesised from the validation
sources with the config's seed, as the training run validated; shards: the validation shards).
"""

from __future__ import annotations

import argparse
import logging

import torch

from blurflow import data, train
from blurflow.devices import pick_device
from blurflow.modelfile import load_model, save_model
from blurflow.schema import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--config", nargs="+", default=["config.yaml"], help="config files, later ones overlay earlier ones")
    parser.add_argument("--train", nargs="+", default=["results/sources/train.h5"], help="training sources file (online) or shards")
    parser.add_argument("--val", nargs="+", default=["results/sources/val.h5"], help="validation sources file (online) or shards")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    config = load(args.config)
    cfg = train.TrainConfig.from_config(config["train"], seed=config["seed"])
    device = pick_device(cfg.device)
    model, meta = load_model(args.model, device)
    batches = data.from_config(config, args.train, args.val, device)
    _, scores = train.evaluate_loss(model, batches.validation(), cfg, device, train.READOUTS)
    save_model(model.cpu(), args.model, {**meta, **train.readout_meta(scores)})


if __name__ == "__main__":
    main()
