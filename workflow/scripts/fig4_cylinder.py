"""Paper Fig. 4 from the cylinder test set and its predictions (rule fig4_cylinder)."""

import h5py

from blurflow import figures, logs
from blurflow.data import ShardDataset

logs.job(snakemake)
with h5py.File(snakemake.input.predictions) as f:
    pred = f["pred"][()].astype("float32")
figures.cylinder_result(ShardDataset([snakemake.input.testset]), pred).savefig(snakemake.output.figure, dpi=110)
