"""3D tracks from a simulated time-lapse of beads in a channel: links by velocity prediction
(blurflow.tracks.link) against plain nearest-neighbour linking (trackpy.link), by how far beads
move between frames.

The flow: a wide channel along x (Poiseuille profile across its depth, walls at z = ``--z-lo`` and
``--z-hi`` um below focus, uniform across y), beads at uniform random positions, each at its own
depth, advected (periodic in x). ``--frames`` frames of ``--size`` px, ``--densities`` beads per
128 x 128 px, rendered with the default optics' motion PSF (blurflow.particles.BeadFitter.light:
sub-pixel positions), 5,000-20,000 photons, background 5, Poisson noise; the
exposure ``--exposure-ms``, the fastest bead's streak ``--streak-px`` long, the frame interval
such that the fastest bead moves ``--max-spacings`` mean bead spacings (128 / sqrt(density) px)
between frames. Each frame detected and fitted (blurflow.particles.detect, fit_frames), the table
written as ``blurflow particles`` writes it (cli.particle_table), linked by
blurflow.tracks.link, and by trackpy.link on (x, y) with a search range of 1.1 times the fastest
bead's displacement (what a user must give it; trackpy's adaptive search shrinks it where more
than PLAIN_SUBNET beads compete).  A fitted particle within 3 px of a bead's path midpoint is that bead.

Reported per density and per class of displacement (<= 1, 1-2, 2-3 spacings): the true links
(a bead fitted in two consecutive frames, not wrapped around) that each linker made (``found``),
and the share of each linker's links that join one bead (``right``); the share of directions
the tracks resolved right; the fit's beads/s and the linking's seconds.

    python benchmarks/tracking.py [--densities 1 3 6] [--frames 100] [--size 512] [--max-spacings 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch

from blurflow import testsets
from blurflow.cli import merged_blobs, particle_table
from blurflow.field import depth_range, grid, signed_rows
from blurflow.particles import BeadFitter, detect, fit_frames
from blurflow.synthesis import Setup
from blurflow.tracks import link

PLAIN_SUBNET = 8  # the most particles trackpy.link resolves jointly before its adaptive search shrinks the range


def channel_speed(z_um: np.ndarray, z_lo: float, z_hi: float, peak: float) -> np.ndarray:
    """Poiseuille profile across a channel's depth: ``peak`` at mid-depth, 0 at the walls."""
    h = z_hi - z_lo
    return np.clip(4 * peak * (z_um - z_lo) * (z_hi - z_um) / h**2, 0, None)


