"""Inference (batched, tiled with overlap) and metrics of predicted against true flow maps.

Metrics (docs/design.md, Evaluation), over all valid pixels of all images of a test set:

- R^2, the paper's number: squared Pearson correlation per component (|v1|, |v2|, v3, z0),
  averaged over the components that vary in the test set;
- coefficient of determination 1 - SS_res / SS_tot per component;
- orientation error of the lateral motion (degrees, modulo 180, where the true |v| > 0.1);
- mean absolute error per component in physical units (um per exposure; z0 in um).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from blurflow import logs
from blurflow.data import ShardDataset
from blurflow.files import atomic_path
from blurflow.model import FlowNet, decode, raw_outputs, smooth_outputs, smoothing_reach
from blurflow.optics import COMPONENTS, Optics, paper_sign
from blurflow.testsets import TABLE1, TABLE1_PAPER

log = logging.getLogger(__name__)
ORIENTATION_MIN_SPEED = 0.1
BOOTSTRAP = 2000  # resamples of the test images for an R² interval


def _window(size: int, overlap: int) -> torch.Tensor:
    """1D blending weights: linear ramps of ``overlap`` samples at both ends, 1 in between."""
    w = torch.ones(size)
    if overlap > 0:
        ramp = (torch.arange(overlap) + 0.5) / overlap
        w[:overlap], w[-overlap:] = ramp, ramp.flip(0)
    return w


def _starts(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def tile_count(h: int, w: int, tile: int, overlap: int = 32) -> int:
    """Number of tiles :func:`predict_bands` infers for an image of ``h`` x ``w`` px."""
    th, tw = min(tile, h), min(tile, w)
    ov = min(overlap, th // 2, tw // 2)
    return len(_starts(h, th, th - ov)) * len(_starts(w, tw, tw - ov))


SMOOTH_BLOCK_PX = 2048  # columns of a band smoothed at once (the edge-preserving passes' temporaries: 0.7 GB for a band 20,000 px wide)


def _smoothed(raw: torch.Tensor, smooth_px: float, edges: bool, margin: int, encoding: str) -> torch.Tensor:
    """Decoded maps (1, 5, H, W) of raw outputs (1, 5, H, W) smoothed (blurflow.model.smooth_outputs)
    in blocks of SMOOTH_BLOCK_PX columns, each read with the smoothing's ``margin`` on either side:
    the maps of the whole band, with the temporaries of a block."""
    w = raw.shape[-1]
    out = torch.empty_like(raw)
    for x0 in range(0, w, SMOOTH_BLOCK_PX):
        x1 = min(x0 + SMOOTH_BLOCK_PX, w)
        a, b = max(0, x0 - margin), min(w, x1 + margin)
        out[..., x0:x1] = decode(smooth_outputs(raw[..., a:b], smooth_px, edges), encoding)[..., x0 - a : x1 - a]
    return out


@torch.no_grad()
def predict_bands(
    model: FlowNet, read: Callable[[int, int], torch.Tensor], h: int, w: int, tile: int | None = None, overlap: int = 32,
    batch: int = 8, smooth_px: float = 0.0, edges: bool = False, dihedral: bool = False, bar=None,
) -> Iterator[tuple[int, torch.Tensor]]:  # fmt: skip
    """Canonical (v1, v2, v3, z0, w) maps of one image of ``h`` x ``w`` px, in bands of rows.

    ``read(y0, y1)`` gives camera counts (1, y1 - y0, w) of rows y0..y1. Yields (first row, maps
    (5, rows, w) float32 on the CPU), top to bottom, so memory stays bounded by a band (a few tile
    rows and the smoothing margin) whatever the image size. Images larger than ``tile`` are cut
    into overlapping tiles whose raw outputs (doubled-angle channels and logits, which blend
    linearly) are averaged with ramp weights, smoothed over ``smooth_px``, preserving edges where
    ``edges`` (blurflow.model.smooth_outputs; a model file holds the readout chosen on its validation set),
    then decoded: the same maps as on the whole image. ``dihedral``: each tile's outputs are the
    mean over its 8 rotations and reflections (blurflow.model.dihedral_outputs; 8x the time; a
    model file says whether its validation set chose it). ``bar.update(n)`` is called per batch of
    ``n`` tiles. Runs on the model's device.
    """
    device = next(model.parameters()).device
    tile = tile or max(h, w)
    th, tw = min(tile, h), min(tile, w)
    ov = min(overlap, th // 2, tw // 2)
    weight = (_window(th, ov if h > th else 0)[:, None] * _window(tw, ov if w > tw else 0)[None]).to(device)
    ys, xs = _starts(h, th, th - ov), _starts(w, tw, tw - ov)
    margin = smoothing_reach(smooth_px, edges)  # rows of context the smoothing reads
    rows_per_band = max(1, -(-batch // len(xs)))  # tile rows inferred together: full batches on narrow images
    acc = torch.zeros(5, 0, w, device=device)  # raw sums of unfinished rows, from row a0
    norm = torch.zeros(1, 0, w, device=device)
    done = torch.zeros(5, 0, w, device=device)  # finished raw rows from row d0, kept for the smoothing
    a0 = d0 = emitted = 0
    for k in range(0, len(ys), rows_per_band):
        band = ys[k : k + rows_per_band]
        extra = band[-1] + th - (a0 + acc.shape[1])
        if extra > 0:
            acc = torch.cat([acc, acc.new_zeros(5, extra, w)], 1)
            norm = torch.cat([norm, norm.new_zeros(1, extra, w)], 1)
        strip = read(band[0], band[-1] + th).float()
        boxes = [(y, x) for y in band for x in xs]
        for b in range(0, len(boxes), batch):
            chunk = boxes[b : b + batch]
            tiles = torch.stack([strip[:, y - band[0] : y - band[0] + th, x : x + tw] for y, x in chunk]).to(device)
            raw = raw_outputs(model, tiles, dihedral)
            for (y, x), r in zip(chunk, raw):
                acc[:, y - a0 : y - a0 + th, x : x + tw] += r * weight
                norm[:, y - a0 : y - a0 + th, x : x + tw] += weight
            if bar is not None:
                bar.update(len(chunk))
        finished = (ys[k + rows_per_band] if k + rows_per_band < len(ys) else h) - a0  # no later tile reaches these rows
        done = torch.cat([done, acc[:, :finished] / norm[:, :finished]], 1)
        acc, norm, a0 = acc[:, finished:], norm[:, finished:], a0 + finished
        end = h if a0 == h else a0 - margin
        if end > emitted:
            s0 = max(d0, emitted - margin)
            raw = done[None, :, s0 - d0 : min(h, end + margin) - d0]
            yield emitted, _smoothed(raw, smooth_px, edges, margin, model.encoding)[0, :, emitted - s0 : end - s0].cpu()
            keep = max(d0, end - margin)
            done, d0, emitted = done[:, keep - d0 :], keep, end


def predict(
    model: FlowNet, counts: torch.Tensor, tile: int | None = None, overlap: int = 32, batch: int = 8, smooth_px: float = 0.0, edges: bool = False,
    dihedral: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Canonical (v1, v2, v3, z0, w) maps (N, 5, H, W) float32 on the CPU for camera counts
    (N, 1, H, W), image by image with :func:`predict_bands`."""
    n, _, h, w = counts.shape
    out = torch.empty(n, 5, h, w)
    for i in range(n):
        for y0, maps in predict_bands(model, lambda a, b, i=i: counts[i, :, a:b], h, w, tile, overlap, batch, smooth_px, edges, dihedral):
            out[i, :, y0 : y0 + maps.shape[1]] = maps
    return out


