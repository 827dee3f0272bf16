"""Particle mode, detection: the streaks of an image, their fit windows and which of them are neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TOUCH_PX = 12  # px between two streaks' detected pixels within which their light is fitted together (defocus tails)
MASK_GROWTH_PX = 3  # px around a streak's detected pixels that its light still reaches (PSF tails)


@dataclass
class Detection:
    """The streaks found in an image: ``centres`` (N, 2) integer (row, col) of each fit window's
    centre, ``labels`` (H, W) int32 of the streaks kept (1..N, 0 elsewhere), ``neighbours`` (P, 2)
    pairs (i, j) of kept streaks where j has pixels in i's window (both ways), ``unfitted`` (H, W)
    bool: the pixels of light that no fit explains (streaks at the border, merged blobs), grown by
    MASK_GROWTH_PX; ``rejected`` {reason: count} for streaks left out, ``merged`` (M, 2) float
    (row, col) centroids of blobs wider than the fit window: several particles that no single
    streak explains, and ``touching`` (T, 2): the neighbours whose light reaches each other's
    streak (pixels within twice MASK_GROWTH_PX): fitted together."""

    centres: np.ndarray
    labels: np.ndarray
    neighbours: np.ndarray
    unfitted: np.ndarray
    rejected: dict[str, int]
    merged: np.ndarray
    touching: np.ndarray

    def groups(self) -> np.ndarray:
        """(N,) the connected group of each streak under the ``touching`` relation (0, 1, ...):
        streaks of one group are fitted together."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(self.centres)
        graph = coo_matrix((np.ones(len(self.touching)), (self.touching[:, 0], self.touching[:, 1])), shape=(n, n))
        return connected_components(graph, directed=False)[1] if n else np.zeros(0, np.int64)


def detect(
    image: np.ndarray, window: int = 64, sigma_px: float = 1.5, threshold: float = 5.0, min_area_px: int = 6, own: tuple[int, int, int, int] | None = None,
) -> Detection:  # fmt: skip
    """Streaks in a camera image (H, W): the image smoothed by a Gaussian of ``sigma_px`` minus its
    background (median over blocks of ``window`` px, interpolated), thresholded at ``threshold``
    noise standard deviations (median absolute deviation of the smoothed residual); the connected
    components of at least ``min_area_px`` pixels are streaks. A component wider than the window
    (its largest extent) is several particles merged ('merged'); a streak is kept when a
    ``window`` px window centred on it lies inside the image (else 'border'). Kept streaks whose
    windows hold each other's pixels are neighbours (fitted together, blurflow.particles.fit_frames).
    ``own`` (row0, row1, col0, col1): the part of a piece of a larger image that is its own; the
    streaks centred outside it are kept to be fitted with their neighbours but neither counted
    among the rejected nor reported as merged (the piece beside it does)."""
    from scipy import ndimage
    from skimage import measure, transform

    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape
    smooth = ndimage.gaussian_filter(image, sigma_px)
    block = max(8, window)
    coarse = measure.block_reduce(smooth, (block, block), np.nanmedian, cval=np.nan)  # partial edge blocks: their own pixels
    background = transform.resize(coarse, (h, w), order=1, mode="edge", anti_aliasing=False)
    residual = smooth - background
    noise = 1.4826 * np.median(np.abs(residual - np.median(residual))) + 1e-6
    labels = measure.label(residual > threshold * noise)
    regions = [r for r in measure.regionprops(labels, intensity_image=np.clip(residual, 0, None)) if r.area >= min_area_px]
    half = window // 2
    rejected = {"border": 0, "merged": 0}
    keep, centres, merged, lost = [], [], [], []
    for region in regions:
        cy, cx = (round(c) for c in region.centroid_weighted)
        counted = own is None or (own[0] <= cy < own[1] and own[2] <= cx < own[3])
        if region.feret_diameter_max > window:
            rejected["merged"] += counted
            if counted:
                merged.append(region.centroid_weighted)
            lost.append(region.label)
        elif cy - half < 0 or cx - half < 0 or cy + half > h or cx + half > w:
            rejected["border"] += counted
            lost.append(region.label)
        else:
            keep.append(region.label)
            centres.append((cy, cx))
    index = np.zeros(labels.max() + 1, np.int32)
    index[keep] = np.arange(1, len(keep) + 1)
    kept = index[labels]
    unfitted = ndimage.binary_dilation(np.isin(labels, lost), iterations=MASK_GROWTH_PX) if lost else np.zeros((h, w), bool)
    centres = np.array(centres, dtype=np.int64).reshape(-1, 2)
    near, touching = neighbour_pairs(kept, centres, window)
    return Detection(centres, kept, near, unfitted, rejected, np.array(merged, dtype=np.float64).reshape(-1, 2), touching)


def neighbour_pairs(labels: np.ndarray, centres: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of (P, 2) sorted pairs (i, j), both ways, of streaks (``labels`` 1..N of the
    image): j has pixels in the ``window`` px window centred on streak i's ``centres`` (row,
    col); and of those, j has pixels within 2 MASK_GROWTH_PX of i's (their light touches)."""
    from scipy import ndimage

    half, reach = window // 2, TOUCH_PX
    pairs = {
        pair
        for i, (cy, cx) in enumerate(centres)
        for j in np.unique(labels[cy - half : cy + half, cx - half : cx + half])
        if j and j - 1 != i
        for pair in ((i, int(j) - 1), (int(j) - 1, i))
    }  # fmt: skip
    touching = set()
    for i, box in enumerate(ndimage.find_objects(labels, len(centres))):
        if box is None:
            continue
        box = tuple(slice(max(b.start - reach, 0), b.stop + reach) for b in box)
        near = ndimage.binary_dilation(labels[box] == i + 1, iterations=reach)
        touching |= {pair for j in np.unique(labels[box][near]) if j and j - 1 != i for pair in ((i, int(j) - 1), (int(j) - 1, i))}
    return tuple(np.array(sorted(p), dtype=np.int64).reshape(-1, 2) for p in (pairs, touching))


def windows(image: np.ndarray, centres: np.ndarray, window: int) -> torch.Tensor:
    """The ``window`` px windows (N, window, window) float32 of ``image`` centred on ``centres``
    (row, col): pixel (window // 2, window // 2) of a window is its centre."""
    half = window // 2
    return (
        torch.from_numpy(np.stack([image[y - half : y + half, x - half : x + half] for y, x in centres]).astype(np.float32))
        if len(centres)
        else torch.zeros(0, window, window)
    )
