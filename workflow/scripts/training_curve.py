"""Training curves from the training log (rule training_curve)."""

import pandas as pd

from blurflow import figures, logs

logs.job(snakemake)
figures.training_curve(pd.read_csv(snakemake.input.log)).savefig(snakemake.output.figure, dpi=120)