class FlowMetrics:
    """Streaming metrics over valid pixels (float64 sums; exact for any batching)."""

    def __init__(self) -> None:
        self.sums = torch.zeros(7, 4, dtype=torch.float64)  # n, sx, sy, sxx, syy, sxy, sum|x - y|
        self.per_image: list[torch.Tensor] = []  # (B, 6, 4) n ... sxy of each image: the bootstrap's units
        self.orientation = torch.zeros(181, dtype=torch.float64)  # histogram, 0.5 degree bins

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        """pred (B, >=4, H, W) canonical, target (B, 4, H, W) canonical, valid (B, 1, H, W)."""
        x = pred[:, :4].detach().double().cpu().clone()
        y = target[:, :4].detach().double().cpu().clone()
        m = (valid.detach().cpu() > 0.5).expand_as(y)
        lateral_x, lateral_y = x[:, :2].clone(), y[:, :2].clone()
        x[:, :2], y[:, :2] = x[:, :2].abs(), y[:, :2].abs()
        x, y = torch.where(m, x, 0), torch.where(m, y, 0)
        dims = (2, 3)
        stats = [m.sum(dims).double(), x.sum(dims), y.sum(dims), (x * x).sum(dims), (y * y).sum(dims), (x * y).sum(dims), (x - y).abs().sum(dims)]
        per_image = torch.stack(stats, 1)  # (B, 7, 4)
        self.sums += per_image.sum(0)
        self.per_image.append(per_image[:, :6])
        moving = m[:, 0] & (torch.hypot(lateral_y[:, 0], lateral_y[:, 1]) > ORIENTATION_MIN_SPEED)
        diff = torch.atan2(lateral_x[:, 1], lateral_x[:, 0]) - torch.atan2(lateral_y[:, 1], lateral_y[:, 0])
        deg = torch.rad2deg(torch.remainder(diff, math.pi))
        deg = torch.minimum(deg, 180 - deg)[moving]
        self.orientation += torch.bincount((deg * 2).round().long().clamp(0, 180), minlength=181).double()

    def r2(self) -> dict[str, float]:
        """Squared Pearson correlation per component and their mean (NaN components skipped)."""
        r2 = _pearson_r2(self.sums[:6])
        out = {c: float(v) for c, v in zip(COMPONENTS, r2)}
        out["mean"] = float(np.nanmean(r2.numpy())) if torch.isfinite(r2).any() else math.nan
        return out

    def r2_interval(self, resamples: int = BOOTSTRAP, seed: int = 0) -> dict[str, list[float]]:
        """The 95 % bootstrap interval of each :meth:`r2` value over the images (the images drawn
        with replacement ``resamples`` times; percentiles 2.5 and 97.5): the spread a new draw of
        as many test images gives."""
        images = torch.cat(self.per_image)  # (N, 6, 4)
        counts = torch.from_numpy(np.random.default_rng(seed).multinomial(len(images), np.full(len(images), 1 / len(images)), resamples)).double()
        r2 = _pearson_r2(torch.einsum("rn,nsc->rsc", counts, images).permute(1, 0, 2))  # (resamples, 4)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a component NaN in every resample
            values = np.concatenate([r2.numpy(), np.nanmean(r2.numpy(), 1, keepdims=True)], 1)
            lo, hi = np.nanpercentile(values, [2.5, 97.5], axis=0)
        return {c: [float(a), float(b)] for c, a, b in zip((*COMPONENTS, "mean"), lo, hi)}

    def compute(self, scales: Mapping, pixel_um: float) -> dict:
        """All metrics; ``scales`` has lateral_scale_px and axial_scale_um (for physical units)."""
        n, _, sy, sxx, syy, sxy, sad = self.sums
        ss_tot = syy - sy * sy / n
        ss_res = sxx - 2 * sxy + syy
        det = torch.where(ss_tot > 1e-12 * n, 1 - ss_res / ss_tot, torch.nan)
        to_um = torch.tensor([scales["lateral_scale_px"] * pixel_um] * 2 + [scales["axial_scale_um"]] * 2, dtype=torch.float64)
        mae = sad / n * to_um
        hist = self.orientation
        cdf = torch.cumsum(hist, 0) / hist.sum().clamp(min=1)
        centres = torch.arange(181, dtype=torch.float64) / 2
        return {
            "pixels": int(n[0]),
            "r2_pearson": self.r2(),
            "r2_pearson_ci95": self.r2_interval(),
            "r2_determination": {c: float(v) for c, v in zip(COMPONENTS, det)},
            "orientation_error_deg": {
                "mean": float((hist * centres).sum() / hist.sum()) if hist.sum() else math.nan,
                "median": float(centres[int(torch.searchsorted(cdf, torch.tensor(0.5, dtype=torch.float64)))]) if hist.sum() else math.nan,
                "pixels": int(hist.sum()),
            },
            "mae_um": {f"{c}": float(v) for c, v in zip(COMPONENTS, mae)},
        }


