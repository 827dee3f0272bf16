"""Scores model files on validation sets of the test sets' size and geometry: the sets that chose
the shipped model's stages (docs/model.md, docs/experiments.md). The test sets are never used.

Sets, each built once into ``--sets`` from the validation sources (``--sources``, the pipeline's
results/sources/val.h5) and the config's optics, blur scales and test-set settings:

- ``two_zone``: 64 two-zone images of 128 px, sources as they are;
- ``two_zone_x2``, ``two_zone_x3``: the same from the sources magnified 2x and 3x (cubic; each
  tile's four corner crops of 1/2 and 1/3 of its size): smoother textures, as in the test sources;
- ``cylinder``: 8 cylinder-flow images of 128 px (the config's speed, z0 and direction);
- ``texture_slope3``, ``texture_slope4``: two-zone sets from 4 Gaussian random textures
  (blurflow.sources.texture, skew 0) of spectral slope 3 and 4, from a seed no training run uses.

With ``--test-sources`` (the pipeline's results/sources/test.h5) the test sets of the config
(``testsets``: two-zone and cylinder, as the workflow writes them) are scored too, as
``two_zone_test`` and ``cylinder_test``: for the record of a model already chosen, never to choose.

    python tools/validation_sets.py MODEL [MODEL ...] [--sources results/sources/val.h5]
        [--config config.yaml [PRESET ...]] [--sets results/validation_sets] [--threads 2]
        [--test-sources results/sources/test.h5] [--images 64]

Each model is read as its file says (smoothing, dihedral mean). Prints R² (Pearson, per component
and mean) per model and set and writes them to ``SETS/scores.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from blurflow import evaluate, sources, testsets
from blurflow.devices import pick_device
from blurflow.files import atomic_path
from blurflow.modelfile import load_model, readout
from blurflow.schema import load
from blurflow.synthesis import Setup

IMAGE_PX, TWO_ZONE_COUNT, CYLINDER_COUNT = 128, 64, 8
TEXTURE_SEED, TEXTURE_COUNT = 987_654, 4  # training textures use seed * 1000 + 0 or 1


def magnified(src: Path, dst: Path, zoom: float) -> None:
    """The tiles of ``src`` magnified ``zoom`` x: each tile's four corner crops of 1 / zoom of its size."""
    with h5py.File(src) as f, atomic_path(dst) as tmp, h5py.File(tmp, "w") as g:
        images = f["images"][()].astype(np.float32)
        n = images.shape[1]
        c = round(n / zoom)
        crops = [t[y : y + c, x : x + c] for t in images for y in (0, n - c) for x in (0, n - c)]
        g["images"] = np.array([np.clip(ndimage.zoom(crop, n / c, order=3)[:n, :n], 0, 65535) for crop in crops]).astype(np.uint16)
        g["source"] = np.repeat(f["source"][()], 4)
        g.attrs.update(dict(f.attrs))


def build(sets: Path, val_sources: Path, config: dict, images: int = TWO_ZONE_COUNT) -> dict[str, Path]:
    """The validation sets (paths), each written once: ``images`` two-zone images each (at most
    CYLINDER_COUNT cylinder images)."""
    setup = Setup.from_config(config)
    cyl = config["testsets"]["cylinder"]
    sets.mkdir(parents=True, exist_ok=True)
    two_zone_sources = {"two_zone": val_sources}
    for zoom in (2, 3):
        two_zone_sources[f"two_zone_x{zoom}"] = path = sets / f"sources_x{zoom}.h5"
        if not path.exists():
            magnified(val_sources, path, zoom)
    for slope in (3, 4):
        two_zone_sources[f"texture_slope{slope}"] = path = sets / f"sources_texture_slope{slope}.h5"
        if not path.exists():
            sources.write_sources(sources.texture_images(TEXTURE_COUNT, 512, TEXTURE_SEED, (slope, slope), (0, 0)), path, 256, "texture")
    out = {}
    for name, src in two_zone_sources.items():
        out[name] = sets / f"{name}.h5"
        if not out[name].exists():
            testsets.write_two_zone(out[name], src, setup, IMAGE_PX, images, progress=False)
    out["cylinder"] = sets / "cylinder.h5"
    if not out["cylinder"].exists():
        testsets.write_cylinder(
            out["cylinder"], val_sources, setup, IMAGE_PX, min(images, CYLINDER_COUNT), cyl["speed"], cyl["z0"], cyl["direction_deg"], progress=False
        )
    return out


def build_test(sets: Path, test_sources: Path, config: dict, images: int | None = None) -> dict[str, tuple[Path, int]]:
    """The config's two-zone and cylinder test sets (paths, images evaluated: at most ``images``), each written once."""
    setup, t = Setup.from_config(config), config["testsets"]
    cyl = t["cylinder"]
    count = {"two_zone_test": min(t["two_zone"]["count"], images or t["two_zone"]["count"]), "cylinder_test": min(cyl["count"], images or cyl["count"])}
    out = {
        "two_zone_test": (sets / "two_zone_test.h5", min(t["two_zone"]["evaluated"], count["two_zone_test"])),
        "cylinder_test": (sets / "cylinder_test.h5", count["cylinder_test"]),
    }
    if not out["two_zone_test"][0].exists():
        testsets.write_two_zone(out["two_zone_test"][0], test_sources, setup, t["image_px"], count["two_zone_test"], progress=False)
    if not out["cylinder_test"][0].exists():
        testsets.write_cylinder(
            out["cylinder_test"][0], test_sources, setup, t["image_px"], count["cylinder_test"], cyl["speed"], cyl["z0"], cyl["direction_deg"], progress=False
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL")
    parser.add_argument("--sources", default="results/sources/val.h5", help="validation sources (HDF5 of the sources rule)")
    parser.add_argument("--config", nargs="+", default=["config.yaml"], help="config files, later ones overlay earlier ones")
    parser.add_argument("--sets", default="results/validation_sets", help="folder of the sets (built once) and scores.csv")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--test-sources", default=None, help="test sources (HDF5 of the sources rule): score the config's test sets too")
    parser.add_argument(
        "--images", type=int, default=TWO_ZONE_COUNT, help=f"images per set (default {TWO_ZONE_COUNT}; fewer: a quick check, not the rule's sets)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load(args.config)
    sets = {name: (path, None) for name, path in build(Path(args.sets), Path(args.sources), config, args.images).items()}
    if args.test_sources:
        sets.update(build_test(Path(args.sets), Path(args.test_sources), config, None if args.images == TWO_ZONE_COUNT else args.images))
    device = pick_device("auto")
    rows = []
    for path in args.models:
        model, meta = load_model(path, device)
        for name, (testset, evaluated) in sets.items():
            pred = Path(args.sets) / f"pred_{name}.h5"
            evaluate.predict_testset(model, testset, pred, evaluated=evaluated, progress=False, **readout(meta))
            r2 = evaluate.evaluate_testset(testset, pred, name)["r2_pearson"]
            pred.unlink()
            rows.append({"model": path, "set": name, **{k: round(v, 3) for k, v in r2.items()}})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(Path(args.sets) / "scores.csv", index=False)
    print(table.pivot(index="set", columns="model", values="mean").to_string())


if __name__ == "__main__":
    main()
