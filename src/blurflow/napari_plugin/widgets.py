"""napari dock widgets that run ``blurflow predict``, ``particles`` and ``tracks`` on a layer of the
viewer, as the command line does (the same flags, checks and files), in a worker thread with
napari's progress bar: the viewer stays responsive. What they write is added as layers
(:mod:`.readers`); a problem is one notification, and nothing half-written stays.

An image layer opened from a file is processed from that file (outputs beside it, or in the
chosen folder); one made in the viewer is first saved as ``<folder>/<layer name>.tif``.
"""

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import napari
from magicgui import magic_factory

from blurflow import cli
from blurflow.napari_plugin.readers import read

OPEN = {"mode": "r", "filter": "*.pt *.h5 *.yaml *.yml", "nullable": True}  # a file field, empty by default
FOLDER = {"mode": "d", "nullable": True}


def _given(path: Path | None, folder: bool = False) -> bool:
    """Whether a path field holds a path (a file field cleared by hand reads as the working folder: not given)."""
    return path is not None and str(path) not in ("", ".") and (folder or not path.is_dir())


def _input(layer: napari.layers.Image, out: Path | None) -> tuple[Path, bool]:
    """(the file behind an image layer, False), or (``out/<name>.tif``, True) where it has none and
    is to be saved there (:func:`_save`, once the fields are checked); InputError where it has no
    file and no folder is chosen."""
    source = layer.source.path
    if source is not None and Path(source).is_file():
        return Path(source), False
    if not _given(out, folder=True):
        raise cli.InputError(f"the layer '{layer.name}' has no file: choose an output folder to save it in")
    return out / f"{layer.name}.tif", True


def _save(layer: napari.layers.Image, path: Path) -> None:
    """The layer's data as a TIFF at ``path`` (written whole or not at all)."""
    import numpy as np
    import tifffile

    from blurflow.files import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, np.asarray(layer.data))


def _parse(argv: list[str]):
    """The command line's parsed and checked arguments (UsageError as the command line's): a bad
    field is answered at once, before any work starts."""
    parser = cli.build_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(argv)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - argparse's errors (a subcommand's exit): a value the fields cannot give
        raise cli.UsageError(f"cannot run blurflow {' '.join(argv)} ({exc.__class__.__name__})") from None
    cli.check_args(args)
    return args


def _run(argv: list[str]) -> None:
    """``blurflow ARGV`` in a child process: the command line itself (its checks, its files, nothing
    half-written), and the viewer's process kept free of the fit's threads and of torch's compilers
    (triton's LLVM and Mesa's, the software GL under Xvfb, crash one process). RuntimeError with
    the command's error lines where it fails."""
    done = subprocess.run([sys.executable, "-m", "blurflow.cli", *argv], capture_output=True, text=True, check=False)
    if done.returncode:
        errors = [line.removeprefix("blurflow: error: ") for line in done.stderr.splitlines() if line.startswith("blurflow: error: ")]
        raise RuntimeError("; ".join(errors) or (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])


def _start(viewer: napari.Viewer, argv: list[str], files: list[Path]):
    """Run ``argv`` (:func:`_run`) in a napari thread worker with an indeterminate progress bar;
    then ``files`` (those it wrote) are added to ``viewer`` as layers; an error is one notification."""
    from napari.layers import Layer
    from napari.qt.threading import create_worker
    from napari.utils.notifications import show_error, show_info

    desc = f"blurflow {argv[0]}"

    def layers(written: list[Path]) -> None:
        for path in written:
            if path.suffix in (".tif", ".csv"):
                for data, kwargs, kind in read(path):
                    viewer.add_layer(Layer.create(data, kwargs, kind))
        show_info(f"{desc}: wrote {', '.join(str(p) for p in written)}")

    def job() -> list[Path]:
        _run(argv)
        return [p for p in files if p.is_file()]

    worker = create_worker(job, _progress={"desc": desc}, _ignore_errors=True)  # errors: one notification, below
    worker.returned.connect(layers)
    worker.errored.connect(lambda exc: show_error(f"{desc}: {exc}"))
    worker.start()
    return worker


def _outputs(path: Path, out: Path | None, command: str, link: bool = False) -> list[Path]:
    """The files ``blurflow COMMAND PATH [--out OUT]`` writes (and the tracks' with --link)."""
    stem = cli.plan_outputs([path], out if _given(out, folder=True) else None, command)[path]
    return [*cli.output_paths(stem, command), *(cli.output_paths(stem, "tracks") if link else ())]


def _number_flags(**flags: float) -> list[str]:
    """``--name value`` for each flag whose value is set (not 0)."""
    return [x for name, value in flags.items() if value for x in (f"--{name.replace('_', '-')}", repr(float(value)))]


def _guarded(desc: str, build):
    """Call ``build()`` (it parses and starts a worker); a bad field is one notification, no worker."""
    from napari.utils.notifications import show_error

    try:
        return build()
    except cli.InputError as exc:
        show_error(f"blurflow {desc}: {exc}")
        return None


