"""napari: how long a 512 x 512 x 100 bead movie's tracks take to open in the viewer (target < 5 s),
and screenshots of each layer type of the plugin (blurflow.napari_plugin) for the docs.

The movie is the tracking benchmark's channel (benchmarks/tracking.py: beads in a Poiseuille flow
along x, ``--density`` beads per 128 x 128 px, the fastest moving 3 spacings a frame), written as a
TIFF stack, fitted and linked as a user would (``blurflow particles --link``). Then ``--repeat``
times, in a fresh viewer: the movie opened by napari's own reader, and its tracks by blurflow's;
each time until the canvas has drawn them (a screenshot). With ``--screenshots DIR``: the movie
with its particles, with its tracks, and the flow of the shipped model on a camera image whose lower
half moved along x (predict), as PNGs.

    xvfb-run -a python benchmarks/napari_viewer.py [--density 3] [--frames 100] [--repeat 3] [--screenshots docs/images]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tracking import movie

import blurflow.model  # noqa: F401 - torch's compilers (triton) before any GL context: their LLVM and Mesa's clash
from blurflow import cli, testsets
from blurflow.particles import BeadFitter
from blurflow.synthesis import Setup


def bead_files(args: argparse.Namespace, folder: Path) -> tuple[Path, Path, Path]:
    """(movie.tif, its particles table, its tracks table): rendered, fitted and linked."""
    setup = Setup.from_config({})
    window = testsets.dense_window(args.size)
    fitter = BeadFitter(setup.optics, setup.scales, window)
    options = argparse.Namespace(size=args.size, frames=args.frames, streak_px=16.0, max_spacings=3.0, z_lo=3.0, z_hi=27.0)
    frames, _, constants = movie(fitter, options, args.density, np.random.default_rng(args.seed))
    path = folder / "channel.tif"
    tifffile.imwrite(path, np.stack(frames).astype(np.uint16))
    interval = constants["interval_over_exposure"] * args.exposure_ms
    argv = ["particles", str(path), "--window", str(window), "--exposure-ms", str(args.exposure_ms), "--link", "--frame-interval-ms", str(interval)]
    t0 = time.perf_counter()
    assert cli.main([*argv, "--quiet"]) == 0
    print(json.dumps({"fitted_and_linked_s": round(time.perf_counter() - t0, 1), **constants}), flush=True)
    return path, folder / "channel_particles.csv", folder / "channel_tracks.csv"


def moving_camera(folder: Path) -> Path:
    """skimage's camera image (256 px, 2000 photons at its brightest) whose lower half moved 12 px
    along x during the exposure, with Poisson noise."""
    from scipy.ndimage import uniform_filter1d
    from skimage import data, transform

    image = transform.resize(data.camera().astype(float), (256, 256), anti_aliasing=True) / 255 * 2000 + 20
    image[128:] = uniform_filter1d(image[128:], 12, axis=1, mode="nearest")
    path = folder / "camera.tif"
    tifffile.imwrite(path, np.random.default_rng(0).poisson(image).astype(np.uint16))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=3.0, help="beads per 128 x 128 px")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--exposure-ms", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--screenshots", type=Path, help="a folder for the PNGs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    import napari
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="blurflow_napari_"))
    stack, particles, tracks = bead_files(args, folder)
    times = []
    for _ in range(args.repeat):
        viewer = napari.Viewer(show=True)
        t0 = time.perf_counter()
        viewer.open(stack)
        t1 = time.perf_counter()
        (layer,) = viewer.open(tracks, plugin="blurflow")
        viewer.screenshot(canvas_only=True, flash=False)  # drawn
        t2 = time.perf_counter()
        times.append({"movie_s": round(t1 - t0, 2), "tracks_s": round(t2 - t1, 2), "tracks": int(layer.data[:, 0].max() + 1), "points": len(layer.data)})
        viewer.close()
    tracks_s = sorted(t["tracks_s"] for t in times)
    print(json.dumps({"opened": times, "tracks_s_min": tracks_s[0], "tracks_s_median": tracks_s[len(tracks_s) // 2]}), flush=True)
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
        viewer = napari.Viewer(show=True)
        viewer.window.resize(1100, 800)
        (image,) = viewer.open(stack)
        image.contrast_limits = (0, float(np.percentile(image.data[args.frames // 2], 99.9)))
        viewer.open(particles, plugin="blurflow")
        viewer.dims.set_current_step(0, args.frames // 2)
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(args.screenshots / "napari_particles.png")
        for layer in list(viewer.layers)[1:]:
            layer.visible = False
        viewer.open(tracks, plugin="blurflow")
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(args.screenshots / "napari_tracks.png")
        viewer.layers.clear()
        camera = moving_camera(folder)
        assert cli.main(["predict", str(camera), "--quiet"]) == 0
        viewer.open(camera)
        viewer.open(folder / "camera_flow.tif", plugin="blurflow")
        viewer.layers["camera_flow v3"].visible = False
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(args.screenshots / "napari_flow.png")
        viewer.close()
        print(json.dumps({"screenshots": sorted(str(p) for p in args.screenshots.glob("napari_*.png"))}))


if __name__ == "__main__":
    main()
