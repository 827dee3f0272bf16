"""Tracks: the particles of a time series (``blurflow particles`` on a stack) linked across frames
in 3D by trackpy, each bead's position in the next frame predicted from its own velocity.

A single exposure measures a bead's velocity but, where its two ends are alike in sharpness
(``direction_resolved`` false), not the direction of time: (v1, v2, v3) and its opposite make the
same streak about the same midpoint. Such a bead is predicted in the direction its next frame and
its neighbours' evidence favour (:func:`_signs`); once linked, the track's own displacement gives
the direction (``direction``: 'fit', 'track' or 'unknown'), and overrules the exposure's where it
contradicts it clearly. A track is cut where two consecutive points' lateral velocities disagree
or where a point misses its predecessor's own prediction (:func:`_cut`): one of them is another
bead, or two streaks fitted as one. Positions are the path midpoints (x, y,
and the depth z0 + v3 T / 2 for an exposure T), in um; times in s from frame 0; velocities in um/s.
Where no depth is signed (a PSF symmetric in depth: z >= 0 folded), predicted depths fold too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd

NEEDED = (
    "frame", "x_px", "y_px", "x_um", "y_um", "z0_um", "v1", "v2", "v3", "v1_std", "v2_std", "v3_std", "x_std_px", "y_std_px", "z0_std_um",
    "speed_unit", "direction_resolved", "depth_sign_resolved", "photons",
)  # fmt: skip
SEARCH_SIGMAS = 5.0  # search range in standard deviations of the prediction (their 95th percentile over the beads, per axis)
TRACK_COLUMNS = (
    "particle", "frame", "t_s", "x", "y", "x_um", "y_um", "z_um", "v1", "v1_std", "v2", "v2_std", "v3", "v3_std", "z0_um", "z0_std_um",
    "direction", "depth_sign_resolved", "photons",
)  # fmt: skip
PASSES = 4  # linkings at most: each with the directions and velocities the previous one's tracks showed
OUTSIDE = 3.0  # the evidence distance (prediction std) of a prediction that leaves the field: about a poor match's
NEIGHBOURS = 6  # beads of a frame whose direction evidence counts for each bead's (_signs)
TRACK_SIGMAS = 3.0  # position std by which a track's displacement must contradict the exposure's direction to overrule it
GATE = 5.0  # std of its own prediction by which a linked point may miss it before the track is cut
MISMATCH = 8.0  # combined std by which the lateral velocities of a track's consecutive points may differ (either sign) before it is cut
_SCALED = ["_xs", "_ys", "_zs"]  # positions over the prediction's std per axis: linked with an isotropic search range


class TracksError(ValueError):
    """A particle table that cannot be linked (one line naming why)."""


def _checked(table: pd.DataFrame, frame_interval_s: float, exposure_s: float) -> pd.DataFrame:
    """The fitted rows of ``table`` (merged blobs and rows without a velocity left out), as a copy;
    TracksError naming what is wrong (trackpy missing included)."""
    try:
        import trackpy  # noqa: F401
    except ImportError:
        raise TracksError("linking needs trackpy: pip install 'blurflow[particles]'") from None
    for name, value in (("frame interval", frame_interval_s), ("exposure", exposure_s)):
        if not (np.isfinite(value) and value > 0):
            raise TracksError(f"the {name} must be a positive number of ms, got {value * 1000:g}")
    if "frame" not in table.columns:
        raise TracksError("the table has no 'frame' column: not a particle table of a stack (blurflow particles STACK.tif)")
    missing = [c for c in NEEDED if c not in table.columns]
    if missing:
        raise TracksError(f"not a blurflow particle table: no column {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    units = sorted(set(table["speed_unit"].dropna()))
    if not set(units) <= {"um/s", "um/exposure"}:
        raise TracksError(f"unknown speed_unit {units}: expected 'um/s' or 'um/exposure'")
    fitted = table[table["v1"].notna() & table["x_um"].notna()].copy()
    if fitted["frame"].nunique() < 2:
        raise TracksError(f"tracks need fitted particles in >= 2 frames, the table has them in {fitted['frame'].nunique()}")
    return fitted


def link(table: pd.DataFrame, frame_interval_s: float, exposure_s: float, memory: int = 0, search_sigmas: float = SEARCH_SIGMAS) -> pd.DataFrame:
    """Tracks (TRACK_COLUMNS; ``particle`` the track id, as trackpy names it) of a particle table
    (blurflow particles on a stack; ``frame`` the plane), frames ``frame_interval_s`` apart, each
    exposed ``exposure_s``: trackpy.link in 3D with a predictor that moves each bead by its own
    velocity, a search range of ``search_sigmas`` times the prediction's std (position std of both
    ends and velocity std times the interval: 95th percentile over the beads, per axis), beads
    missing for up to ``memory`` frames; where too many beads compete for links the range shrinks
    there (trackpy's adaptive search, down to a tenth). TracksError (one line) for a table that cannot be linked."""
    rows = _checked(table, frame_interval_s, exposure_s)
    per_s = np.where(rows["speed_unit"] == "um/exposure", 1 / exposure_s, 1.0)
    for c in ("v1", "v1_std", "v2", "v2_std", "v3", "v3_std"):
        rows[c] = rows[c].to_numpy(float) * per_s
    rows["t_s"] = rows["frame"] * frame_interval_s
    rows["z_um"] = rows["z0_um"] + rows["v3"] * exposure_s / 2
    pixel_um = float(np.nanmedian(rows["x_um"] / rows["x_px"]))
    position_std = np.stack([rows["x_std_px"] * pixel_um, rows["y_std_px"] * pixel_um, rows["z0_std_um"]], 1).astype(float)
    velocity_std = rows[["v1_std", "v2_std", "v3_std"]].to_numpy(float)
    spread = np.sqrt(2 * position_std**2 + (velocity_std * frame_interval_s) ** 2)
    scale = np.maximum(np.nanpercentile(spread, 95, axis=0), pixel_um / 2)  # um per unit of search
    position = rows[["x_um", "y_um", "z_um"]].to_numpy(float)
    velocity = rows[["v1", "v2", "v3"]].to_numpy(float)
    signed_depth = bool(rows["depth_sign_resolved"].astype(bool).any())
    rows[_SCALED] = position / scale
    rows = rows.reset_index(drop=True)
    resolved = rows["direction_resolved"].astype(bool).to_numpy()
    seen = np.full(velocity.shape, np.nan)  # each row's velocity as its track shows it (from its previous point), um/s
    for _ in range(PASSES):  # each pass with the directions and velocities the previous one's tracks showed
        arrival = np.sign(np.nan_to_num((seen[:, :2] * velocity[:, :2]).sum(1)))  # the direction its arrival shows, 0 unknown
        known = np.where(arrival != 0, arrival, resolved.astype(float))  # a track's arrival overrules a chance resolution
        sign = _signs(rows, position, velocity, scale, frame_interval_s, signed_depth, search_sigmas, known)
        step = sign[:, None] * velocity
        off = np.linalg.norm((step - seen) * frame_interval_s / scale, axis=1) > search_sigmas / 2  # its own would miss (a fit gone astray)
        step[off] = seen[off]
        linked = _cut(_linked(rows, step / scale, frame_interval_s, signed_depth, search_sigmas, memory), frame_interval_s, pixel_um)
        arrived = _arrivals(linked, frame_interval_s)
        if np.array_equal(np.isnan(arrived), np.isnan(seen)) and np.allclose(arrived, seen, equal_nan=True):
            break
        seen = arrived
    _directions(linked, pixel_um)
    linked["x"], linked["y"] = linked["x_px"], linked["y_px"]
    return linked[list(TRACK_COLUMNS)]


def _linked(rows: pd.DataFrame, step: np.ndarray, interval_s: float, signed_depth: bool, reach: float, memory: int) -> pd.DataFrame:
    """``rows`` linked by trackpy on their scaled positions (_SCALED), each row predicted to move by
    ``step`` (N, 3) (scaled units per s) times the time to the frame it is linked to (depth folded
    where it is not ``signed_depth``); sorted by particle, frame, with ``_row``: the row's index."""
    import trackpy

    where = {(int(f), p.tobytes()): k for k, (f, p) in enumerate(zip(rows["frame"], rows[_SCALED].to_numpy(float)))}

    class Predict(trackpy.predict.NullPredict):
        def predict(self, t1, particles):
            out = []
            for p in particles:
                k = where[(int(p.t), np.asarray(p.pos, float).tobytes())]
                guess = p.pos + step[k] * (t1 - p.t) * interval_s
                if not signed_depth:
                    guess[2] = abs(guess[2])
                out.append(guess)
            return out

    with _quiet(), _ordered_points():
        try:
            linked = Predict().link_df(
                rows.assign(_row=np.arange(len(rows))), reach, pos_columns=_SCALED, t_column="frame", memory=memory, adaptive_stop=0.5, adaptive_step=0.9
            )
        except trackpy.SubnetOversizeException as exc:
            raise TracksError(f"too many candidate links in one place even at a tenth of the search range ({exc})") from None
    return linked.sort_values(["particle", "frame"]).reset_index(drop=True)


def _cut(linked: pd.DataFrame, interval_s: float, pixel_um: float) -> pd.DataFrame:
    """``linked`` (sorted by particle, frame) with each track cut between two consecutive points
    whose lateral velocities differ by more than MISMATCH times their combined std (whichever the
    sign of either: one of them is not the other's bead, or its fit is astray, two streaks fitted
    as one), or whose lateral displacement misses the first one's velocity times the time between
    them by more than GATE of that prediction's own std (its positions' and its velocity's; either
    sign): trackpy's one search range is wide for a precise bead, whose successor may be missing.
    Track ids renumbered from 0 in order."""
    velocity, std = linked[["v1", "v2"]].to_numpy(float), linked[["v1_std", "v2_std"]].to_numpy(float)
    position_std = linked[["x_std_px", "y_std_px"]].to_numpy(float) * pixel_um
    moved, frames = _from_previous(linked)  # NaN at a track's start: no cut there but the track's own
    moved, time = moved[1:, :2], (frames[1:] * interval_s)[:, None]
    apart = np.minimum(np.abs(velocity[1:] - velocity[:-1]), np.abs(velocity[1:] + velocity[:-1])) / np.hypot(std[1:], std[:-1])
    spread = np.sqrt(position_std[1:] ** 2 + position_std[:-1] ** 2 + (std[:-1] * time) ** 2)
    miss = np.minimum(np.abs(moved - velocity[:-1] * time), np.abs(moved + velocity[:-1] * time)) / spread
    track = linked["particle"].to_numpy()
    start = np.insert((track[1:] != track[:-1]) | (apart.max(1) > MISMATCH) | (np.hypot(*miss.T) > GATE), 0, True)
    return linked.assign(particle=np.cumsum(start) - 1)


def _from_previous(linked: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) each point's displacement (um) from the previous point of its track and (N,) the
    frames between them, NaN at a track's start; ``linked`` sorted by particle, frame."""
    track, frame = linked["particle"].to_numpy(), linked["frame"].to_numpy()
    position = linked[["x_um", "y_um", "z_um"]].to_numpy(float)
    after = np.flatnonzero(np.insert(track[1:] == track[:-1], 0, False))
    moved, frames = np.full(position.shape, np.nan), np.full(len(frame), np.nan)
    moved[after], frames[after] = position[after] - position[after - 1], frame[after] - frame[after - 1]
    return moved, frames


def _arrivals(linked: pd.DataFrame, interval_s: float) -> np.ndarray:
    """(N, 3) for each row of the table (``linked['_row']``): its velocity (um/s) from its track's
    previous point (NaN at a track's start); ``linked`` sorted by particle, frame."""
    moved, frames = _from_previous(linked)
    rows = np.full(moved.shape, np.nan)
    rows[linked["_row"].to_numpy()] = moved / (frames * interval_s)[:, None]
    return rows


def _signs(
    rows: pd.DataFrame, position: np.ndarray, velocity: np.ndarray, scale: np.ndarray, interval_s: float, signed_depth: bool, reach: float,
    known: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """(N,) +1 or -1: the direction of time each bead is predicted with. Where it is ``known`` (N,)
    (+-1: the fit resolved it, or the bead's arrival from its track's previous point showed it),
    that; else by evidence: how much nearer (in units of ``scale``, up to ``reach``) a bead of the
    next frame lies to the prediction forward than backward (OUTSIDE where a prediction leaves the
    next frame's beads' extent: a bead entering or leaving the field), plus the mean evidence of
    the NEIGHBOURS nearest beads of the frame (each up to ``reach``, times the cosine of its
    lateral motion with this one's: a flow is coherent). On the tracking benchmark (density 1, 100
    frames, 460 true links) the neighbours' evidence summed at half weight, known ones at 3 x
    ``reach``, found 325 links and this mean 374; each bead's own std as the unit instead of
    ``scale`` 309 of 325."""
    from scipy.spatial import cKDTree

    frames = rows["frame"].to_numpy()
    resolved = known != 0
    evidence = 3 * reach * known
    for f in np.unique(frames):
        here, there = np.flatnonzero((frames == f) & ~resolved), np.flatnonzero(frames == f + 1)
        if not len(here) or not len(there):
            continue
        tree = cKDTree(position[there] / scale)
        lo, hi = position[there, :2].min(0) - reach * scale[:2], position[there, :2].max(0) + reach * scale[:2]
        gap = []
        for s in (1, -1):
            ahead = position[here] + s * velocity[here] * interval_s
            if not signed_depth:
                ahead[:, 2] = np.abs(ahead[:, 2])
            inside = ((ahead[:, :2] >= lo) & (ahead[:, :2] <= hi)).all(1)
            gap.append(np.where(inside, np.minimum(tree.query(ahead / scale)[0], reach), OUTSIDE))
        forward, backward = gap
        evidence[here] = backward - forward
    sign = np.ones(len(rows))
    for f in np.unique(frames):
        idx = np.flatnonzero(frames == f)
        k = min(NEIGHBOURS + 1, len(idx))
        _, near = cKDTree(position[idx, :2]).query(position[idx, :2], k=k)
        near = near.reshape(len(idx), k)
        lateral = velocity[idx, :2] / np.maximum(np.linalg.norm(velocity[idx, :2], axis=1, keepdims=True), 1e-12)
        along = np.einsum("nd,nkd->nk", lateral, lateral[near])[:, 1:]  # the cosine of each neighbour's lateral motion with the bead's
        others = (along * np.clip(evidence[idx][near[:, 1:]], -reach, reach)).mean(1) if k > 1 else 0.0
        total = evidence[idx] + others
        sign[idx] = np.where(resolved[idx], known[idx], np.where(total >= 0, 1.0, -1.0))
    return sign


def _directions(linked: pd.DataFrame, pixel_um: float) -> None:
    """Set ``direction`` ('track': by the track's lateral displacement to its next or from its
    previous point, where it is unresolved by the exposure or the displacement contradicts the
    exposure by more than TRACK_SIGMAS position std; 'fit': by the exposure; 'unknown') and turn the
    velocities to it. In place; ``linked`` sorted by particle, frame; pixels of ``pixel_um``. A bead that keeps its depth
    shows its direction in the exposure only by chance (an astray fit or noise); the track shows it
    by its displacement, and v3 keeps no selection's sign."""
    resolved = linked["direction_resolved"].astype(bool).to_numpy()
    velocity = linked[["v1", "v2", "v3"]].to_numpy(float)
    back = _from_previous(linked)[0]
    ahead = np.append(back[1:], np.full((1, 3), np.nan), 0)  # to the next point: its displacement from this one
    moved = np.nan_to_num(np.where(np.isnan(ahead), back, ahead))  # to the next point, else from the previous, else 0
    along = (moved[:, :2] * velocity[:, :2]).sum(1) / np.maximum(np.hypot(velocity[:, 0], velocity[:, 1]), 1e-12)  # um along the lateral motion
    std = np.sqrt(2) * np.hypot(linked["x_std_px"], linked["y_std_px"]).to_numpy(float) * pixel_um  # of a displacement between two fits
    by_track = np.where(resolved, along < -TRACK_SIGMAS * std, along != 0)  # depth may be folded: the lateral motion tells
    flip = by_track & (along < 0)
    linked.loc[flip, ["v1", "v2", "v3"]] = -velocity[flip]
    linked["direction"] = np.where(by_track, "track", np.where(resolved, "fit", "unknown"))


@contextmanager
def _ordered_points() -> Iterator[None]:
    """trackpy's points hashed by their serial number (``uuid``, numbered from 0 in each linking),
    not their memory address, while linking: its subnet solvers iterate sets of points and break
    ties in that order, which then is the same in every run (same table, same tracks)."""
    from trackpy.linking.utils import Point

    before = Point.__dict__.get("__hash__")
    Point.__hash__ = lambda self: self.uuid
    try:
        yield
    finally:
        if before is None:
            del Point.__hash__
        else:
            Point.__hash__ = before


@contextmanager
def _quiet() -> Iterator[None]:
    """trackpy's per-frame progress lines silenced while linking (its logger's level restored)."""
    logger = logging.getLogger("trackpy")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
