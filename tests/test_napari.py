"""blurflow inside napari (blurflow.napari_plugin): each reader and widget in a real viewer,
headless under Xvfb (pytest-xvfb; tools/check.sh installs Xvfb where it can), screenshots of each
layer type; skipped, saying why, where napari or a display server cannot be had."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

napari = pytest.importorskip("napari", reason="napari is not installed: pip install 'blurflow[napari]'")


def _display_problem() -> str | None:
    """Why Qt cannot open a window here (None when it can); probed in a child process, as Qt
    aborts the process that fails."""
    code = "from qtpy.QtWidgets import QApplication; QApplication([])"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
    return f"no display server for Qt ({last}): install Xvfb (apt-get install xvfb; tools/check.sh does as root on Debian)"


pytestmark = pytest.mark.skipif(bool(problem := _display_problem()), reason=problem or "")

from test_tracks import EXPOSURE_S, INTERVAL_S, channel_table

import blurflow.model  # noqa: F401 - torch's compilers (triton) before any GL context: their LLVM and Mesa's clash
from blurflow import cli
from blurflow.field import grid
from blurflow.napari_plugin.widgets import particles_widget, predict_widget, tracks_widget
from blurflow.optics import MotionScales, Optics
from blurflow.particles import BeadFitter
from blurflow.tracks import link

BEADS = ((40, 40), (40, 120), (96, 80))  # path midpoints (row, column) in frame 0
EXPOSURE_MS, INTERVAL_MS = 10.0, 15.0
V1, V3, Z0 = 0.5, 0.3, 0.1  # each bead's motion (lateral path V1 L = 12 px an exposure) and start depth in frame 0, in the labels' units
STEP = 18  # px along +x from one frame to the next: V1 L INTERVAL / EXPOSURE


def bead_movie(frames: int = 3) -> np.ndarray:
    """(frames, 136, 200) counts: beads moving along +x and away from focus on a background of 4,
    rendered with the default optics (as particles reads them without a model or config)."""
    fitter = BeadFitter(Optics.from_config({}), MotionScales.from_config({}), 64)
    assert STEP == V1 * fitter.scales.lateral_scale_px * INTERVAL_MS / EXPOSURE_MS
    movie = np.full((frames, 136, 200), 4.0)
    for f in range(frames):
        bead = fitter.expected(torch.tensor([[0.0, 0.0, V1, 0.0, V3, Z0 + V3 * f * INTERVAL_MS / EXPOSURE_MS, 8000.0, 0.0]]))[0].numpy()
        for y, x in BEADS:
            x += STEP * f
            movie[f, y - 32 : y + 32, x - 32 : x + 32] += bead
    return np.random.default_rng(0).poisson(movie).astype(np.uint16)


def drawn(viewer) -> float:
    """Share of the canvas's pixels that differ from its background (a screenshot)."""
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    return float((np.abs(shot - shot[0, 0]).sum(-1) > 30).mean())


def wait(qtbot, worker, timeout_s: float = 120) -> int:
    """Wait for a widget's worker; returns how often a 10 ms timer of the event loop fired meanwhile."""
    from qtpy.QtCore import QTimer

    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(10)
    done = []
    worker.finished.connect(lambda: done.append(1))
    qtbot.waitUntil(lambda: bool(done), timeout=int(timeout_s * 1000))
    timer.stop()
    return len(ticks)


def test_each_reader_gives_its_layers_over_the_image_and_draws_them(make_napari_viewer, tmp_path):
    """flow -> 5 images + lateral segments along (v2, v1); tracks -> a Tracks layer at the table's
    pixels with v3; field -> arrows (u, v) at the cells; each drawn on the canvas (screenshot)."""
    viewer = make_napari_viewer(show=True)
    movie = np.random.default_rng(1).poisson(200 + 100 * np.sin(np.arange(96) / 5)[:, None], (2, 96, 96)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "cells.tif", movie)
    assert cli.main(["predict", str(tmp_path / "cells.tif"), "--quiet", "--exposure-ms", "50"]) == 0
    layers = viewer.open(tmp_path / "cells_flow.tif", plugin="blurflow")
    names = [layer.name for layer in layers]
    assert names == [f"cells_flow {c}" for c in ("v1", "v2", "v3", "z0", "w")] + ["cells_flow lateral motion"]
    flow = tifffile.imread(tmp_path / "cells_flow.tif")
    assert all(np.array_equal(layer.data, flow[:, c]) for c, layer in enumerate(layers[:5]))
    assert layers[2].metadata["unit"] == "um/s" and layers[3].metadata["unit"] == "um"
    vectors = layers[5]
    start, projection = vectors.data[:, 0], vectors.data[:, 1]
    assert vectors.data.shape[1:] == (2, 3) and set(start[:, 0]) <= {0, 1}
    v1, v2 = vectors.features["v1"].to_numpy(), vectors.features["v2"].to_numpy()
    assert np.allclose(projection[:, 1] * v1, projection[:, 2] * v2, atol=1e-4)  # each segment along (rows v2, columns v1)
    f, y, x = np.round(start + projection / 2).astype(int).T  # its centre is the grid point whose flow it draws
    assert np.allclose(flow[f, 0, y, x], v1, rtol=1e-5)
    assert drawn(viewer) > 0.05
    shots = {"flow": viewer.screenshot(canvas_only=True, flash=False)}

    viewer.layers.clear()
    table = channel_table(beads=20, frames=5)
    tracks = link(table, INTERVAL_S, EXPOSURE_S)
    tracks.to_csv(tmp_path / "channel_tracks.csv", index=False)
    (layer,) = viewer.open(tmp_path / "channel_tracks.csv", plugin="blurflow")
    assert layer._type_string == "tracks" and layer.color_by == "v3"
    assert np.array_equal(layer.data[:, 0], tracks["particle"]) and np.allclose(layer.data[:, 2:], tracks[["y", "x"]])
    assert np.allclose(layer.features["z_um"], tracks["z_um"])
    viewer.dims.set_current_step(0, 4)
    assert drawn(viewer) > 0.001
    shots["tracks"] = viewer.screenshot(canvas_only=True, flash=False)

    viewer.layers.clear()
    field = grid(tracks, 40.0)
    field.to_csv(tmp_path / "channel_field.csv", index=False)
    (layer,) = viewer.open(tmp_path / "channel_field.csv", plugin="blurflow")
    assert np.allclose(layer.data[:, 0] + layer.data[:, 1] / 2, field[["y", "x"]])  # arrows centred on their cells
    assert np.allclose(layer.data[:, 1, 0] * field["u"], layer.data[:, 1, 1] * field["v"], atol=1e-6)  # along (v rows, u columns)
    assert drawn(viewer) > 0.001
    for name, shot in shots.items():
        assert shot.ndim == 3 and shot.shape[2] == 4, name


