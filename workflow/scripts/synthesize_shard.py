"""Synthesise one HDF5 shard of blurred, noisy images with labels (rule synthesize_shard)."""

import torch

from blurflow import logs, synthesis
from blurflow.optics import MotionScales, Optics

logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
p = snakemake.params
synthesis.write_shard(
    snakemake.output.shard,
    snakemake.input.sources,
    Optics.from_config(p.optics),
    MotionScales.from_config(p.motion),
    p.motion["kernel_px"],
    synthesis.SynthesisConfig.from_config(p.synthesis),
    seed=p.seed,
    split=snakemake.wildcards.split,
    shard=int(snakemake.wildcards.shard),
    samples=p.synthesis["samples_per_shard"],
)
