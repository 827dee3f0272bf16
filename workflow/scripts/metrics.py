"""R^2 and the other scores of a test set, with a scatter plot (rule metrics)."""

import h5py

from blurflow import evaluate, figures, logs
from blurflow.data import ShardDataset
from blurflow.testsets import PAPER_R2

logs.to_file(snakemake.log[0])
name = snakemake.wildcards.testset
metrics = evaluate.evaluate_testset(snakemake.input.testset, snakemake.input.predictions, name, PAPER_R2.get(name))
evaluate.write_metrics(metrics, snakemake.output.json, snakemake.output.csv)
with h5py.File(snakemake.input.predictions) as f:
    pred = f["pred"][()].astype("float32")
fig = figures.scatter(ShardDataset([snakemake.input.testset]), pred, metrics["r2_pearson"])
fig.savefig(snakemake.output.scatter, dpi=110)
