"""napari readers of blurflow's outputs, as layer data tuples ``(data, kwargs, layer type)``.

Layers are in the pixels of the input image (scale 1, as napari opens the image itself), so that
they lie over it; a stack's frames are the first axis. The units are in each layer's metadata.

- ``*_flow.tif`` (blurflow predict): an image layer per channel (v1, v2, v3, z0, w) and a Vectors
  layer of the lateral motion on a grid where w > 0.5 (segments: an orientation).
- ``*_particles.csv`` (blurflow particles): Points (rings) at the path midpoints coloured by v3 (the whole
  row as the points' features) and Vectors along each lateral path over the exposure; merged blobs
  as red crosses.
- ``*_tracks.csv`` (blurflow tracks): a Tracks layer (track id, frame, y, x) coloured by v3, with
  the depth and velocities as its features.
- ``*_field.csv`` (blurflow field): Vectors of (u, v) per cell, in um, coloured by w.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from blurflow import field

COLORMAPS = dict(zip(field.FLOW_CHANNELS, ("PiYG", "PiYG", "plasma", "viridis", "gray")))
ARROWS = 32  # lateral-motion segments of a flow along its longer side

LayerData = tuple  # (data, kwargs, layer type): napari.types.LayerDataTuple


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """The reader of a blurflow output (npe2 ``readers`` contribution), None for any other file."""
    if isinstance(path, list):
        return None
    name = Path(path).name.lower()
    for suffix, reader in READERS.items():
        if name.endswith(suffix):
            return reader
    return None


def read(path: str | Path) -> list[LayerData]:
    """The layers of any blurflow output (ValueError for another file)."""
    reader = get_reader(str(path))
    if reader is None:
        raise ValueError(f"{path}: not an output of blurflow ({', '.join('*' + s for s in READERS)})")
    return reader(str(path))


def read_flow(path: str) -> list[LayerData]:
    """``*_flow.tif``: an image layer per channel (named by the file's own metadata: v1, v2, v3
    with a symmetric or zero-based range, z0, w; only v3 and the vectors shown at first) and the
    lateral motion as a Vectors layer."""
    try:
        flow, units, _ = field.read_flow(path)
    except field.FieldError as exc:
        raise ValueError(f"{path}: {exc}") from None
    stem = Path(path).name.removesuffix(".tif")
    layers = []
    for c, (name, unit) in enumerate(units.items()):
        data = flow[:, c] if len(flow) > 1 else flow[0, c]
        finite = data[np.isfinite(data)]
        top = float(np.abs(finite).max()) if finite.size else 1.0
        limits = (-top, top) if name in ("v1", "v2") else (0.0, 1.0) if name == "w" else (float(finite.min()) if finite.size else 0.0, top)
        layers.append((
            data,
            {"name": f"{stem} {name}", "colormap": COLORMAPS[name], "contrast_limits": limits if limits[1] > limits[0] else None,
             "visible": name == "v3", "metadata": {"path": str(path), "unit": unit}},
            "image",
        ))  # fmt: skip
    layers.append(_flow_vectors(flow, stem, path, units["v1"]))
    return layers


def _flow_vectors(flow: np.ndarray, stem: str, path: str, unit: str) -> LayerData:
    """Headless segments of the lateral motion (v1 along columns, v2 along rows) on a grid of
    ARROWS along the longer side, where w > field.VALID, centred on their grid points; the longest is
    one grid step long."""
    t, _, h, w = flow.shape
    step = max(1, max(h, w) // ARROWS)
    yy, xx = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    v1, v2, v3, valid = flow[:, 0, yy, xx], flow[:, 1, yy, xx], flow[:, 2, yy, xx], flow[:, 4, yy, xx] > field.VALID
    frame, y, x = (np.broadcast_to(a, valid.shape)[valid] for a in (np.arange(t)[:, None, None], yy, xx))
    scale = step / max(float(np.hypot(v1, v2)[valid].max()) if valid.any() else 0.0, 1e-12)
    dy, dx = v2[valid] * scale, v1[valid] * scale
    vectors = np.stack([np.stack([frame, y - dy / 2, x - dx / 2], 1), np.stack([np.zeros_like(dy), dy, dx], 1)], 1)  # (N, 2, 3)
    features = pd.DataFrame({"v1": v1[valid], "v2": v2[valid], "v3": v3[valid]})
    kwargs = {
        "name": f"{stem} lateral motion", "features": features, "edge_color": "v3", "edge_colormap": "plasma", "edge_width": max(1.0, step / 10),
        "vector_style": "line", "metadata": {"path": str(path), "unit": unit, "px_per_unit": scale},
    }  # fmt: skip
    return (vectors if t > 1 else vectors[:, :, 1:]), kwargs, "vectors"


def _fitted(table: pd.DataFrame) -> np.ndarray:
    return np.isfinite(table["v3"].to_numpy(float))


def read_particles(path: str) -> list[LayerData]:
    """``*_particles.csv``: Points (frame, y, x) of the fitted particles coloured by v3 with the
    table's columns as features, Vectors of their lateral paths over the exposure (from the start
    to the end), and the merged blobs as red crosses."""
    table = pd.read_csv(path)
    stem = Path(path).name.removesuffix(".csv")
    fitted = _fitted(table)
    rows, blobs = table[fitted].reset_index(drop=True), table[~fitted]
    unit = str(rows["speed_unit"].iloc[0]) if len(rows) else ""
    centre = rows[["frame", "y_px", "x_px"]].to_numpy(float)
    meta = {"path": str(path), "unit": unit}
    layers = [(
        centre, {"name": f"{stem}", "features": rows, "face_color": "transparent", "border_color": "v3", "border_colormap": "plasma",
                 "border_width": 0.15, "size": 12, "metadata": meta}, "points",
    )]  # fmt: skip
    path_px = rows[["dy_px", "dx_px"]].fillna(0).to_numpy(float)
    start = np.concatenate([centre[:, :1], centre[:, 1:] - path_px / 2], 1)
    projection = np.concatenate([np.zeros((len(rows), 1)), path_px], 1)
    layers.append((np.stack([start, projection], 1), {
        "name": f"{stem} paths", "features": rows[["v1", "v2", "v3", "z0_um"]], "edge_color": "v3", "edge_colormap": "plasma", "edge_width": 2.0,
        "vector_style": "arrow", "metadata": meta,
    }, "vectors"))  # fmt: skip
    if len(blobs):
        layers.append((blobs[["frame", "y_px", "x_px"]].to_numpy(float), {
            "name": f"{stem} merged", "symbol": "x", "face_color": "red", "border_color": "red", "size": 10, "metadata": meta,
        }, "points"))  # fmt: skip
    return layers


def read_tracks(path: str) -> list[LayerData]:
    """``*_tracks.csv``: a Tracks layer (track id, frame, y, x in px) coloured by v3, with the
    depth (z_um), velocities and their std as features."""
    table = pd.read_csv(path)
    numeric = table.select_dtypes("number").drop(columns=["particle", "frame"])
    data = table[["particle", "frame", "y", "x"]].to_numpy(float)
    unit = "um/s"
    kwargs = {
        "name": Path(path).name.removesuffix(".csv"), "features": numeric.reset_index(drop=True), "color_by": "v3", "colormap": "plasma",
        "tail_length": 10, "tail_width": 2, "metadata": {"path": str(path), "unit": unit},
    }  # fmt: skip
    return [(data, kwargs, "tracks")]


def read_field(path: str) -> list[LayerData]:
    """``*_field.csv``: Vectors of the lateral field (u, v) at each cell's centre (um; one depth
    bin a frame where there are several), coloured by w, the longest one cell long."""
    field = pd.read_csv(path)
    cell = float(np.min(np.diff(np.unique(field["x"])))) if field["x"].nunique() > 1 else 1.0
    peak = max(float(np.hypot(field["u"], field["v"]).max()), 1e-12)
    scale = cell / peak
    depth = np.searchsorted(np.unique(field["z"]), field["z"]).astype(float)
    start = np.stack([depth, field["y"] - field["v"] * scale / 2, field["x"] - field["u"] * scale / 2], 1)
    projection = np.stack([np.zeros(len(field)), field["v"] * scale, field["u"] * scale], 1)
    vectors = np.stack([start, projection], 1)
    if field["z"].nunique() == 1:
        vectors = vectors[:, :, 1:]
    kwargs = {
        "name": Path(path).name.removesuffix(".csv"), "features": field.select_dtypes("number"), "edge_color": "w", "edge_colormap": "coolwarm",
        "edge_width": cell / 10, "vector_style": "arrow", "metadata": {"path": str(path), "unit": str(field["speed_unit"].iloc[0]), "length_unit": "um"},
    }  # fmt: skip
    return [(vectors, kwargs, "vectors")]


READERS = {"_flow.tif": read_flow, "_particles.csv": read_particles, "_tracks.csv": read_tracks, "_field.csv": read_field}
