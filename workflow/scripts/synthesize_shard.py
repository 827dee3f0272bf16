"""Synthesise one HDF5 shard of blurred, noisy images with labels (rule synthesize_shard)."""

import torch

from blurflow import logs, synthesis
from blurflow.config import unflatten
from blurflow.optics import MotionScales, Optics

logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
c = unflatten(snakemake.params.items())
synthesis.write_shard(
    snakemake.output.shard,
    snakemake.input.sources,
    Optics.from_config(c["optics"]),
    MotionScales.from_config(c["motion"]),
    c["motion"]["kernel_px"],
    synthesis.SynthesisConfig.from_config(c["synthesis"]),
    seed=c["seed"],
    split=snakemake.wildcards.split,
    shard=int(snakemake.wildcards.shard),
    samples=c["synthesis"]["samples_per_shard"],
)
