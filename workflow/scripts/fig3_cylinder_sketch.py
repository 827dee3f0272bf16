"""Paper Fig. 3: the cylinder flow and its expected profile (rule fig3_cylinder_sketch)."""

from blurflow import figures, logs

logs.job(snakemake)
cyl = snakemake.params.cylinder
figures.cylinder_sketch(cyl["speed"], cyl["direction_deg"]).savefig(snakemake.output.figure, dpi=110)