def _pearson_r2(sums: torch.Tensor) -> torch.Tensor:
    """Squared Pearson correlation per component of sums (6, ..., 4): n, sx, sy, sxx, syy, sxy
    (NaN where a variance vanishes)."""
    n, sx, sy, sxx, syy, sxy = sums
    var_x, var_y = sxx - sx * sx / n, syy - sy * sy / n
    r2 = (sxy - sx * sy / n) ** 2 / (var_x * var_y)
    return torch.where((var_y > 1e-12 * n) & (var_x > 0), r2, torch.nan)


def predict_testset(
    model: FlowNet, testset: str | Path, out: str | Path, evaluated: int | None = None, tile: int | None = None, batch: int = 8,
    smooth_px: float = 0.0, edges: bool = False, dihedral: bool = False, progress: bool = True,
) -> None:  # fmt: skip
    """Predictions (N, 5, H, W) float16 for the first ``evaluated`` images of a test set (HDF5)."""
    ds = ShardDataset([testset])
    n = min(evaluated or len(ds), len(ds))
    h, w = ds[0]["image"].shape[-2:]
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        pred = f.create_dataset("pred", (n, 5, h, w), np.float16, chunks=(1, 5, h, w), compression="lzf")
        f.attrs["channels"] = "v1,v2,v3,z0,w (canonical, normalised units)"
        f.attrs["testset"] = str(testset)
        for start in logs.progress(range(0, n, batch), enabled=progress, desc=f"predict {Path(testset).stem}", unit="batch"):
            idx = range(start, min(start + batch, n))
            counts = torch.stack([ds[i]["image"] for i in idx])
            pred[start : idx.stop] = (
                predict(model, counts, tile=tile, batch=batch, smooth_px=smooth_px, dihedral=dihedral, edges=edges).numpy().astype(np.float16)
            )
    log.info(
        "predicted %d images of %d x %d px (tiles of %s px, smoothing %g px%s%s) in %.1f s",
        n, h, w, tile or "whole", smooth_px, ", edge-preserving" if edges else "", ", mean over 8 rotations and reflections" if dihedral else "",
        time.perf_counter() - t0,
    )  # fmt: skip


