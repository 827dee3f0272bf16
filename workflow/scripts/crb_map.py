"""Measurability from theory: the Cramer-Rao bound of one bead against the blur scale and photons (rule crb_map)."""

import pandas as pd
import torch

from blurflow import figures, logs
from blurflow.optics import Optics
from blurflow.particles import cramer_rao_map
from blurflow.pipeline import unflatten

log = logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
c = unflatten(snakemake.params.items())
settings = [(float(lateral), float(axial)) for lateral, axial in c["study"]["settings"]]
table = pd.DataFrame(cramer_rao_map(Optics.from_config(c["optics"]), settings, snakemake.params.photons))
table.to_csv(snakemake.output.csv, index=False)
for row in table.itertuples():
    log.info(
        "L %g px, A %g um, %d photons: ideal R2 v1 %.3f, v3 %.3f, z0 %.3f",
        row.lateral_scale_px,
        row.axial_scale_um,
        row.photons,
        row.ideal_r2_v1,
        row.ideal_r2_v3,
        row.ideal_r2_z0,
    )
figures.crb_map(table).savefig(snakemake.output.figure, dpi=110)
