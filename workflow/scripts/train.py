"""Train the network on shards or on-the-fly synthesis; resumes from the checkpoint of an interrupted run (rules train, study_train)."""

import torch

from blurflow import logs, train
from blurflow.pipeline import unflatten

log = logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
depends = unflatten(snakemake.params.items())  # what the model depends on (blurflow.pipeline.for_training)
out = snakemake.output
rows = train.run_config(depends, snakemake.config["train"], snakemake.input.train, snakemake.input.val, out.model, out.log, snakemake.params.checkpoint)
last = rows[-1]
log.info("trained %d images in %.1f min: validation R2 %.3f; wrote %s", last["samples"], last["minutes"], last["val_r2_mean"], out.model)
