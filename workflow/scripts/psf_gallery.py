"""Render the motion PSF gallery (rule psf_gallery)."""

from blurflow import figures, logs
from blurflow.optics import MotionScales, Optics
from blurflow.pipeline import unflatten

logs.job(snakemake)
c = unflatten(snakemake.params.items())
fig = figures.psf_gallery(Optics.from_config(c["optics"]), MotionScales.from_config(c["motion"]), size=c["motion"]["kernel_px"])
fig.savefig(snakemake.output.figure, dpi=120)
