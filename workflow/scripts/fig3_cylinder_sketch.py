"""Paper Fig. 3: the cylinder flow and its expected profile (rule fig3_cylinder_sketch)."""

from blurflow import figures, logs
from blurflow.pipeline import unflatten

logs.job(snakemake)
cyl = unflatten(snakemake.params.items())["testsets"]["cylinder"]
figures.cylinder_sketch(cyl["speed"], cyl["direction_deg"]).savefig(snakemake.output.figure, dpi=110)
