"""Particle mode, scoring: the bead test sets fitted and scored against their truth, and the Cramer-Rao bound
against the exposure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from blurflow.optics import COMPONENTS, MotionScales, Optics
from blurflow.particles.detection import detect, windows
from blurflow.particles.fit import PARAMS, BeadFitter
from blurflow.particles.frames import Particles, fit_frames

TRAINING_VARIANCE = {"v1": 1 / 3, "v2": 1 / 3, "v3": 1 / 12, "z0": 1 / 12}  # of uniform [-1, 1], [-1, 1], [0, 1], [0, 1]


@torch.no_grad()
def cramer_rao_map(
    optics: Optics, settings: list[tuple[float, float]], photons: list[float], motions: int = 48, background: float = 2.0, seed: int = 0,
) -> list[dict]:  # fmt: skip
    """The bound for one bead against the exposure: for every blur scale (L px, A um per unit speed,
    as a longer exposure scales both) and photon count, the median Cramér-Rao standard deviation
    of v1, v2, v3, z0 (normalised units) over ``motions`` motions drawn in the training ranges, and
    the ideal R^2 it allows, var / (var + mean sigma^2) with the training ranges' variance. The window
    of each setting holds its longest streak and widest defocus (required_kernel_px)."""
    from blurflow.optics import required_kernel_px

    g = torch.Generator().manual_seed(seed)
    motion = torch.rand(motions, 4, generator=g) * torch.tensor([2.0, 2.0, 1.0, 1.0]) - torch.tensor([1.0, 1.0, 0.0, 0.0])
    motion[:, 2:] = motion[:, 2:].clamp(min=0.02)  # v3 = 0 exactly: its derivative is one-sided there
    rows = []
    for lateral, axial in settings:
        scales = MotionScales(lateral, axial)
        window = max(32, required_kernel_px(optics, scales, math.sqrt(2), 2.0))
        fitter = BeadFitter(optics, scales, window + window % 2)
        for count in photons:
            theta = torch.cat([torch.zeros(motions, 2), motion, torch.full((motions, 1), float(count)), torch.full((motions, 1), background)], 1)
            std = fitter.cramer_rao(theta)[1][:, 2:6]
            row = {"lateral_scale_px": lateral, "axial_scale_um": axial, "photons": count, "window_px": fitter.window}
            for i, name in enumerate(("v1", "v2", "v3", "z0")):
                row[f"std_{name}"] = float(std[:, i].median())
                row[f"ideal_r2_{name}"] = TRAINING_VARIANCE[name] / (TRAINING_VARIANCE[name] + float((std[:, i] ** 2).mean()))
            rows.append(row)
    return rows


def fit_testset(testset: str | Path, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Fit every bead of a test set with beads on a grid (blurflow.testsets.write_beads, and the
    bead images of write_table1) in its grid cell: one row per bead with its image, index, true
    motion and photons, the fit (PARAMS), their standard deviations (``std_*``) and the flags."""
    from blurflow.data import ShardDataset

    ds = ShardDataset([testset])
    centres = np.stack([ds.attrs["bead_rows"], ds.attrs["bead_cols"]], 1)
    images = np.array(ds.attrs.get("bead_images", range(len(ds))), int)
    image_px = ds[0]["image"].shape[-1]
    per_side = round(math.sqrt(len(centres)))
    fitter = BeadFitter(Optics.from_config(ds.attrs["optics"]), MotionScales.from_config(ds.attrs["scales"]), image_px // per_side, device)
    n = len(centres)
    with h5py.File(testset) as f:  # one motion per bead, or one per image (Table 1)
        truth = np.broadcast_to(f["params"][()][images], (len(images), n, 4))
        photons = (f["quantum_efficiency"][()] * f["photons"][()])[images]
    cut = torch.cat([windows(ds[i]["image"][0].numpy(), centres, fitter.window) for i in images])
    fit = fitter.fit(cut)
    table = pd.DataFrame({"image": np.repeat(images, n), "bead": np.tile(np.arange(n), len(images))})
    for j, name in enumerate(COMPONENTS):
        table[f"true_{name}"] = truth[:, :, j].reshape(-1)
    table["true_photons"] = np.repeat(photons, n)
    for j, name in enumerate(PARAMS):
        table[name], table[f"std_{name}"] = fit.params[:, j], fit.std[:, j]
    for flag in ("direction_resolved", "depth_sign_resolved", "crosses_focus", "at_bound", "converged"):
        table[flag] = getattr(fit, flag)
    table["deviance"] = fit.deviance
    return table


def match(particles: Particles, midpoints: Sequence[np.ndarray], distance_px: float = 3.0) -> list[np.ndarray]:
    """For every frame, the index into ``particles`` of the fit of each true path midpoint
    (``midpoints``: (M, 2) (row, col) per frame), -1 where no fit that converged and explains its
    window (FitResult.poor_fit) lies within ``distance_px``; nearest pairs first, each fit once."""
    fitted = particles.centres + particles.fit.params[:, [1, 0]]  # (row, col) of each fit's midpoint
    good = ~particles.fit.poor_fit() & particles.fit.converged
    out = []
    for frame, truth in enumerate(midpoints):
        mine = np.flatnonzero((particles.frame == frame) & good)
        index = np.full(len(truth), -1)
        if len(mine) and len(truth):
            dist = np.hypot(*(fitted[mine, None, :] - np.asarray(truth)[None]).transpose(2, 0, 1))
            for f, t in zip(*np.unravel_index(np.argsort(dist, axis=None), dist.shape)):
                if dist[f, t] >= distance_px:
                    break
                if index[t] < 0 and mine[f] not in index:
                    index[t] = mine[f]
        out.append(index)
    return out


def fit_dense_testset(testset: str | Path, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Detect and fit the beads of a dense bead test set (blurflow.testsets.write_beads_dense), all
    images in one batch, neighbours together (:func:`fit_frames`), and match the fits to the
    beads (:func:`match`): one row per bead with its image, index, true motion and photons,
    ``fitted`` and, where fitted, the fit (PARAMS), its std (``std_*``), the flags and the
    number of neighbours (NaN where not)."""
    from blurflow.data import ShardDataset

    ds = ShardDataset([testset])
    midpoints = [np.stack([r, c], 1) for r, c in zip(ds.attrs["bead_rows"], ds.attrs["bead_cols"])]
    fitter = BeadFitter(Optics.from_config(ds.attrs["optics"]), MotionScales.from_config(ds.attrs["scales"]), int(ds.attrs["window"]), device)
    images = [ds[i]["image"][0].numpy() for i in range(len(ds))]
    parts = fit_frames(fitter, images, [detect(image, fitter.window) for image in images])
    index = np.concatenate(match(parts, midpoints))
    with h5py.File(testset) as f:
        truth = np.concatenate([p[: len(m)] for p, m in zip(f["params"][()], midpoints)])
        photons = np.repeat(f["quantum_efficiency"][()] * f["photons"][()], [len(m) for m in midpoints])
    table = pd.DataFrame(
        {"image": np.repeat(np.arange(len(images)), [len(m) for m in midpoints]), "bead": np.concatenate([np.arange(len(m)) for m in midpoints])}
    )
    for j, name in enumerate(COMPONENTS):
        table[f"true_{name}"] = truth[:, j]
    table["true_photons"] = photons
    table["fitted"] = index >= 0
    fit, at = parts.fit, np.maximum(index, 0)
    for j, name in enumerate(PARAMS):
        table[name] = np.where(index >= 0, fit.params[at, j], np.nan)
        table[f"std_{name}"] = np.where(index >= 0, fit.std[at, j], np.nan)
    for flag in ("direction_resolved", "depth_sign_resolved", "crosses_focus", "at_bound", "converged"):
        table[flag] = np.where(index >= 0, getattr(fit, flag)[at], False)
    table["deviance"] = np.where(index >= 0, fit.deviance[at], np.nan)
    table["neighbours"] = np.where(index >= 0, parts.neighbours[at], -1)
    return table


def bead_scores(
    truth: np.ndarray, estimate: np.ndarray, scales: MotionScales, pixel_um: float, std: np.ndarray | None = None, resolved: np.ndarray | None = None
) -> dict:
    """Scores of per-bead estimates (M, 4) of (v1, v2, v3, z0) against the truth (M, 4): R^2
    (squared Pearson; of |v1|, |v2| as in the paper), MAE in um (per exposure; z0 in um), the
    median orientation error (deg, beads moving > 0.1), and for a fit with ``std`` and
    ``resolved``: the share of resolved directions and of those right, the median |error| / std and
    the coverage (share of errors within 1 and 2 predicted std; an unresolved direction's sign is
    not an error)."""
    est = estimate.copy()
    same = (est[:, 0] * truth[:, 0] + est[:, 1] * truth[:, 1]) >= 0
    if resolved is not None:
        est[:, :2] *= np.where(resolved | same, 1, -1)[:, None]
    pairs = [(np.abs(truth[:, 0]), np.abs(est[:, 0])), (np.abs(truth[:, 1]), np.abs(est[:, 1])), (truth[:, 2], est[:, 2]), (truth[:, 3], est[:, 3])]
    to_um = np.array([scales.lateral_scale_px * pixel_um] * 2 + [scales.axial_scale_um] * 2)
    moving = np.hypot(truth[:, 0], truth[:, 1]) > 0.1
    angle = np.rad2deg(np.abs(np.arctan2(est[:, 1], est[:, 0]) - np.arctan2(truth[:, 1], truth[:, 0]))) % 180
    out = {
        "beads": len(truth),
        "r2": {c: float(np.corrcoef(a, b)[0, 1] ** 2) for c, (a, b) in zip(COMPONENTS, pairs)},
        "mae_um": {c: float(v) for c, v in zip(COMPONENTS, np.abs(est - truth).mean(0) * to_um)},
        "orientation_error_deg_median": float(np.median(np.minimum(angle, 180 - angle)[moving])) if moving.any() else math.nan,
    }
    out["r2"]["mean"] = float(np.mean(list(out["r2"].values())))
    if std is not None and resolved is not None:
        z = np.abs(est - truth) / std
        out["directions_resolved"] = float(resolved.mean())
        out["resolved_directions_right"] = float(same[resolved].mean()) if resolved.any() else math.nan
        out["median_error_over_std"] = {c: float(v) for c, v in zip(COMPONENTS, np.median(z, 0))}
        out["within_1_std"] = {c: float(v) for c, v in zip(COMPONENTS, (z < 1).mean(0))}
        out["within_2_std"] = {c: float(v) for c, v in zip(COMPONENTS, (z < 2).mean(0))}
    return out
