"""Synthesise one HDF5 shard of blurred, noisy images with labels (rule synthesize_shard)."""

import torch

from blurflow import logs, synthesis
from blurflow.pipeline import unflatten
from blurflow.synthesis import Setup

logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
c = unflatten(snakemake.params.items())
synthesis.write_shard(
    snakemake.output.shard,
    snakemake.input.sources,
    Setup.from_config(c),
    split=snakemake.wildcards.split,
    shard=int(snakemake.wildcards.shard),
    samples=c["synthesis"]["samples_per_shard"],
)
