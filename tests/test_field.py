"""Flow fields on a grid from particles or tracks (blurflow.field, blurflow field)."""

import itertools

import numpy as np
import pandas as pd
import pytest
from test_tracks import EXPOSURE_S, INTERVAL_S, channel_table

from blurflow.cli import main
from blurflow.field import FIELD_COLUMNS, depth_range, grid, grid_flow
from blurflow.tracks import link


def test_the_channel_profile_comes_back_from_the_tracks():
    """Beads in a Poiseuille channel (peak 1,000 um/s across 3-27 um), linked: the gridded u of 8
    depth bins lies within 3 % of the peak (rms) of the true profile averaged over each bin's
    beads, w (zero) within 3 standard errors in every bin, v near 0."""
    table = channel_table(beads=200, frames=10)
    field = grid(link(table, INTERVAL_S, EXPOSURE_S), 400.0, z_bins=8)
    field = field[field["y"] > 0]  # cells start at x = y = 0: a bead fitted just above the first row has a cell of its own
    assert list(field.columns) == list(FIELD_COLUMNS) and len(field) == 8 and (field["speed_unit"] == "um/s").all()
    z = table["z0_um"].to_numpy()  # the true depths plus 0.3 um of noise
    edges = np.linspace(*depth_range(z), 9)
    edges[0], edges[-1] = -np.inf, np.inf  # those beyond count in the end bins
    truth = [np.mean(4 * 1000 * (zz - 3) * (27 - zz) / 24**2) for zz in (z[(z >= a) & (z <= b)] for a, b in itertools.pairwise(edges))]
    assert np.sqrt(np.mean((field["u"].to_numpy() - truth) ** 2)) < 30.0, field[["z", "u"]]
    assert (np.abs(field["w"]) < 3 * field["w_se"]).all() and (np.abs(field["v"]) < 3 * field["v_se"] + 1).all()


def test_each_bead_counts_by_its_inverse_variance():
    rows = pd.DataFrame({
        "x_um": [1.0, 2.0], "y_um": [1.0, 2.0], "z_um": [5.0, 5.0], "v1": [0.0, 10.0], "v1_std": [1.0, 10.0], "v2": [2.0, 2.0],
        "v2_std": [1.0, 1.0], "v3": [0.0, 0.0], "v3_std": [1.0, 1.0], "direction": ["fit", "track"],
    })  # fmt: skip
    field = grid(rows, 10.0).iloc[0]
    assert field["u"] == pytest.approx(10 * 0.01 / 1.01) and field["count"] == 2
    assert field["u_se"] == pytest.approx(np.sqrt(1 / 1.01), rel=0.05)  # the beads agree within their std: the weights' error
    assert field["v"] == pytest.approx(2.0) and field["v_se"] == pytest.approx(np.sqrt(0.5))


def test_a_tracks_points_count_as_one_bead_in_the_standard_error():
    """20 tracks of 30 points, each track's w offset by its own N(0, 10) (a bead's depth and blur stay
    from frame to frame), each point's noise N(0, 1) with std 1: the standard error is the scatter
    of the tracks' means over sqrt(20), not of the 600 points' over sqrt(600)."""
    rng = np.random.default_rng(0)
    offset = rng.normal(0, 10, 20)
    track = np.repeat(np.arange(20), 30)
    w = offset[track] + rng.normal(0, 1, track.size)
    rows = pd.DataFrame({
        "particle": track, "frame": np.tile(np.arange(30), 20), "x_um": 1.0, "y_um": 1.0, "z_um": 5.0, "v1": 1.0, "v1_std": 1.0, "v2": 0.0,
        "v2_std": 1.0, "v3": w, "v3_std": 1.0, "direction": "track",
    })  # fmt: skip
    field = grid(rows, 10.0).iloc[0]
    expected = offset.std(ddof=1) / np.sqrt(20)
    assert field["count"] == 600 and 0.7 * expected < field["w_se"] < 1.3 * expected, (field["w_se"], expected)


def test_a_depth_fitted_astray_does_not_stretch_the_depth_bins():
    """301 beads at 3-27 um and one at -40 um, 8 depth bins: the bins span 3-27 um (3 um each) and the
    stray bead counts in the first."""
    z = np.append(np.linspace(3, 27, 301), -40.0)
    rows = pd.DataFrame({
        "x_um": 1.0, "y_um": 1.0, "z_um": z, "v1": 1.0, "v1_std": 1.0, "v2": 0.0, "v2_std": 1.0, "v3": 0.0, "v3_std": 1.0,
        "direction": "fit", "particle": np.arange(302) // 2, "frame": np.arange(302) % 2,
    })  # fmt: skip
    field = grid(rows, 10.0, z_bins=8)
    assert len(field) == 8 and np.allclose(np.diff(field["z"]), 2.94, atol=0.05) and 3 < field["z"].min() < 5
    assert field["count"].sum() == 302 and field["count"].iloc[0] > field["count"].iloc[1]


