"""Preview of synthesised training samples (rule training_samples)."""

from blurflow import figures, logs
from blurflow.data import ShardDataset

logs.to_file(snakemake.log[0])
figures.training_samples(ShardDataset([snakemake.input.shard])).savefig(snakemake.output.figure, dpi=100)
