"""R^2 and the other scores of a test set, with a scatter plot (rule metrics)."""

import h5py

from blurflow import evaluate, figures, logs
from blurflow.data import ShardDataset
from blurflow.testsets import PAPER_R2

log = logs.job(snakemake)
name = snakemake.wildcards.testset
metrics = evaluate.evaluate_testset(snakemake.input.testset, snakemake.input.predictions, name, PAPER_R2.get(name))
evaluate.write_metrics(metrics, snakemake.output.json, snakemake.output.csv)
r2, ci = metrics["r2_pearson"], metrics["r2_pearson_ci95"]
log.info(
    "%s: %d images, %d valid pixels, R2 %.3f [95 %% interval %.3f, %.3f] (%s; paper %s), median orientation error %.1f deg",
    name, metrics["images"], metrics["pixels"], r2["mean"], *ci["mean"], ", ".join(f"{c} {r2[c]:.3f}" for c in evaluate.COMPONENTS),
    metrics["paper_r2"], metrics["orientation_error_deg"]["median"],
)  # fmt: skip
with h5py.File(snakemake.input.predictions) as f:
    pred = f["pred"][()].astype("float32")
fig = figures.scatter(ShardDataset([snakemake.input.testset]), pred, r2, ci)
fig.savefig(snakemake.output.scatter, dpi=110)
