"""Collect and tile the source images of one split (rule sources)."""

from blurflow import logs, sources

logs.job(snakemake)
cfg = snakemake.params.sources
split = snakemake.wildcards.split
images = sources.images_for(split, cfg, snakemake.params.seed, snakemake.params.resources_dir)
sources.write_sources(images, snakemake.output.h5, cfg["tile_px"], "+".join(sources.split_kinds(split, cfg)))
