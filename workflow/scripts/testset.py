"""Generate one test set: two_zone, cylinder, table1 or beads (rule testset)."""

from blurflow import logs, testsets
from blurflow.config import unflatten
from blurflow.optics import MotionScales, Optics
from blurflow.synthesis import SynthesisConfig

logs.job(snakemake)
c = unflatten(snakemake.params.items())
t = c["testsets"]
name = snakemake.wildcards.testset
common = (
    snakemake.output.h5,
    snakemake.input.sources,
    Optics.from_config(c["optics"]),
    MotionScales.from_config(c["motion"]),
    c["motion"]["kernel_px"],
    SynthesisConfig.from_config(c["synthesis"]),
    t["image_px"],
)
if name == "two_zone":
    testsets.write_two_zone(*common, count=t["two_zone"]["count"], seed=c["seed"])
elif name == "cylinder":
    cyl = t["cylinder"]
    testsets.write_cylinder(*common, count=cyl["count"], seed=c["seed"], speed=cyl["speed"], z0=cyl["z0"], direction_deg=cyl["direction_deg"])
elif name == "beads":
    testsets.write_beads(*common, count=t["beads"]["count"], seed=c["seed"], per_side=t["beads"]["per_side"])
else:
    testsets.write_table1(*common, repeats=t["table1"]["repeats"], seed=c["seed"], per_side=t["table1"]["per_side"])
