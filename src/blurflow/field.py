"""A flow field on a grid from particles or tracks (as PIV tools give one): the mean velocity of
the beads in each cell, each weighted by its inverse variance, with its standard error.

Columns follow openpiv's where they exist: ``x``, ``y`` (the cell's centre, um), ``u``, ``v`` (the
lateral velocity) plus ``w`` (the axial one) and ``z`` (the depth bin's centre, um), each velocity
with its standard error (``u_se``, ...), ``count`` (beads in the cell) and ``speed_unit``. Only
signed velocities count: a tracks table's rows whose direction is known (``direction`` 'fit' or
'track'), a particle table's rows whose direction the exposure resolved; where the depth is
folded (a PSF symmetric in depth) z is the depth from focus, >= 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

OUTLIER = 4.0  # robust scatters (or the bead's own std) from its cell's median beyond which a bead does not count
FIELD_COLUMNS = ("x", "y", "z", "u", "v", "w", "u_se", "v_se", "w_se", "count", "speed_unit")


class FieldError(ValueError):
    """A table that gives no field (one line naming why)."""


def _signed_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """(the rows whose velocities are signed, with ``z_um``; their speed unit); FieldError where none."""
    needed = ("x_um", "y_um", "v1", "v2", "v3", "v1_std", "v2_std", "v3_std")
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise FieldError(f"not a blurflow particle or tracks table: no column {', '.join(missing[:4])}")
    if "direction" in table.columns:  # tracks
        rows = table[table["direction"].isin(["fit", "track"])].copy()
        unit = "um/s"
    elif "direction_resolved" in table.columns:  # particles
        rows = table[table["direction_resolved"].astype(str).str.lower() == "true"].copy()
        unit = str(table["speed_unit"].dropna().iloc[0]) if "speed_unit" in table.columns and table["speed_unit"].notna().any() else "um/exposure"
        if "z_um" not in rows.columns:
            rows["z_um"] = rows["z0_um"]  # the depth at the exposure's start
    else:
        raise FieldError("not a blurflow particle or tracks table: neither 'direction' nor 'direction_resolved'")
    rows = rows[np.isfinite(rows[list(needed)].to_numpy(float)).all(1)]
    if not len(rows):
        raise FieldError("no bead with a signed velocity (directions unresolved: link the frames first, blurflow tracks)")
    return rows, unit


def grid(table: pd.DataFrame, cell_um: float, z_bins: int = 1) -> pd.DataFrame:
    """The field (FIELD_COLUMNS) of a particle or tracks table on square cells of ``cell_um`` um
    from the beads' least x and y, in ``z_bins`` equal bins of depth over the beads' range: per
    cell and component, the inverse-variance weighted mean of the beads that are not outliers, and
    its standard error (:func:`_robust_means`). Cells without beads are left out. FieldError (one line) for a table that gives no field."""
    if not (np.isfinite(cell_um) and cell_um > 0):
        raise FieldError(f"the cell must be a positive number of um, got {cell_um:g}")
    if z_bins < 1:
        raise FieldError(f"the depth bins must be >= 1, got {z_bins}")
    rows, unit = _signed_rows(table)
    x, y, z = (rows[c].to_numpy(float) for c in ("x_um", "y_um", "z_um"))
    lo, hi = z.min(), z.max()
    depth = np.minimum(((z - lo) / max(hi - lo, 1e-9) * z_bins).astype(int), z_bins - 1)
    key = pd.DataFrame({"i": ((x - x.min()) // cell_um).astype(int), "j": ((y - y.min()) // cell_um).astype(int), "k": depth})
    by = key.groupby(["i", "j", "k"])
    cells, group = by.size(), by.ngroup().to_numpy()  # sorted by cell, as ngroup numbers them
    i, j, k = (cells.index.get_level_values(n).to_numpy() for n in ("i", "j", "k"))
    out = {"x": x.min() + (i + 0.5) * cell_um, "y": y.min() + (j + 0.5) * cell_um, "z": lo + (k + 0.5) * (hi - lo) / z_bins}
    for name, col in (("u", "v1"), ("v", "v2"), ("w", "v3")):
        value, std = rows[col].to_numpy(float), np.maximum(rows[f"{col}_std"].to_numpy(float), 1e-12)
        out[name], out[f"{name}_se"] = _robust_means(value, std, group, len(cells))
    out["count"] = np.bincount(group, minlength=len(cells))
    out["speed_unit"] = unit
    return pd.DataFrame(out)[list(FIELD_COLUMNS)]


def _robust_means(value: np.ndarray, std: np.ndarray, group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the inverse-variance weighted mean of ``value`` (std ``std``) over the beads within
    OUTLIER times the group's robust scatter (1.4826 x the median absolute deviation from the
    median, or the bead's own std where larger) of its median, and its standard error: the larger
    of the weights' (1 / sqrt of their sum) and the kept beads' weighted scatter over sqrt(n - 1).
    A fit gone astray (a lateral motion fitted as axial, with a small std) would otherwise outweigh
    the rest of its cell."""
    median = pd.Series(value).groupby(group).transform("median").to_numpy()
    mad = 1.4826 * pd.Series(np.abs(value - median)).groupby(group).transform("median").to_numpy()
    kept = np.abs(value - median) <= OUTLIER * np.maximum(mad, std)
    weight = np.where(kept, 1 / std**2, 0.0)
    total = np.bincount(group, weight, minlength=groups)
    mean = np.bincount(group, weight * value, minlength=groups) / total
    n = np.bincount(group, kept, minlength=groups)
    scatter = np.bincount(group, weight * (value - mean[group]) ** 2, minlength=groups) / total / np.maximum(n - 1, 1)
    return mean, np.sqrt(np.maximum(1 / total, scatter))
