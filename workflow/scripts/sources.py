"""Collect and tile the source images of one split (rule sources)."""

from blurflow import logs, sources
from blurflow.config import unflatten

logs.job(snakemake)
c = unflatten(snakemake.params.items())
cfg, split = c["sources"], snakemake.wildcards.split
images = sources.images_for(split, cfg, c["seed"], snakemake.params.resources_dir)
sources.write_sources(images, snakemake.output.h5, cfg["tile_px"], "+".join(sources.split_kinds(split, cfg)))