def test_the_widgets_run_particles_and_tracks_in_a_worker_and_the_viewer_stays_responsive(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """particles (with --link) on a movie opened from its file: the CLI's files beside it, the
    points, paths and tracks as layers, the event loop turning all the while; tracks on the points
    layer: the tracks' file and layer; its beads move +x STEP px a frame; a frame interval of 0:
    the command line's one line as a notification, no worker."""
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer = make_napari_viewer(show=True)
    tifffile.imwrite(tmp_path / "beads.tif", bead_movie())
    (image,) = viewer.open(tmp_path / "beads.tif")
    widget = particles_widget()
    viewer.window.add_dock_widget(widget)
    widget.image.value = image
    widget.exposure_ms.value, widget.link.value, widget.frame_interval_ms.value = EXPOSURE_MS, True, INTERVAL_MS
    worker = widget()
    assert worker is not None
    assert wait(qtbot, worker) >= 10  # the viewer answered while the fit ran
    for name in ("beads_particles.csv", "beads_particles.png", "beads_tracks.csv"):
        assert (tmp_path / name).is_file(), name
    kinds = {layer.name: layer._type_string for layer in viewer.layers}
    assert kinds == {"beads": "image", "beads_particles": "points", "beads_particles paths": "vectors", "beads_tracks": "tracks"}
    points = viewer.layers["beads_particles"]
    assert len(points.data) == len(BEADS) * 3 and np.isfinite(points.features["v3"]).all()
    tracks = pd.read_csv(tmp_path / "beads_tracks.csv")
    assert tracks["particle"].nunique() == len(BEADS)
    assert np.allclose(tracks.groupby("particle")["x"].diff().dropna(), STEP, atol=0.5)

    (tmp_path / "beads_tracks.csv").unlink()
    viewer.layers.remove("beads_tracks")
    widget = tracks_widget()
    viewer.window.add_dock_widget(widget)
    widget.particles.value = points
    widget.frame_interval_ms.value, widget.exposure_ms.value = INTERVAL_MS, EXPOSURE_MS
    wait(qtbot, widget())
    assert (tmp_path / "beads_tracks.csv").is_file() and viewer.layers["beads_tracks"].data.shape == (len(BEADS) * 3, 4)
    widget.frame_interval_ms.value = 0.0
    assert widget() is None and errors == ["blurflow tracks: --frame-interval-ms must be a positive number, got 0"]


def test_predict_saves_a_layer_without_a_file_and_a_bad_field_is_one_notification(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """A layer made in the viewer: saved in the chosen folder, predicted there, its flow added;
    without a folder: one notification at once, no worker; a model file that is not one: the
    command's one line as a notification, and nothing written but the saved layer."""
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(np.random.default_rng(2).poisson(300, (64, 80)).astype(np.float32), name="drawn")
    widget = predict_widget()
    viewer.window.add_dock_widget(widget)
    widget.image.value = image
    assert widget() is None and errors == ["blurflow predict: the layer 'drawn' has no file: choose an output folder to save it in"]
    widget.model.value, widget.out.value = tmp_path / "notes.pt", tmp_path / "out"
    (tmp_path / "notes.pt").write_text("not a model")
    wait(qtbot, widget())
    assert len(errors) == 2 and errors[1].startswith("blurflow predict: ") and "notes.pt" in errors[1] and "\n" not in errors[1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["drawn.tif"]
    widget.model.value = None
    wait(qtbot, widget())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["drawn.tif", "drawn_flow.png", "drawn_flow.tif"]
    assert [layer.name for layer in viewer.layers][-2:] == ["drawn_flow w", "drawn_flow lateral motion"]
    assert len(errors) == 2
