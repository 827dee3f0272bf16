"""Preview of synthesised training samples (rule training_samples)."""

from blurflow import figures, logs
from blurflow.data import ShardDataset

logs.job(snakemake)
figures.training_samples(ShardDataset([snakemake.input.shard])).savefig(snakemake.output.figure, dpi=100)
