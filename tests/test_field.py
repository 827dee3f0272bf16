"""Flow fields on a grid from particles or tracks (blurflow.field, blurflow field)."""

import itertools

import numpy as np
import pandas as pd
import pytest
from test_tracks import EXPOSURE_S, INTERVAL_S, channel_table

from blurflow.cli import main
from blurflow.field import FIELD_COLUMNS, grid
from blurflow.tracks import link


def test_the_channel_profile_comes_back_from_the_tracks():
    """Beads in a Poiseuille channel (peak 1,000 um/s across 3-27 um), linked: the gridded u of 8
    depth bins lies within 3 % of the peak (rms) of the true profile averaged over each bin's
    beads, w (zero) within 3 standard errors in every bin, v near 0."""
    table = channel_table(beads=200, frames=10)
    field = grid(link(table, INTERVAL_S, EXPOSURE_S), 400.0, z_bins=8)
    assert list(field.columns) == list(FIELD_COLUMNS) and len(field) == 8 and (field["speed_unit"] == "um/s").all()
    z = table["z0_um"].to_numpy()  # the true depths plus 0.3 um of noise
    edges = np.linspace(z.min(), z.max(), 9)
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


@pytest.mark.parametrize(
    "case, words",
    [
        ("unresolved", "no bead with a signed velocity"),
        ("cell", "the cell must be a positive number of um"),
        ("layout", "not a blurflow particle or tracks table"),
    ],
)
def test_a_table_that_gives_no_field_is_one_line(tmp_path, capsys, case, words):
    table = channel_table(beads=10, frames=2)  # a particle table, every direction unresolved
    if case == "layout":
        table = table.drop(columns=["v1_std"])
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
