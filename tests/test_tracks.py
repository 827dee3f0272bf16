"""3D tracks from particle tables (blurflow.tracks, blurflow tracks)."""

import numpy as np
import pandas as pd
import pytest

from blurflow.cli import main
from blurflow.tracks import TRACK_COLUMNS, TracksError, link

PIXEL_UM, EXPOSURE_S, INTERVAL_S = 0.65, 0.01, 0.05


def channel_table(beads: int = 60, frames: int = 8, peak_um_s: float = 1000.0, seed: int = 0) -> pd.DataFrame:
    """A particle table as blurflow particles writes it for a stack: beads in a channel flowing
    along +x (Poiseuille across depth, 3-27 um), fitted positions and velocities with noise of
    their stated std, every direction unresolved (no axial motion: the exposure cannot tell time's
    arrow) and reported with the paper's sign (v2 >= 0); ``bead`` the truth. Beads leaving the
    field at +x come back at its other side as newcomers."""
    rng = np.random.default_rng(seed)
    width = 512 * PIXEL_UM
    x0, y, z = rng.uniform(0, width, beads), rng.uniform(0, width, beads), rng.uniform(3, 27, beads)
    u = 4 * peak_um_s * (z - 3) * (27 - z) / 24**2
    rows = []
    for f in range(frames):
        x = (x0 + u * f * INTERVAL_S) % width
        v = np.stack([u, np.zeros(beads), np.zeros(beads)], 1) + rng.normal(0, [8.0, 8.0, 30.0], (beads, 3))
        v[v[:, 1] < 0] *= -1
        table = pd.DataFrame({
            "particle": np.arange(beads) + 1 + f * beads, "frame": f, "x_px": x / PIXEL_UM + rng.normal(0, 0.1, beads),
            "y_px": y / PIXEL_UM + rng.normal(0, 0.1, beads), "x_std_px": 0.1, "y_std_px": 0.1,
            "v1": v[:, 0], "v1_std": 8.0, "v2": v[:, 1], "v2_std": 8.0, "v3": v[:, 2], "v3_std": 30.0,
            "z0_um": z + rng.normal(0, 0.3, beads) - v[:, 2] * EXPOSURE_S / 2, "z0_std_um": 0.3, "speed_unit": "um/s",
            "photons": 5000.0, "direction_resolved": False, "depth_sign_resolved": False, "flag": "", "bead": np.arange(beads),
        })  # fmt: skip
        rows.append(table)
    out = pd.concat(rows, ignore_index=True)
    out["x_um"], out["y_um"] = out["x_px"] * PIXEL_UM, out["y_px"] * PIXEL_UM
    out["x"], out["y"] = out["x_px"], out["y_px"]
    return out


def link_shares(tracks: pd.DataFrame, table: pd.DataFrame) -> tuple[float, int]:
    """(share of the links made that join one bead, links made)."""
    bead = table.set_index(["frame", "x_px"])["bead"]
    tracks = tracks.sort_values(["particle", "frame"])
    truth = bead.loc[list(zip(tracks["frame"], tracks["x"]))].to_numpy()
    same = tracks["particle"].to_numpy()[1:] == tracks["particle"].to_numpy()[:-1]
    return float((truth[1:] == truth[:-1])[same].mean()), int(same.sum())


def test_beads_moving_several_spacings_are_linked_by_their_velocity_where_nearest_neighbour_fails():
    """60 beads in 333 um (spacing ~43 um) moving up to 50 um between frames: the velocity
    predictor joins >= 99 % of links right and finds most of them, time's arrow from the tracks is
    right; trackpy's nearest neighbour with a search range of the largest step joins fewer than
    half right."""
    import trackpy

    table = channel_table()
    tracks = link(table, INTERVAL_S, EXPOSURE_S)
    assert list(tracks.columns) == list(TRACK_COLUMNS)
    right, made = link_shares(tracks, table)
    assert right >= 0.99 and made >= 0.8 * 60 * 7 * 0.75, (right, made)  # ~25 % of beads leave the field each frame
    known = tracks[tracks["direction"] == "track"]
    assert len(known) > 0.9 * len(tracks) and (known["v1"] > 0).mean() > 0.99
    trackpy.quiet()
    plain = trackpy.link(table.assign(x=table["x_um"], y=table["y_um"]), 55.0, adaptive_stop=5.0, adaptive_step=0.9)
    plain_right, _ = link_shares(plain.assign(x=plain["x_px"]), table)
    assert plain_right < 0.5, plain_right


