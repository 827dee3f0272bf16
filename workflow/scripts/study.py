"""Measurability study: table and figure of validation R^2 against the blur scale (rule study)."""

import pandas as pd

from blurflow import figures, logs, study
from blurflow.pipeline import unflatten

log = logs.job(snakemake)
runs = dict(zip(map(tuple, snakemake.params.settings), snakemake.input.logs))
table = study.summary(unflatten(snakemake.params.items()), runs)
table.to_csv(snakemake.output.csv, index=False)
for row in table.itertuples():
    log.info(
        "L %g px, A %g um: R2 %.3f (v1 %.2f, v2 %.2f, v3 %.2f, z0 %.2f) after %d images",
        row.lateral_scale_px,
        row.axial_scale_um,
        row.r2_mean,
        row.r2_v1,
        row.r2_v2,
        row.r2_v3,
        row.r2_z0,
        row.samples,
    )
curves = {study.setting_name(*key): pd.read_csv(path) for key, path in runs.items()}
figures.measurability(table, curves).savefig(snakemake.output.figure, dpi=110)
