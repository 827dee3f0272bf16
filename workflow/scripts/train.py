"""Train the network on the shards; resumes from the checkpoint of an interrupted run (rule train)."""

import torch

from blurflow import logs, train
from blurflow.synthesis import config_hash

logs.to_file(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
c = snakemake.params.config
cfg = train.TrainConfig.from_config(c["train"], seed=c["seed"])
meta = {
    "optics": c["optics"],
    "scales": {k: c["motion"][k] for k in ("lateral_scale_px", "axial_scale_um")},
    "image_px": c["synthesis"]["image_px"],
    "config_hash": config_hash(c["optics"], c["motion"], c["synthesis"], c["train"], c["seed"]),
}
train.train(snakemake.input.train, snakemake.input.val, snakemake.output.model, snakemake.output.log, snakemake.params.checkpoint, cfg, meta)