def test_a_fit_astray_ends_its_track_and_a_track_overrules_a_chance_direction():
    """Beads of the channel: one fit in frame 3 fitted astray (its lateral velocity 2,000 um/s across
    the flow) at its bead's place is not joined to the bead's track (it would be by position alone);
    one bead's fit in frame 2 resolved against the flow (-v, direction_resolved): its track, moving
    +x by many position std, turns it ('track')."""
    table = channel_table(beads=30, frames=6)
    astray = table.index[(table["frame"] == 3) & (table["bead"] == 5)][0]
    table.loc[astray, ["v1", "v2"]] = [0.0, 2000.0]
    chance = table.index[(table["frame"] == 2) & (table["bead"] == 7)][0]
    table.loc[chance, ["v1", "v2", "v3"]] = -table.loc[chance, ["v1", "v2", "v3"]].abs().to_numpy() * [1, 1, -1]
    table.loc[chance, "direction_resolved"] = True
    tracks = link(table, INTERVAL_S, EXPOSURE_S)
    row = tracks[(tracks["frame"] == 3) & (tracks["x"] == table.loc[astray, "x_px"])]
    assert (tracks["particle"] == row["particle"].iloc[0]).sum() == 1  # a track of its own
    right, made = link_shares(tracks, table)
    assert right == 1.0 and made > 100
    turned = tracks[(tracks["frame"] == 2) & (tracks["x"] == table.loc[chance, "x_px"])].iloc[0]
    assert turned["direction"] == "track" and turned["v1"] > 0


def test_the_same_table_gives_the_same_tracks_in_every_run(tmp_path):
    """Two processes link one crowded table (300 beads, competing candidates): byte-identical tables
    (trackpy breaks ties in the order of sets of its points, hashed by memory address unless
    blurflow.tracks orders them)."""
    import subprocess
    import sys

    table = channel_table(beads=300, frames=8)
    table[["v1_std", "v2_std"]] = 150.0  # wide search ranges: many beads compete for each link
    table.to_csv(tmp_path / "c_particles.csv", index=False)
    for run in (1, 2):
        argv = ["tracks", str(tmp_path / "c_particles.csv"), "--frame-interval-ms", "50", "--exposure-ms", "10", "--out", str(tmp_path / f"{run}.csv")]
        subprocess.run([sys.executable, "-m", "blurflow.cli", *argv, "--quiet"], check=True)
    assert (tmp_path / "1.csv").read_bytes() == (tmp_path / "2.csv").read_bytes()


def test_tracks_read_into_trackpy_and_a_track_keeps_its_time():
    import trackpy

    tracks = link(channel_table(beads=20, frames=6, peak_um_s=200.0), INTERVAL_S, EXPOSURE_S)
    assert np.allclose(tracks["t_s"], tracks["frame"] * INTERVAL_S)
    msd = trackpy.imsd(tracks, mpp=PIXEL_UM, fps=1 / INTERVAL_S, max_lagtime=3)
    assert msd.shape[0] == 3 and msd.shape[1] == (tracks.groupby("particle").size() > 1).sum() > 10


@pytest.mark.parametrize(
    "case, words",
    [
        ("no_frame", "no 'frame' column"),
        ("one_frame", "in >= 2 frames, the table has them in 1"),
        ("layout", "not a blurflow particle table: no column"),
        ("interval", "--frame-interval-ms must be a positive number"),
        ("memory", "--memory must be >= 0"),
    ],
)
def test_a_table_that_cannot_be_linked_is_one_line_and_nothing_is_written(tmp_path, capsys, case, words):
    table = channel_table(beads=10, frames=3)
    if case == "no_frame":
        table = table.drop(columns="frame")
    elif case == "one_frame":
        table = table[table["frame"] == 0]
    elif case == "layout":
        table = table.rename(columns={"v1": "u", "v2": "v"})
    path = tmp_path / "movie_particles.csv"
    table.to_csv(path, index=False)
    argv = ["tracks", str(path), "--frame-interval-ms", "0" if case == "interval" else "50", "--exposure-ms", "10"]
    code = main(argv + (["--memory", "-1"] if case == "memory" else []))
    err = capsys.readouterr().err
    assert code in (1, 2) and words in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["movie_particles.csv"]


def test_the_tracks_command_writes_the_table_beside_its_input(tmp_path, capsys):
    path = tmp_path / "movie_particles.csv"
    channel_table(beads=20, frames=4).to_csv(path, index=False)
    assert main(["tracks", str(path), "--frame-interval-ms", "50", "--exposure-ms", "10"]) == 0
    out = pd.read_csv(tmp_path / "movie_tracks.csv")
    assert list(out.columns) == list(TRACK_COLUMNS) and out["particle"].nunique() < len(out)
    assert "tracks of 80 particles in 4 frames" in capsys.readouterr().err
    with pytest.raises(TracksError, match="exposure must be a positive number"):
        link(channel_table(beads=5, frames=2), INTERVAL_S, 0.0)