def evaluate_testset(testset: str | Path, predictions: str | Path, name: str, paper_r2: float | None = None) -> dict:
    """Metrics of a prediction file against its test set."""
    ds = ShardDataset([testset])
    metrics = FlowMetrics()
    with h5py.File(predictions) as f:
        pred = f["pred"]
        for i in range(pred.shape[0]):
            item = ds[i]
            metrics.update(torch.from_numpy(pred[i : i + 1].astype(np.float32)), item["target"][None], item["valid"][None])
    scales = ds.attrs["scales"]
    out = {"test_set": name, "images": int(pred.shape[0]), **metrics.compute(scales, Optics.from_config(ds.attrs["optics"]).pixel_um)}
    out["paper_r2"] = paper_r2
    return out


def write_metrics(metrics: dict, json_path: str | Path, csv_path: str | Path) -> None:
    """Metrics as JSON and as a per-component CSV table (pandas/spreadsheet friendly)."""
    Path(json_path).write_text(json.dumps(metrics, indent=2))
    rows = [
        {
            "component": c,
            "r2_pearson": metrics["r2_pearson"][c],
            "r2_pearson_lo": metrics["r2_pearson_ci95"][c][0],
            "r2_pearson_hi": metrics["r2_pearson_ci95"][c][1],
            "r2_determination": metrics["r2_determination"][c],
            "mae": metrics["mae_um"][c],
            "mae_unit": "um" if c == "z0" else "um per exposure",
        }
        for c in COMPONENTS
    ]
    ci = metrics["r2_pearson_ci95"]["mean"]
    mean = {"r2_pearson": metrics["r2_pearson"]["mean"], "r2_pearson_lo": ci[0], "r2_pearson_hi": ci[1], "paper_r2_pearson": metrics["paper_r2"]}
    rows.append({"component": "mean", **mean})
    pd.DataFrame(rows).to_csv(csv_path, index=False)


