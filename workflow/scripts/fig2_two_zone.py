"""Paper Fig. 2 from the two-zone test set and its predictions (rule fig2_two_zone)."""

import h5py

from blurflow import figures, logs
from blurflow.data import ShardDataset

logs.job(snakemake)
with h5py.File(snakemake.input.predictions) as f:
    pred = f["pred"][:4].astype("float32")
figures.two_zone_examples(ShardDataset([snakemake.input.testset]), pred).savefig(snakemake.output.figure, dpi=110)
