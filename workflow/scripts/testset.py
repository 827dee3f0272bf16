"""Generate one test set: two_zone, cylinder, table1, beads or beads_dense (rule testset)."""

from blurflow import logs, testsets
from blurflow.pipeline import unflatten
from blurflow.synthesis import Setup

logs.job(snakemake)
c = unflatten(snakemake.params.items())
t = c["testsets"]
name = snakemake.wildcards.testset
common = (snakemake.output.h5, snakemake.input.sources, Setup.from_config(c), t["image_px"])
if name == "two_zone":
    testsets.write_two_zone(*common, count=t["two_zone"]["count"])
elif name == "cylinder":
    cyl = t["cylinder"]
    testsets.write_cylinder(*common, count=cyl["count"], speed=cyl["speed"], z0=cyl["z0"], direction_deg=cyl["direction_deg"])
elif name == "beads":
    testsets.write_beads(*common, count=t["beads"]["count"], per_side=t["beads"]["per_side"])
elif name == "beads_dense":
    dense = t["beads_dense"]
    testsets.write_beads_dense(snakemake.output.h5, Setup.from_config(c), dense["image_px"], count=dense["count"], per_128px=dense["per_128px"])
else:
    testsets.write_table1(*common, repeats=t["table1"]["repeats"], per_side=t["table1"]["per_side"])
