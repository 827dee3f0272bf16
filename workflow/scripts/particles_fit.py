"""Fit every bead of a bead test set with the motion PSF (rule particles_fit): each in its grid
cell (table1, beads), or detected and fitted with its neighbours (beads_dense)."""

import torch

from blurflow import logs, particles

log = logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
if snakemake.wildcards.testset == "beads_dense":
    table = particles.fit_dense_testset(snakemake.input.testset)
    table.to_csv(snakemake.output.csv, index=False)
    log.info("fitted %d of %d beads, %d of them with their neighbours", table.fitted.sum(), len(table), (table.neighbours > 0).sum())
else:
    table = particles.fit_testset(snakemake.input.testset)
    table.to_csv(snakemake.output.csv, index=False)
    log.info(
        "fitted %d beads: %d directions resolved, %d at a bound, %d not converged",
        len(table),
        table.direction_resolved.sum(),
        table.at_bound.sum(),
        (~table.converged).sum(),
    )
