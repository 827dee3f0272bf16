"""`blurflow particles` on a time-lapse stack: wall time, beads/s and the share of beads found.

A TIFF stack of ``--frames`` frames of ``--size`` px with ``--beads`` beads each, rendered as the
pipeline's dense bead test set is (blurflow.testsets.write_beads_dense: the training camera, each
bead its own motion), written as uint16 counts, then one run of the command line
(``blurflow particles STACK --config CONFIG``: one kernel bank, every frame detected and fitted in
one batch, neighbours together) timed from the call to the written table, start-up included. A
bead is found when a row of the table that is not flagged and converged lies within 3 px of its
path midpoint. Prints one JSON line.

    python benchmarks/particle_stack.py [--frames 20] [--size 1024] [--beads 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import tifffile
import torch
import yaml

from blurflow import cli, testsets
from blurflow.config import Setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--beads", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with h5py.File(folder / "blank.h5", "w") as f:  # the writer wants sources; the beads replace them
            f["images"] = np.zeros((1, args.size, args.size), np.uint16)
        per_128px = args.beads / (args.size / 128) ** 2
        testsets.write_beads_dense(folder / "stack.h5", folder / "blank.h5", Setup.from_config({}), args.size, args.frames, per_128px, progress=False)
        with h5py.File(folder / "stack.h5") as f:
            tifffile.imwrite(folder / "stack.tif", np.clip(np.round(f["image"][()]), 0, 65535).astype(np.uint16))
            rows, cols = json.loads(f.attrs["bead_rows"]), json.loads(f.attrs["bead_cols"])
        (folder / "config.yaml").write_text(yaml.safe_dump({}))
        window = testsets.dense_window(args.size)
        start = time.perf_counter()
        status = cli.main(["particles", str(folder / "stack.tif"), "--config", str(folder / "config.yaml"), "--window", str(window), "--quiet"])
        seconds = time.perf_counter() - start
        table = pd.read_csv(folder / "stack_particles.csv")
    good = table[table["flag"].isna() & table["converged"].fillna(False).astype(bool)]
    found = 0
    for frame, (r, c) in enumerate(zip(rows, cols)):
        fits = good[good["frame"] == frame][["y", "x"]].to_numpy()
        if len(fits):
            distance = np.hypot(*(fits[None] - np.stack([r, c], 1)[:, None]).transpose(2, 0, 1))
            found += int((distance.min(1) < 3).sum())
    beads = sum(len(r) for r in rows)
    print(json.dumps({
        "status": status, "frames": args.frames, "size_px": args.size, "beads": beads, "rows": len(table), "found": round(found / beads, 3),
        "seconds": round(seconds, 1), "beads_per_s": round(beads / seconds, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
