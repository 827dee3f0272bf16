"""Predict the flow maps of a test set with the trained model (rule predict)."""

import torch

from blurflow import evaluate, logs
from blurflow.devices import pick_device
from blurflow.modelfile import load_model, readout
from blurflow.pipeline import unflatten

logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
tests = unflatten(snakemake.params.items())["testsets"]
model, meta = load_model(snakemake.input.model, pick_device("auto"))
evaluate.predict_testset(
    model,
    snakemake.input.testset,
    snakemake.output.h5,
    evaluated=tests.get(snakemake.wildcards.testset, {}).get("evaluated"),
    tile=meta["image_px"],
    batch=tests["batch"],
    **readout(meta),
)
