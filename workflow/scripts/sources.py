"""Collect and tile the source images of one split (rule sources)."""

from blurflow import logs, sources
from blurflow.pipeline import unflatten

logs.job(snakemake)
c = unflatten(snakemake.params.items())
sources.write_split(snakemake.wildcards.split, c["sources"], c["seed"], snakemake.params.resources_dir, snakemake.output.h5)
