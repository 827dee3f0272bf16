"""Fit every bead of the bead test set with the motion PSF (rule particles_fit)."""

import torch

from blurflow import logs, particles

log = logs.job(snakemake)
torch.set_num_threads(snakemake.threads)
table = particles.fit_testset(snakemake.input.testset)
table.to_csv(snakemake.output.csv, index=False)
log.info("fitted %d beads: %d directions resolved, %d at a bound, %d not converged", len(table), table.direction_resolved.sum(), table.at_bound.sum(), (~table.converged).sum())
