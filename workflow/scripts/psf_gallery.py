"""Render the motion PSF gallery (rule psf_gallery)."""

from blurflow import figures, logs
from blurflow.optics import MotionScales, Optics

logs.job(snakemake)
fig = figures.psf_gallery(
    Optics.from_config(snakemake.params.optics),
    MotionScales.from_config(snakemake.params.motion),
    size=snakemake.params.motion["kernel_px"],
)
fig.savefig(snakemake.output.figure, dpi=120)
