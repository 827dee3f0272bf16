"""A flow field on a grid from particles or tracks (as PIV tools give one): the mean velocity of
the beads in each cell, each weighted by its inverse variance, with its standard error; and the
network's flow maps (``blurflow predict``'s ``*_flow.tif``) on the same cells, for a comparison cell
by cell. Cells are squares from x = y = 0 (the centre of the image's first pixel).

Columns follow openpiv's where they exist: ``x``, ``y`` (the cell's centre, um), ``u``, ``v`` (the
lateral velocity) plus ``w`` (the axial one) and ``z`` (the depth bin's centre, um), each velocity
with its standard error (``u_se``, ...), ``count`` (beads in the cell) and ``speed_unit``. Only
signed velocities count: a tracks table's points on linked tracks (>= 2 points: a velocity its
neighbouring point confirms; blurflow.tracks cuts a track where they disagree) whose direction is
known (``direction`` 'fit' or 'track'), a particle table's rows whose direction the exposure resolved; where the depth is
folded (a PSF symmetric in depth) z is the depth from focus, >= 0. A flow map's pixels count where
w > VALID, each weighted by w; its lateral motion is an orientation (v >= 0), its w is v3 (away
from focus) and its z is z0.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

OUTLIER = 4.0  # robust scatters (or the bead's own std) from its cell's median beyond which a bead does not count
VALID = 0.5  # w above which a flow map's pixel counts
DEPTH_PERCENTILE = 1.0  # the depth bins span the beads' depths from this percentile to 100 minus it
FLOW_CHANNELS = ("v1", "v2", "v3", "z0", "w")  # of a *_flow.tif (blurflow predict), in order
FIELD_COLUMNS = ("x", "y", "z", "u", "v", "w", "u_se", "v_se", "w_se", "count", "speed_unit")


class FieldError(ValueError):
    """A table that gives no field (one line naming why)."""


def signed_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """(the rows whose velocities are signed, with ``z_um``: those :func:`grid` counts; their speed
    unit); FieldError where none."""
    tracks = "direction" in table.columns
    if not tracks and "direction_resolved" not in table.columns:
        raise FieldError("not a blurflow particle or tracks table: neither 'direction' nor 'direction_resolved'")
    needed = ("x_um", "y_um", "z_um" if tracks else "z0_um", "v1", "v2", "v3", "v1_std", "v2_std", "v3_std")
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise FieldError(f"not a blurflow particle or tracks table: no column {', '.join(missing[:4])}")
    if tracks:
        linked = table.groupby("particle")["frame"].transform("size") >= 2 if "particle" in table.columns else True
        rows = table[table["direction"].isin(["fit", "track"]) & linked].copy()
        unit = "um/s"
    else:
        rows = table[table["direction_resolved"].astype(str).str.lower() == "true"].copy()
        unit = str(table["speed_unit"].dropna().iloc[0]) if "speed_unit" in table.columns and table["speed_unit"].notna().any() else "um/exposure"
        rows["z_um"] = rows["z0_um"]  # the depth at the exposure's start
    rows = rows[np.isfinite(rows[["z_um", *needed]].to_numpy(float)).all(1)]
    if not len(rows):
        raise FieldError("no bead with a signed velocity (directions unresolved: link the frames first, blurflow tracks)")
    return rows, unit


def grid(table: pd.DataFrame, cell_um: float, z_bins: int = 1) -> pd.DataFrame:
    """The field (FIELD_COLUMNS) of a particle or tracks table on square cells of ``cell_um`` um,
    in ``z_bins`` equal bins of depth over the beads' range (:func:`depth_range`): per cell and component, the
    inverse-variance weighted mean of the beads that are not outliers, and its standard error
    (:func:`_robust_means`). Cells without beads are left out. FieldError (one line) for a table
    that gives no field."""
    _check(cell_um, z_bins)
    return _gridded(*signed_rows(table), cell_um, z_bins)


def grid_flow(flow: np.ndarray, pixel_um: float, unit: str, cell_um: float, z_bins: int = 1) -> pd.DataFrame:
    """The field (FIELD_COLUMNS) of a flow map (T, 5, H, W) or (5, H, W) of ``blurflow predict``
    (v1, v2, v3 in ``unit``, z0 in um, w) on the cells of :func:`grid`: its pixels where w > VALID
    (every frame's), each weighted by w; ``count`` is pixels, and as neighbouring pixels see one
    blur, the standard error (their weighted scatter over sqrt(count - 1)) is a lower bound."""
    _check(cell_um, z_bins)
    flow = flow[None] if flow.ndim == 3 else flow
    keep = flow[:, 4] > VALID
    if not keep.any():
        raise FieldError(f"no pixel with w > {VALID}: the flow sees no texture to measure")
    _, y, x = np.nonzero(keep)
    std = 1e-12 / np.sqrt(flow[:, 4][keep])  # weights w; the standard error from the scatter alone
    rows = pd.DataFrame({"x_um": x * pixel_um, "y_um": y * pixel_um, "z_um": flow[:, 3][keep], "v1_std": std, "v2_std": std, "v3_std": std})
    rows["v1"], rows["v2"], rows["v3"] = flow[:, 0][keep], flow[:, 1][keep], flow[:, 2][keep]
    return _gridded(rows, unit, cell_um, z_bins)


def read_flow(path) -> tuple[np.ndarray, dict[str, str], float]:
    """(flow (T, 5, H, W), unit of each channel, pixel size in um) of a ``*_flow.tif`` of ``blurflow
    predict``; FieldError (one line) for another file."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            flow = tif.asarray()
            info = (tif.imagej_metadata or {}).get("Info", "")
            resolution = tif.pages[0].resolution
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise FieldError(f"not a readable TIFF ({exc.__class__.__name__})") from None
    units = json.loads(info) if info.startswith("{") else {}
    flow = flow[None] if flow.ndim == 3 else flow
    if list(units) != list(FLOW_CHANNELS) or flow.ndim != 4 or flow.shape[1] != len(units):
        raise FieldError(f"not a flow of blurflow predict (channels {', '.join(FLOW_CHANNELS)})")
    return flow, units, 1 / resolution[0]


def depth_range(z: np.ndarray) -> tuple[float, float]:
    """The depths (um) the depth bins span: the 1st to the 99th percentile of ``z``, so that a few
    depths fitted astray do not stretch the bins (those beyond count in the end bins)."""
    lo, hi = np.percentile(z, [DEPTH_PERCENTILE, 100 - DEPTH_PERCENTILE])
    return float(lo), float(hi)


def _check(cell_um: float, z_bins: int) -> None:
    if not (np.isfinite(cell_um) and cell_um > 0):
        raise FieldError(f"the cell must be a positive number of um, got {cell_um:g}")
    if z_bins < 1:
        raise FieldError(f"the depth bins must be >= 1, got {z_bins}")


def _gridded(rows: pd.DataFrame, unit: str, cell_um: float, z_bins: int) -> pd.DataFrame:
    """FIELD_COLUMNS of ``rows`` (x_um, y_um, z_um, v1, v2, v3 and their std): the cells of
    :func:`grid`, the means of :func:`_robust_means`."""
    x, y, z = (rows[c].to_numpy(float) for c in ("x_um", "y_um", "z_um"))
    lo, hi = depth_range(z)
    depth = np.clip(np.floor((z - lo) / max(hi - lo, 1e-9) * z_bins), 0, z_bins - 1).astype(int)
    key = pd.DataFrame({"i": np.floor(x / cell_um).astype(int), "j": np.floor(y / cell_um).astype(int), "k": depth})
    by = key.groupby(["i", "j", "k"])
    cells, group = by.size(), by.ngroup().to_numpy()  # sorted by cell, as ngroup numbers them
    i, j, k = (cells.index.get_level_values(n).to_numpy() for n in ("i", "j", "k"))
    out = {"x": (i + 0.5) * cell_um, "y": (j + 0.5) * cell_um, "z": lo + (k + 0.5) * (hi - lo) / z_bins}
    cluster = rows["particle"].to_numpy() if "particle" in rows.columns and "direction" in rows.columns else None  # tracks: a track's points together
    for name, col in (("u", "v1"), ("v", "v2"), ("w", "v3")):
        value, std = rows[col].to_numpy(float), np.maximum(rows[f"{col}_std"].to_numpy(float), 1e-300)
        out[name], out[f"{name}_se"] = _robust_means(value, std, group, len(cells), cluster)
    out["count"] = np.bincount(group, minlength=len(cells))
    out["speed_unit"] = unit
    return pd.DataFrame(out)[list(FIELD_COLUMNS)]


def _robust_means(value: np.ndarray, std: np.ndarray, group: np.ndarray, groups: int, cluster: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the inverse-variance weighted mean of ``value`` (std ``std``) over the beads within
    OUTLIER times the group's robust scatter (1.4826 x the median absolute deviation from the
    median, or the bead's own std where larger) of its median, and its standard error: the larger
    of the weights' (1 / sqrt of their sum) and the kept beads' weighted scatter over sqrt(n - 1),
    or with ``cluster`` (a track id per bead) the scatter of the clusters' weighted sums (a
    cluster-robust error: one bead's fits in successive frames share its depth and blur, so they
    are not independent). A fit gone astray (a lateral motion fitted as axial, with a small std)
    would otherwise outweigh the rest of its cell."""
    median = pd.Series(value).groupby(group).transform("median").to_numpy()
    mad = 1.4826 * pd.Series(np.abs(value - median)).groupby(group).transform("median").to_numpy()
    kept = np.abs(value - median) <= OUTLIER * np.maximum(mad, std)
    weight = np.where(kept, 1 / std**2, 0.0)
    total = np.bincount(group, weight, minlength=groups)
    mean = np.bincount(group, weight * value, minlength=groups) / total
    residual = weight * (value - mean[group])
    if cluster is None:
        n = np.bincount(group, kept, minlength=groups)
        scatter = np.bincount(group, residual * (value - mean[group]), minlength=groups) / total / np.maximum(n - 1, 1)
    else:
        sums = pd.DataFrame({"g": group, "c": cluster, "r": residual, "k": kept}).groupby(["g", "c"]).sum()
        sums = sums[sums["k"] > 0]
        g = sums.index.get_level_values("g").to_numpy()
        clusters = np.bincount(g, minlength=groups)
        scatter = np.bincount(g, sums["r"].to_numpy() ** 2, minlength=groups) / total**2 * clusters / np.maximum(clusters - 1, 1)
    return mean, np.sqrt(np.maximum(1 / total, scatter))
