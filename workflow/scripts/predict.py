"""Predict the flow maps of a test set with the trained model (rule predict)."""

import torch

from blurflow import evaluate, logs
from blurflow.model import load_model
from blurflow.train import pick_device

logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
model, meta = load_model(snakemake.input.model, pick_device("auto"))
evaluate.predict_testset(
    model,
    snakemake.input.testset,
    snakemake.output.h5,
    evaluated=snakemake.params.evaluated,
    tile=meta["image_px"],
    batch=snakemake.params.batch,
    smooth_px=meta.get("output_smoothing_px", 0.0),
)