def movie(fitter: BeadFitter, args: argparse.Namespace, density: float, rng: np.random.Generator) -> tuple[list[np.ndarray], pd.DataFrame, dict]:
    """Frames (camera counts) and the truth: one row per bead and frame (``bead``, ``frame``, path
    midpoint ``x_px``, ``y_px``, ``z_um``, ``speed_px`` per frame interval), and the movie's
    constants."""
    setup_px = fitter.optics.pixel_um
    n = max(1, round(density * (args.size / 128) ** 2))
    spacing = 128 / np.sqrt(density)
    w = fitter.window
    x0, y = rng.uniform(0, args.size, n), rng.uniform(w / 2, args.size - w / 2, n)
    z = rng.uniform(args.z_lo, args.z_hi, n)
    streak = channel_speed(z, args.z_lo, args.z_hi, args.streak_px)  # px per exposure
    ratio = args.max_spacings * spacing / args.streak_px  # frame interval / exposure
    photons = rng.uniform(5000, 20000, n)
    frames, rows = [], []
    for f in range(args.frames):
        x = (x0 + streak * ratio * f) % args.size
        frame = np.full((args.size + w, args.size + w), 5.0, np.float32)  # margins for the windows at the edges
        whole = np.round(np.stack([y, x], 1)).astype(int)
        theta = torch.zeros(n, 8)
        theta[:, 0], theta[:, 1] = torch.from_numpy(x - whole[:, 1]), torch.from_numpy(y - whole[:, 0])
        theta[:, 2] = torch.from_numpy(streak / fitter.scales.lateral_scale_px)
        theta[:, 5] = torch.from_numpy(z / fitter.scales.axial_scale_um)
        theta[:, 6] = torch.from_numpy(photons)
        light = fitter.light(theta).numpy()
        for (r, c), patch in zip(whole, light):
            frame[r : r + w, c : c + w] += patch  # window centred at (r, c) + w / 2 in the padded frame
        frames.append(rng.poisson(frame[w // 2 : w // 2 + args.size, w // 2 : w // 2 + args.size]).astype(np.float32))
        rows.append(pd.DataFrame({"bead": np.arange(n), "frame": f, "x_px": x, "y_px": y, "z_um": z, "speed_px": streak * ratio}))
    constants = {"beads": n, "spacing_px": spacing, "interval_over_exposure": ratio, "pixel_um": setup_px}
    return frames, pd.concat(rows, ignore_index=True), constants


def matched(table: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """(rows of ``table``,) the bead each fitted row is (its midpoint within 3 px), -1 for none."""
    from scipy.spatial import cKDTree

    out = np.full(len(table), -1)
    for f, rows in table.groupby("frame"):
        beads = truth[truth["frame"] == f]
        d, k = cKDTree(beads[["x_px", "y_px"]].to_numpy()).query(rows[["x_px", "y_px"]].to_numpy())
        out[table.index.get_indexer(rows.index)] = np.where(d < 3, beads["bead"].to_numpy()[k], -1)
    return out


def scores(linked: pd.DataFrame | None, truth: pd.DataFrame, spacing: float) -> dict:
    """Per class of displacement (in spacings): true links found, and the share of the linker's
    links that join one bead."""
    out = {}
    if linked is None:
        return {"failed": True}
    linked = linked.sort_values(["particle", "frame"])
    same = linked["particle"].to_numpy()[1:] == linked["particle"].to_numpy()[:-1]
    bead = linked["bead"].to_numpy()
    made = {(int(f), int(b)): (int(b2) == int(b)) for f, b, b2, s in zip(linked["frame"].to_numpy()[:-1], bead[:-1], bead[1:], same) if s and b >= 0}
    speed = truth.set_index(["frame", "bead"])["speed_px"]
    x = truth.set_index(["frame", "bead"])["x_px"]
    seen = set(zip(linked["frame"].astype(int), bead.astype(int)))
    true_links = [(f, b) for f, b in seen if b >= 0 and (f + 1, b) in seen and x[(f + 1, b)] > x[(f, b)]]  # not wrapped
    for lo, hi in ((0, 1), (1, 2), (2, 3)):
        mine = [k for k in true_links if lo < speed[k] / spacing <= hi or (lo == 0 and speed[k] == 0)]
        links = [k for k in made if lo < speed.get(k, np.nan) / spacing <= hi]
        out[f"{lo}-{hi}"] = {
            "true_links": len(mine), "found": round(float(np.mean([made.get(k, False) for k in mine])), 4) if mine else None,
            "right": round(float(np.mean([made[k] for k in links])), 4) if links else None,
        }  # fmt: skip
    return out


def field_profile(tracks: pd.DataFrame, truth: pd.DataFrame, args: argparse.Namespace, interval_s: float, pixel_um: float, bins: int = 8) -> dict:
    """The tracks' field in ``bins`` depth bins over one cell (blurflow.field.grid): the rms of u
    against the true speed of the same beads averaged per bin, over the peak; the shares of bins
    whose w lies within 1 and 2 standard errors of 0; the tracks' depth range (5th-95th percentile) against
    the walls."""
    field = grid(tracks, args.size * pixel_um * 2, z_bins=bins)
    counted = signed_rows(tracks)[0]  # the points the field counts, and its depth bins
    edges = np.linspace(*depth_range(counted["z_um"].to_numpy()), bins + 1)
    known = counted[counted["bead"] >= 0]
    speed = truth.set_index(["frame", "bead"]).loc[list(zip(known["frame"], known["bead"])), "speed_px"].to_numpy() * pixel_um / interval_s
    where = np.clip(np.searchsorted(edges, known["z_um"].to_numpy(), side="right") - 1, 0, bins - 1)
    expected = pd.Series(speed).groupby(where).mean().reindex(range(bins))
    peak = args.streak_px * pixel_um / (args.exposure_ms / 1000)  # um/s at mid-depth
    u = field.set_index(np.round((field["z"] - edges[0]) / (edges[1] - edges[0]) - 0.5).astype(int))["u"].reindex(range(bins))
    w = field["w"].to_numpy() / field["w_se"].to_numpy()
    return {
        "field_u_rms_of_peak": round(float(np.sqrt(np.nanmean((u - expected) ** 2)) / peak), 4),
        "field_w_within_1_se": round(float((np.abs(w) < 1).mean()), 3), "field_w_within_2_se": round(float((np.abs(w) < 2).mean()), 3),
        "tracks_depth_um": [round(float(q), 1) for q in np.percentile(tracks["z_um"], [5, 95])], "walls_um": [args.z_lo, args.z_hi],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", type=float, nargs="+", default=[1, 3, 6], help="beads per 128 x 128 px")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--max-spacings", type=float, default=3.0, help="the fastest bead's displacement between frames, in mean spacings")
    ap.add_argument("--streak-px", type=float, default=16.0, help="the fastest bead's streak over the exposure (px)")
    ap.add_argument("--exposure-ms", type=float, default=10.0)
    ap.add_argument("--z-lo", type=float, default=3.0, help="the channel's near wall below focus (um)")
    ap.add_argument("--z-hi", type=float, default=27.0, help="its far wall (um)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import trackpy

    trackpy.quiet()
    setup = Setup.from_config({})
    window = testsets.dense_window(args.size)
    fitter = BeadFitter(setup.optics, setup.scales, window)
    fitter.bank()
    for density in args.densities:
        rng = np.random.default_rng((args.seed, int(density * 100)))
        frames, truth, constants = movie(fitter, args, density, rng)
        t0 = time.perf_counter()
        found = [detect(f, window) for f in frames]
        parts = fit_frames(fitter, frames, found)
        fit_s = time.perf_counter() - t0
        table = pd.DataFrame(particle_table(parts, merged_blobs(parts.detections), setup.scales, setup.optics.pixel_um, args.exposure_ms))
        table = table[table["flag"].fillna("") == ""].reset_index(drop=True)
        table["bead"] = matched(table, truth)
        interval_s = constants["interval_over_exposure"] * args.exposure_ms / 1000
        t0 = time.perf_counter()
        ours = link(table.drop(columns="particle"), interval_s, args.exposure_ms / 1000)
        link_s = time.perf_counter() - t0
        ours = ours.merge(table[["frame", "x_px", "bead"]], left_on=["frame", "x"], right_on=["frame", "x_px"], how="left")
        reach = 1.1 * args.max_spacings * constants["spacing_px"] * setup.optics.pixel_um
        trackpy.linking.Linker.MAX_SUB_NET_SIZE_ADAPTIVE = PLAIN_SUBNET  # trackpy's 15: its recursion took minutes a frame here
        t0 = time.perf_counter()
        try:
            plain = trackpy.link(table.assign(x=table["x_um"], y=table["y_um"]).drop(columns="particle"), reach, adaptive_stop=reach / 10, adaptive_step=0.9)
        except trackpy.SubnetOversizeException:
            plain = None
        plain_s = time.perf_counter() - t0
        direction = ours[(ours["direction"] != "unknown") & (ours["bead"] >= 0)]
        profile = field_profile(ours, truth, args, interval_s, setup.optics.pixel_um)
        row = {
            "beads_per_128px": density, **constants, "fitted_rows": len(table), "matched": round(float((table["bead"] >= 0).mean()), 4),
            "fit_beads_per_s": round(len(table) / fit_s, 1), "link_s": round(link_s, 2), "nearest_neighbour_s": round(plain_s, 2),
            "velocity_prediction": scores(ours, truth, constants["spacing_px"]), "nearest_neighbour": scores(plain, truth, constants["spacing_px"]),
            "directions_right": round(float((direction["v1"] > 0).mean()), 4), "directions_known": round(float((ours["direction"] != "unknown").mean()), 4),
            **profile,
        }  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