@magic_factory(call_button="Predict flow", model={"label": "model (.pt; empty: shipped)"}, out={"label": "output folder"})
def predict_widget(
    viewer: napari.Viewer,
    image: napari.layers.Image,
    model: Annotated[Path | None, OPEN] = None,
    exposure_ms: Annotated[float, {"min": 0, "max": 1e6, "label": "exposure (ms; 0: per exposure)"}] = 0.0,
    pixel_size_um: Annotated[float, {"min": 0, "max": 1e3, "step": 0.01, "label": "pixel (um; 0: the model's)"}] = 0.0,
    offset: float = 0.0,
    gain: Annotated[float, {"min": 1e-6, "max": 1e6}] = 1.0,
    out: Annotated[Path | None, FOLDER] = None,
):
    """``blurflow predict`` on the image layer: its flow (v1, v2, v3, z0, w) as layers and files."""

    def build():
        path, unsaved = _input(image, out)
        argv = ["predict", *([str(model)] if _given(model) else []), str(path), "--quiet", "--offset", repr(offset), "--gain", repr(gain)]
        argv += _number_flags(exposure_ms=exposure_ms, pixel_size_um=pixel_size_um) + (["--out", str(out)] if _given(out, folder=True) else [])
        _parse(argv)
        if unsaved:
            _save(image, path)
        return _start(viewer, argv, _outputs(path, out, "predict"))

    return _guarded("predict", build)


@magic_factory(
    call_button="Fit particles",
    optics={"label": "model, config or PSF file"},
    out={"label": "output folder"},
)
def particles_widget(
    viewer: napari.Viewer,
    image: napari.layers.Image,
    optics: Annotated[Path | None, OPEN] = None,
    exposure_ms: Annotated[float, {"min": 0, "max": 1e6, "label": "exposure (ms; 0: per exposure)"}] = 0.0,
    window: Annotated[int, {"min": 16, "max": cli.MAX_WINDOW, "step": 2}] = 64,
    threshold: Annotated[float, {"min": 0.1, "max": 1e3}] = 5.0,
    offset: float = 0.0,
    gain: Annotated[float, {"min": 1e-6, "max": 1e6}] = 1.0,
    static: bool = False,
    link: bool = False,
    frame_interval_ms: Annotated[float, {"min": 0, "max": 1e7, "label": "frame interval (ms, to link)"}] = 0.0,
    out: Annotated[Path | None, FOLDER] = None,
):
    """``blurflow particles`` on the image layer (a stack: its frames), with the optics of a
    model (.pt), a config (.yaml) or a PSF model (.h5, blurflow calibrate); with ``link``, the
    tracks too."""

    def build():
        path, unsaved = _input(image, out)
        suffix = optics.suffix.lower() if _given(optics) else ""
        model = [str(optics)] if suffix in cli.MODEL_SUFFIXES else []
        source = {".h5": ["--psf", str(optics)], ".yaml": ["--config", str(optics)], ".yml": ["--config", str(optics)]}.get(suffix, [])
        if suffix and not (model or source):
            raise cli.InputError(f"{optics}: not a model (.pt), a config (.yaml) or a PSF model (.h5)")
        argv = ["particles", *model, str(path), *source]
        argv += ["--quiet", "--window", str(window), "--threshold", repr(threshold), "--offset", repr(offset), "--gain", repr(gain)]
        argv += _number_flags(exposure_ms=exposure_ms) + (["--static"] if static else []) + (["--out", str(out)] if _given(out, folder=True) else [])
        argv += (["--link"] + _number_flags(frame_interval_ms=frame_interval_ms)) if link else []
        _parse(argv)
        if unsaved:
            _save(image, path)
        return _start(viewer, argv, _outputs(path, out, "particles", link))

    return _guarded("particles", build)


@magic_factory(call_button="Link tracks")
def tracks_widget(
    viewer: napari.Viewer,
    particles: napari.layers.Points,
    frame_interval_ms: Annotated[float, {"min": 0, "max": 1e7, "label": "frame interval (ms)"}] = 100.0,
    exposure_ms: Annotated[float, {"min": 0, "max": 1e7, "label": "exposure (ms)"}] = 10.0,
    memory: Annotated[int, {"min": 0, "max": 100}] = 0,
):
    """``blurflow tracks`` on a particles layer (opened from, or made as, a *_particles.csv): its
    3D tracks as a Tracks layer and ``*_tracks.csv`` beside the table."""

    def build():
        table = particles.metadata.get("path", "")
        if not str(table).endswith("_particles.csv"):
            raise cli.InputError(f"the layer '{particles.name}' is not a particle table of blurflow particles (*_particles.csv)")
        argv = ["tracks", str(table), "--quiet", "--memory", str(memory), "--frame-interval-ms", repr(frame_interval_ms), "--exposure-ms", repr(exposure_ms)]
        return _start(viewer, argv, [cli.tracks_out(_parse(argv))])

    return _guarded("tracks", build)
