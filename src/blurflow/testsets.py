"""Test sets of the paper's Section 3, in the shard format (readable by blurflow.data.ShardDataset).

- two-zone: a held-out source split in two regions by a random straight boundary, each region with
  its own random motion (paper Fig. 2, R^2 = 0.92);
- cylinder: flow in a cylinder seen from the side, v(y) = V (cos phi(y) e_lateral, sin phi(y))
  with phi going smoothly from 0 at the bottom row (lateral motion) to pi/2 at the top row (axial
  motion); every row is its own region with its own PSF, so the profile has no bands
  (paper Fig. 3-4, R^2 = 0.91);
- Table 1: five fixed motions, a-d on isolated simulated beads, e on a textured held-out image;
- beads: isolated point sources on a grid, each its own region with its own random motion, for
  the particle fit (blurflow.particles) beside the network.

Camera draws (photons, quantum efficiency, background) follow the training configuration.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import h5py
import numpy as np
import torch

from blurflow.schema import TESTSETS
from blurflow.synthesis import RENDER_BATCH, Setup, Synthesizer, describe, sample_rng, write_samples

TABLE1 = {  # case: ((v1, v2, v3, z0), source) as in the paper's Table 1
    "a": ((0.30, 0.30, 0.00, 0.00), "beads"),
    "b": ((0.30, 0.30, 0.80, 0.00), "beads"),
    "c": ((0.30, 0.30, 0.80, 0.30), "beads"),
    "d": ((-0.30, 0.60, 0.80, 0.10), "beads"),
    "e": ((0.00, 0.40, 1.20, 0.00), "texture"),
}
TABLE1_PAPER = {  # the paper's predictions
    "a": (0.38, 0.31, 0.01, 0.05),
    "b": (0.35, 0.29, 0.71, 0.08),
    "c": (0.35, 0.31, 0.77, 0.41),
    "d": (-0.28, 0.51, 0.96, 0.15),
    "e": (0.10, 0.35, 0.98, 0.06),
}
PAPER_R2 = {"two_zone": 0.92, "cylinder": 0.91}
TESTSET_KEYS = {name: 10 + i for i, name in enumerate(TESTSETS)}  # seed-key prefixes (two_zone 10 ... beads_dense 14), apart from training
DENSE_SPACING_PX = 8  # least distance between the path midpoints of the dense bead set's beads


def straight_split(size: int, rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, size, size) int64: 0 / 1 on either side of a random line through the central half."""
    py, px = rng.uniform(0.25 * size, 0.75 * size, (2, count, 1, 1))
    angle = rng.uniform(0, math.pi, (count, 1, 1))
    y, x = np.mgrid[0:size, 0:size]
    return ((x - px) * np.cos(angle) + (y - py) * np.sin(angle) > 0).astype(np.int64)


def cylinder_params(rows: int, speed: float, z0: float, direction_deg: float) -> np.ndarray:
    """(rows, 4) (v1, v2, v3, z0) of each image row, top row first: phi = pi/2 at the top, 0 at
    the bottom; lateral motion along ``direction_deg`` (0: +x, 90: +y)."""
    phi = (math.pi / 2) * (rows - 1 - np.arange(rows)) / max(rows - 1, 1)
    a = math.radians(direction_deg)
    lateral = speed * np.cos(phi)
    return np.stack([lateral * math.cos(a), lateral * math.sin(a), speed * np.sin(phi), np.full(rows, z0)], 1).astype(np.float32)


