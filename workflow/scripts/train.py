"""Train the network on shards or on-the-fly synthesis; resumes from the checkpoint of an interrupted run (rules train, study_train)."""

import torch

from blurflow import data, logs, train
from blurflow.config import RUNTIME_KEYS, config_hash, pick_device, unflatten

log = logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
depends = unflatten(snakemake.params.items())  # what the model depends on (blurflow.config.for_training)
c = {**depends, "train": {**depends["train"], **{k: snakemake.config["train"][k] for k in RUNTIME_KEYS}}}  # + speed-only keys
cfg = train.TrainConfig.from_config(c["train"], seed=c["seed"])
device = pick_device(cfg.device)
data_key = config_hash(c["optics"], c["motion"], c["synthesis"], c["sources"], c["seed"])
meta = {
    "optics": c["optics"],
    "scales": {k: c["motion"][k] for k in ("lateral_scale_px", "axial_scale_um")},
    "image_px": c["synthesis"]["image_px"],
    "config_hash": config_hash(depends),
    "data_key": data_key,
}
batches = data.from_config(c, snakemake.input.train, snakemake.input.val, device)
rows = train.train(batches, snakemake.output.model, snakemake.output.log, snakemake.params.checkpoint, cfg, meta)
last = rows[-1]
log.info("trained %d images in %.1f min: validation R2 %.3f; wrote %s", last["samples"], last["minutes"], last["val_r2_mean"], snakemake.output.model)