def test_a_point_no_link_confirms_does_not_count():
    """A tracks table: a track of two points at u 10, and a lone point (its own track) at u 500:
    the field holds the track's points only."""
    rows = pd.DataFrame({
        "particle": [0, 0, 1], "frame": [0, 1, 0], "x_um": [1.0, 2.0, 3.0], "y_um": 1.0, "z_um": 5.0, "v1": [10.0, 10.0, 500.0], "v1_std": 1.0,
        "v2": 0.0, "v2_std": 1.0, "v3": 0.0, "v3_std": 1.0, "direction": ["track", "track", "fit"],
    })  # fmt: skip
    field = grid(rows, 10.0).iloc[0]
    assert field["count"] == 2 and field["u"] == pytest.approx(10.0)


@pytest.mark.parametrize(
    "case, words",
    [
        ("unresolved", "no bead with a signed velocity"),
        ("cell", "the cell must be a positive number of um"),
        ("layout", "not a blurflow particle or tracks table"),
        ("depth", "no column z0_um"),
    ],
)
def test_a_table_that_gives_no_field_is_one_line(tmp_path, capsys, case, words):
    table = channel_table(beads=10, frames=2)  # a particle table, every direction unresolved
    if case in ("layout", "depth"):
        table = table.drop(columns=["v1_std" if case == "layout" else "z0_um"])
    table.to_csv(tmp_path / "a_particles.csv", index=False)
    assert main(["field", str(tmp_path / "a_particles.csv"), "--cell-um", "-5" if case == "cell" else "50"]) == 1
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["a_particles.csv"]


def test_the_field_command_writes_a_table_and_a_quiver(tmp_path, capsys):
    link(channel_table(beads=60, frames=4), INTERVAL_S, EXPOSURE_S).to_csv(tmp_path / "m_tracks.csv", index=False)
    assert main(["field", str(tmp_path / "m_tracks.csv"), "--cell-um", "100", "--z-bins", "3"]) == 0
    field = pd.read_csv(tmp_path / "m_field.csv")
    assert list(field.columns) == list(FIELD_COLUMNS) and field["z"].nunique() == 3 and (tmp_path / "m_field.png").stat().st_size > 10_000


def test_a_flow_map_is_gridded_on_the_same_cells_each_pixel_weighted_by_w():
    """(5, 40, 60) maps, pixels 0.5 um: cells of 10 um from x = y = 0 hold 20 x 20 pixels; a cell's
    u is the w-weighted mean of its pixels with w > 0.5 (a column of w 0.2 and u 100 does not count);
    the cells are those a particle table at the same place gets."""
    flow = np.zeros((5, 40, 60), np.float32)
    flow[0, :, :30], flow[0, :, 30:] = 2.0, 4.0
    flow[1], flow[2], flow[3], flow[4] = 1.0, 3.0, 5.0, 0.9
    flow[0, :20, 40:50], flow[4, :20, 40:50] = 6.0, 0.6  # half of cell (2, 0) at u 6 with weight 0.6 against 4 with 0.9
    flow[0, :, 5], flow[4, :, 5] = 100.0, 0.2
    field = grid_flow(flow, 0.5, "um/s", 10.0)
    assert list(field.columns) == list(FIELD_COLUMNS) and len(field) == 6
    assert np.allclose(field["x"], [5, 5, 15, 15, 25, 25]) and np.allclose(field["y"], [5, 15] * 3)
    assert field["count"].tolist() == [380, 380, 400, 400, 400, 400]
    assert np.allclose(field["u"], [2, 2, 3, 3, (4 * 0.9 + 6 * 0.6) / 1.5, 4], atol=1e-5)
    assert np.allclose(field["v"], 1.0) and np.allclose(field["w"], 3.0) and np.allclose(field["z"], 5.0)
    assert np.allclose(field[["v_se", "w_se"]], 0, atol=1e-6) and field["u_se"].iloc[2] > 0.01  # the scatter of a mixed cell
    beads = pd.DataFrame({
        "x_um": [3.0, 27.0], "y_um": [12.0, 1.0], "z_um": 5.0, "v1": 1.0, "v1_std": 1.0, "v2": 1.0, "v2_std": 1.0, "v3": 1.0, "v3_std": 1.0,
        "direction": "fit",
    })  # fmt: skip
    assert set(map(tuple, grid(beads, 10.0)[["x", "y"]].to_numpy())) <= set(map(tuple, field[["x", "y"]].to_numpy()))


def test_the_field_command_grids_a_flow_tif_of_predict(tmp_path, capsys):
    import tifffile
    from skimage import data

    tifffile.imwrite(tmp_path / "cells.tif", np.random.default_rng(0).poisson(data.camera()[:256:4, :384:4] * 4.0).astype(np.uint16))
    assert main(["predict", str(tmp_path / "cells.tif"), "--quiet", "--exposure-ms", "20"]) == 0
    assert main(["field", str(tmp_path / "cells_flow.tif"), "--cell-um", "13"]) == 0
    field = pd.read_csv(tmp_path / "cells_field.csv")
    flow = tifffile.imread(tmp_path / "cells_flow.tif")
    pixel = 0.65  # the shipped model's
    assert field["count"].sum() == (flow[4] > 0.5).sum() and (field["speed_unit"] == "um/s").all()
    assert np.allclose(field["x"] % 13, 6.5) and field["x"].max() < 96 * pixel + 13
    assert "pixels with w > 0.5" in capsys.readouterr().err and (tmp_path / "cells_field.png").is_file()
    assert main(["field", str(tmp_path / "cells.tif"), "--cell-um", "13"]) == 1
    assert "not a flow of blurflow predict" in capsys.readouterr().err