def row_regions(canvas: int, image: int, bands: int) -> np.ndarray:
    """Canvas labels: image row -> band (``bands`` equal bands), padding rows clamp to the edge."""
    rows = np.clip(np.arange(canvas) - (canvas - image) // 2, 0, image - 1)
    return np.repeat((rows * bands // image).astype(np.uint8)[:, None], canvas, axis=1)


def _synthesizer(sources, setup: Setup, image_px: int, v3_max: float = 1.0, speed_max: float = 0.0) -> Synthesizer:
    """The setup's synthesizer for test images of ``image_px`` whose v3 range reaches ``v3_max``
    (and lateral range ``speed_max``, for fixed motions); the sources at their own pixels (no
    ``source_zoom``), so every model meets the same test images."""
    v3, lat = setup.synthesis.v3, setup.synthesis.v_lateral
    return Synthesizer(sources, setup.with_synthesis(
        image_px=image_px, v3=(min(v3[0], 0.0), max(v3[1], v3_max)), v_lateral=(min(lat[0], -speed_max), max(lat[1], speed_max)), source_zoom=(1.0, 1.0),
    ))  # fmt: skip


def _write(
    path, syn: Synthesizer, key: int, count: int, n_max: int, attrs: Mapping, batch: Callable[[dict, np.random.Generator, int], dict],
    progress: bool, desc: str, size: int = RENDER_BATCH,
) -> None:  # fmt: skip
    """Write a test set of ``count`` images in batches of ``size``: batch b draws from the
    generator of (seed, key, b) (:meth:`SampleDraws.draw`: crops and camera), then ``batch(draws,
    rng, first)`` (``first``: the index of the batch's first image) sets its motions (``params``) and gives the keyword arguments of :meth:`Synthesizer.batch`
    (canvas ``regions``, ``sharp`` images) as numpy arrays."""
    seed = syn.setup.seed

    def render(b: int, n: int) -> dict[str, torch.Tensor]:
        rng = sample_rng((seed, key, b))
        draws = syn.draws.draw(n, rng)
        given = {k: torch.from_numpy(np.array(v)).to(syn.device) for k, v in batch(draws, rng, b * size).items()}
        return syn.batch(draws, check=True, **given)

    write_samples(path, render, count, n_max, {**describe(syn), "seed": seed, **attrs}, batch=size, progress=progress, desc=desc)


def write_two_zone(path, sources, setup: Setup, image_px: int, count: int, progress: bool = True) -> None:
    """Two-zone test set: ``count`` images of ``image_px``."""
    syn = _synthesizer(sources, setup, image_px)

    def batch(draws: dict, rng: np.random.Generator, first: int) -> dict:
        draws["params"] = syn.draws.motions((len(draws["tile"]), 2), rng)
        return {"regions": straight_split(syn.canvas_px, rng, len(draws["tile"]))}

    _write(path, syn, TESTSET_KEYS["two_zone"], count, 2, {"testset": "two_zone"}, batch, progress, "two-zone")


def write_cylinder(
    path, sources, setup: Setup, image_px: int, count: int,
    speed: float, z0: float, direction_deg: float, progress: bool = True,
) -> None:  # fmt: skip
    """Cylinder-flow test set: ``count`` held-out sources under the same row-wise flow profile."""
    syn = _synthesizer(sources, setup, image_px, v3_max=speed, speed_max=speed)
    bands = min(image_px, 255)
    params = cylinder_params(bands, speed, z0, direction_deg)
    regions = row_regions(syn.canvas_px, image_px, bands).astype(np.int64)

    def batch(draws: dict, rng: np.random.Generator, first: int) -> dict:
        n = len(draws["tile"])
        draws["params"] = np.broadcast_to(params, (n, *params.shape))
        return {"regions": np.broadcast_to(regions, (n, *regions.shape))}

    attrs = {"testset": "cylinder", "speed": speed, "z0": z0, "direction_deg": direction_deg}
    _write(path, syn, TESTSET_KEYS["cylinder"], count, bands, attrs, batch, progress, "cylinder", size=1)


def write_table1(
    path, sources, setup: Setup, image_px: int, repeats: int,
    per_side: int = 2, progress: bool = True,
) -> None:  # fmt: skip
    """Table 1: ``repeats`` images of each case a-e (in order a, a, ..., e), one region each. The
    bead cases a-d show ``per_side`` x ``per_side`` isolated beads (:func:`grid_beads`, all with
    the case's motion), so both the network and the particle fit (blurflow.particles) read them;
    case e a held-out texture."""
    v3_max = max(p[2] for p, _ in TABLE1.values())
    syn = _synthesizer(sources, setup, image_px, v3_max=v3_max)
    cases = [c for c in TABLE1 for _ in range(repeats)]
    sharp_beads, centres = grid_beads(image_px, per_side)

    def batch(draws: dict, rng: np.random.Generator, first: int) -> dict:
        n = len(draws["tile"])
        mine = cases[first : first + n]
        draws["params"] = np.array([[TABLE1[c][0]] for c in mine], np.float32)
        beads = np.array([TABLE1[c][1] == "beads" for c in mine])
        crops = syn.renderer.crop(syn.tensors(draws)).cpu().numpy()
        return {"sharp": np.where(beads[:, None, None], sharp_beads, crops), "regions": np.zeros((n, syn.canvas_px, syn.canvas_px), np.int64)}

    bead_images = [i for i, c in enumerate(cases) if TABLE1[c][1] == "beads"]
    attrs = {"testset": "table1", "cases": "".join(cases), **_bead_attrs(centres), "bead_images": json.dumps(bead_images)}
    _write(path, syn, TESTSET_KEYS["table1"], len(cases), 1, attrs, batch, progress, "table 1")


def bead_grid(image_px: int, per_side: int) -> np.ndarray:
    """(per_side**2, 2) integer (row, col) of beads on a grid: the centres of equal cells."""
    cell = image_px // per_side
    centres = cell // 2 + cell * np.arange(per_side)
    return np.stack(np.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)


def grid_beads(image_px: int, per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Sharp image (image_px, image_px) float32 of one-pixel beads at :func:`bead_grid`, and their
    (per_side**2, 2) (row, col)."""
    centres = bead_grid(image_px, per_side)
    sharp = np.zeros((image_px, image_px), np.float32)
    sharp[centres[:, 0], centres[:, 1]] = 1.0
    return sharp, centres


def _bead_attrs(centres: np.ndarray) -> dict:
    """Test-set attributes naming the bead positions (read by blurflow.particles.fit_testset)."""
    return {"bead_rows": json.dumps(centres[:, 0].tolist()), "bead_cols": json.dumps(centres[:, 1].tolist())}


def write_beads(
    path, sources, setup: Setup, image_px: int, count: int,
    per_side: int = 2, progress: bool = True,
) -> None:  # fmt: skip
    """Bead test set: ``count`` images of ``image_px``, each with ``per_side`` x ``per_side``
    isolated beads (one bright pixel each, at :func:`bead_grid`) in their own grid cells, each
    cell a region with its own motion drawn in the training ranges; photons and background as in
    training (a bead's photons are ``quantum_efficiency * photons``). Motions are drawn with
    v2 >= 0, so the stored (canonical) labels are the signed motions: the direction of a bead that
    moves away from focus is known, and is what the fit must find (a 180 degree rotation of the
    plane loses nothing)."""
    syn = _synthesizer(sources, setup, image_px)  # the sources are not used: beads are the sources
    sharp, centres = grid_beads(image_px, per_side)
    cell, offset = image_px // per_side, (syn.canvas_px - image_px) // 2
    index = np.clip((np.arange(syn.canvas_px) - offset) // cell, 0, per_side - 1)
    regions = (index[:, None] * per_side + index[None, :]).astype(np.int64)

    def batch(draws: dict, rng: np.random.Generator, first: int) -> dict:
        n = len(draws["tile"])
        motions = syn.draws.motions((n, per_side**2), rng)
        motions[motions[..., 1] < 0, :2] *= -1
        draws["params"] = motions
        return {"sharp": np.broadcast_to(sharp, (n, *sharp.shape)), "regions": np.broadcast_to(regions, (n, *regions.shape))}

    _write(path, syn, TESTSET_KEYS["beads"], count, per_side**2, {"testset": "beads", **_bead_attrs(centres)}, batch, progress, "beads")


def dense_window(image_px: int) -> int:
    """The particle fit's window on the dense bead set: half the image, at most 64 px."""
    return min(64, image_px // 2)


def dense_positions(image_px: int, count: int, rng: np.random.Generator, spacing: float = DENSE_SPACING_PX) -> np.ndarray:
    """(count, 2) integer (row, col) path midpoints, uniform where a fit window
    (:func:`dense_window`) fits in the image, at least ``spacing`` px apart."""
    half = dense_window(image_px) // 2
    out: list[np.ndarray] = []
    for _ in range(1000 * count):
        if len(out) == count:
            break
        p = rng.integers(half, image_px - half, 2)
        if all(np.hypot(*(p - q)) >= spacing for q in out):
            out.append(p)
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def write_beads_dense(path, setup: Setup, image_px: int, count: int, per_128px: float, progress: bool = True) -> None:
    """Dense bead test set: ``count`` images of ``image_px``, each with round(per_128px x
    (image_px / 128)^2) one-pixel beads (at least one) at random path midpoints
    (:func:`dense_positions`), each bead its own region (the pixels nearest to it) with its own
    motion drawn in the training ranges with v2 >= 0 (signed labels, as in :func:`write_beads`);
    the training camera. The midpoints of every image are stored (``bead_rows``, ``bead_cols``:
    one list per image) for blurflow.particles.fit_dense_testset. No sources: the beads are the
    scene (the renderer is given one blank tile of the image's size)."""
    with tempfile.TemporaryDirectory() as tmp:
        blank = Path(tmp) / "blank.h5"
        with h5py.File(blank, "w") as f:
            f["images"] = np.zeros((1, image_px, image_px), np.uint16)
        syn = _synthesizer(blank, setup, image_px)
    beads = max(1, round(per_128px * (image_px / 128) ** 2))
    offset = (syn.canvas_px - image_px) // 2
    grid = np.arange(syn.canvas_px) - offset
    where = [dense_positions(image_px, beads, sample_rng((setup.seed, TESTSET_KEYS["beads_dense"], i, 1))) for i in range(count)]

    def batch(draws: dict, rng: np.random.Generator, first: int) -> dict:
        n = len(draws["tile"])
        motions = syn.draws.motions((n, beads), rng)
        motions[motions[..., 1] < 0, :2] *= -1
        draws["params"] = motions
        sharp = np.zeros((n, image_px, image_px), np.float32)
        regions = np.zeros((n, syn.canvas_px, syn.canvas_px), np.int64)
        for k, pos in enumerate(where[first : first + n]):
            sharp[k, pos[:, 0], pos[:, 1]] = 1.0
            distance = (grid[None, :, None] - pos[:, 0, None, None]) ** 2 + (grid[None, None, :] - pos[:, 1, None, None]) ** 2
            regions[k] = distance.argmin(0)
        return {"sharp": sharp, "regions": regions}

    attrs = {
        "testset": "beads_dense",
        "bead_rows": json.dumps([p[:, 0].tolist() for p in where]),
        "bead_cols": json.dumps([p[:, 1].tolist() for p in where]),
        "window": dense_window(image_px),
    }
    _write(path, syn, TESTSET_KEYS["beads_dense"], count, beads, attrs, batch, progress, "dense beads")