def table1_rows(testset: str | Path, predictions: str | Path, fits: str | Path | None = None) -> pd.DataFrame:
    """Table 1: per case, the true motion, the network's prediction averaged over the valid pixels
    of its images (all pixels when none is valid), the paper's prediction and, with ``fits`` (the
    CSV of blurflow.particles.fit_testset on the same test set), the particle fit averaged over the
    case's beads (``fit_*``, lateral sign as in the paper where the direction is not resolved;
    NaN for the texture case)."""
    ds = ShardDataset([testset])
    cases = ds.attrs["cases"]
    with h5py.File(predictions) as f:
        pred = f["pred"][()].astype(np.float64)
    fitted = pd.read_csv(fits) if fits is not None else None
    rows = []
    for case in dict.fromkeys(cases):
        idx = [i for i, c in enumerate(cases) if c == case and i < len(pred)]
        values = []
        for i in idx:
            m = ds[i]["valid"][0].numpy() > 0.5
            values.append(pred[i, :4][:, m] if m.any() else pred[i, :4].reshape(4, -1))
        mean = np.concatenate(values, 1).mean(1) if values else np.full(4, np.nan)
        truth = TABLE1[case][0]
        row = {
            "case": case,
            "source": TABLE1[case][1],
            **dict(zip(COMPONENTS, truth)),
            **{f"pred_{c}": float(v) for c, v in zip(COMPONENTS, mean)},
            **{f"paper_{c}": v for c, v in zip(COMPONENTS, TABLE1_PAPER[case])},
            "images": len(idx),
        }
        if fitted is not None:
            beads = fitted[fitted["image"].isin([i for i, c in enumerate(cases) if c == case])]
            fit = paper_sign(beads[list(COMPONENTS)].to_numpy(), beads["direction_resolved"].to_numpy(bool)).mean(0) if len(beads) else np.full(4, np.nan)
            row |= {f"fit_{c}": float(v) for c, v in zip(COMPONENTS, fit)} | {"beads_fitted": len(beads)}
        rows.append(row)
    return pd.DataFrame(rows)


def bead_estimates(testset: str | Path, predictions: str | Path) -> np.ndarray:
    """The network's estimate of every bead of a bead test set (image by image, bead by bead; the
    beads of the grid, or each image's own list on the dense set): its predicted (v1, v2, v3, z0)
    averaged over the valid pixels of the bead's region (all the region's pixels when none is
    valid). (M, 4) float64, canonical."""
    ds = ShardDataset([testset])
    with h5py.File(predictions) as f:
        pred = f["pred"][()].astype(np.float64)
    out = []
    for i in range(len(pred)):
        item = ds[i]
        region, valid = item["region"].numpy(), item["valid"][0].numpy() > 0.5
        rows = ds.attrs["bead_rows"][i] if isinstance(ds.attrs["bead_rows"][0], list) else ds.attrs["bead_rows"]
        for r in range(len(rows)):
            mask = (region == r) & valid
            mask = mask if mask.any() else region == r
            out.append(pred[i, :4][:, mask].mean(1))
    return np.array(out)
