"""R^2 and the other scores of a test set, with a scatter plot (rule metrics)."""

import h5py

from blurflow import evaluate, figures, logs
from blurflow.data import ShardDataset
from blurflow.testsets import PAPER_R2

log = logs.job(snakemake)
name = snakemake.wildcards.testset
metrics = evaluate.evaluate_testset(snakemake.input.testset, snakemake.input.predictions, name, PAPER_R2.get(name))
evaluate.write_metrics(metrics, snakemake.output.json, snakemake.output.csv)
r2 = metrics["r2_pearson"]
log.info(
    "%s: %d images, %d valid pixels, R2 %.3f (%s; paper %s), median orientation error %.1f deg",
    name, metrics["images"], metrics["pixels"], r2["mean"], ", ".join(f"{c} {r2[c]:.3f}" for c in evaluate.COMPONENTS),
    metrics["paper_r2"], metrics["orientation_error_deg"]["median"],
)  # fmt: skip
with h5py.File(snakemake.input.predictions) as f:
    pred = f["pred"][()].astype("float32")
fig = figures.scatter(ShardDataset([snakemake.input.testset]), pred, metrics["r2_pearson"])
fig.savefig(snakemake.output.scatter, dpi=110)
