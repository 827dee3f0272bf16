"""Score the particle fit and the network on a bead test set (rule bead_metrics): the fit on the
beads it fitted (all of them, beads; those detected, matched and converged, beads_dense), the
network on every bead."""

import json

import numpy as np
import pandas as pd

from blurflow import evaluate, figures, logs, particles
from blurflow.data import ShardDataset
from blurflow.optics import COMPONENTS, MotionScales, Optics

log = logs.job(snakemake)
table = pd.read_csv(snakemake.input.fits)
attrs = ShardDataset([snakemake.input.testset]).attrs
scales, pixel_um = MotionScales.from_config(attrs["scales"]), Optics.from_config(attrs["optics"]).pixel_um
truth = table[[f"true_{c}" for c in COMPONENTS]].to_numpy()
network = evaluate.bead_estimates(snakemake.input.testset, snakemake.input.predictions)
fitted = table["fitted"].to_numpy(bool) if "fitted" in table else np.ones(len(table), bool)
fit = table[list(COMPONENTS)].to_numpy()[fitted]
std = table[[f"std_{c}" for c in COMPONENTS]].to_numpy()[fitted]
scores = {
    "fit": {
        "fraction_fitted": float(fitted.mean()),
        **particles.bead_scores(truth[fitted], fit, scales, pixel_um, std, table.direction_resolved.to_numpy(bool)[fitted]),
    },
    "network": particles.bead_scores(truth, network, scales, pixel_um),
}
with open(snakemake.output.json, "w") as f:
    json.dump(scores, f, indent=2)
rows = [
    {
        "method": m,
        "component": c,
        "r2": s["r2"][c],
        "mae_um": s["mae_um"][c],
        **({"within_1_std": s["within_1_std"][c], "within_2_std": s["within_2_std"][c]} if "within_1_std" in s else {}),
    }
    for m, s in scores.items()
    for c in COMPONENTS
]
pd.DataFrame(rows).to_csv(snakemake.output.csv, index=False)
for method, s in scores.items():
    log.info("%s on %d beads: R2 |v1| %.3f, |v2| %.3f, v3 %.3f, z0 %.3f", method, s["beads"], *(s["r2"][c] for c in COMPONENTS))
log.info("fraction of the beads fitted: %.3f", scores["fit"]["fraction_fitted"])
figures.fit_vs_truth(table, network).savefig(snakemake.output.figure, dpi=110)
