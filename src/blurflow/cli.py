"""Command line: ``blurflow predict`` (flow maps of your own images) and ``blurflow info``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from blurflow import __version__, devices, logs, schema
from blurflow.files import atomic_path, remove_stale_temporaries
from blurflow.optics import Optics

if TYPE_CHECKING:
    from blurflow.imagefile import ImageFile, Scan

log = logging.getLogger("blurflow")
CHANNELS = ("v1", "v2", "v3", "z0", "w")
MAX_WINDOW = 512  # px: the largest particle fit window (a 512 px window's kernel bank alone takes gigabytes)


class InputError(ValueError):
    """A problem with the user's input that is reported in one line (exit status 1)."""


class UsageError(InputError):
    """A bad command-line option, reported in one line naming it (exit status 2)."""


SOFTWARE = f"blurflow {__version__}"  # written into every output, so outputs are never taken as inputs


def read_pixels(path: Path) -> np.ndarray:
    """The pixels of an image file as stored (blurflow.sources.read_image); one line if unreadable."""
    from blurflow.sources import read_image

    try:
        return np.asarray(read_image(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is 'unreadable'
        raise InputError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None


def open_planes(path: Path, offset: float, working_bytes: Callable[[int, int], int]) -> tuple[ImageFile, Scan]:
    """The image at ``path`` opened without decoding it (blurflow.imagefile.open_image: one line
    where it cannot be read, is too small, or would not fit the memory at hand with
    ``working_bytes(h, w)``) and scanned band by band (blurflow.imagefile.scan: frames of a stack
    left out, the share of pixels at or below ``offset``, the peak); its warnings printed."""
    from blurflow.imagefile import ImageError, open_image, scan

    try:
        image = open_image(path, working_bytes)
        for line in image.notes:
            note(f"blurflow: warning: {line}")
        found = scan(image, offset)
    except ImageError as exc:
        raise InputError(str(exc)) from None
    for line in found.notes:
        note(f"blurflow: warning: {line}")
    return image, found


def check_disk(target: Path, size: int) -> None:
    """InputError (one line, nothing written) where the disk that will hold ``target`` has less
    than ``size`` bytes free."""
    import shutil

    from blurflow.imagefile import gigabytes

    folder = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if size > free:
        raise InputError(f"{target}: needs {gigabytes(size)} of disk, {gigabytes(free)} free there: nothing written")


def to_physical(pred: np.ndarray, meta: dict, pixel_um: float, exposure_ms: float | None) -> tuple[np.ndarray, list[str]]:
    """(…, 5, H, W) canonical normalised (v1, v2, v3, z0, w) -> physical units and unit names.

    v1, v2: L px per exposure times the pixel size; v3: A um per exposure; divided by the exposure
    time (s) when it is given. z0: A um. w stays in [0, 1].
    """
    scales = meta["scales"]
    out = pred.astype(np.float32).copy()
    out[..., 0:2, :, :] *= scales["lateral_scale_px"] * pixel_um
    out[..., 2:4, :, :] *= scales["axial_scale_um"]
    speed_unit = "um/exposure"
    if exposure_ms:
        out[..., 0:3, :, :] /= exposure_ms / 1000
        speed_unit = "um/s"
    return out, [speed_unit] * 3 + ["um", "1"]


OUTPUTS = {  # what each command writes per image
    "predict": ("_flow.tif", "_flow.png"), "particles": ("_particles.csv", "_particles.png"), "tracks": ("_tracks.csv",),
}  # fmt: skip


def output_paths(stem: Path, command: str = "predict") -> tuple[Path, Path]:
    """The files ``command`` writes for an image: ``<stem>_flow.tif`` and ``<stem>_flow.png``, or
    ``<stem>_particles.csv`` and ``<stem>_particles.png``."""
    return tuple(stem.with_name(stem.name + suffix) for suffix in OUTPUTS[command])


def is_output(path: Path) -> bool:
    """Whether ``path`` is a file written by ``blurflow predict`` or ``particles`` (by the software
    tag it carries, or a CSV's header)."""
    try:
        if path.suffix.lower() == ".csv":
            with open(path) as f:
                return f.readline().startswith(",".join(PARTICLE_COLUMNS[:5]) + ",")
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return str(tif.pages[0].software).startswith("blurflow")
        from PIL import Image

        with Image.open(path) as im:
            return str(im.info.get("Software", "")).startswith("blurflow")
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are read
        return False


def plan_outputs(images: list[Path], out_dir: Path | None, command: str = "predict") -> dict[Path, Path]:
    """Output stem of every input image: beside the image, or under ``out_dir`` at the image's path
    relative to the folder that holds all inputs (d1/img.tif and d2/img.tif stay apart). An image
    given twice counts once; two inputs that would write the same output (img.tif and img.png) are
    an ``InputError`` before anything is written."""
    unique: dict[Path, Path] = {}
    for path in images:
        unique.setdefault(path.resolve(), path)
    base = Path(os.path.commonpath([p.parent for p in unique]))
    plan: dict[Path, Path] = {}
    taken: dict[Path, Path] = {}
    for resolved, given in unique.items():
        folder = given.parent if out_dir is None else out_dir / resolved.parent.relative_to(base)
        stem = folder / given.stem
        if stem.resolve() in taken:
            raise InputError(f"{taken[stem.resolve()]} and {given} would both write {output_paths(stem, command)[0]}; rename one or run them separately")
        taken[stem.resolve()] = given
        plan[given] = stem
    return plan


def check_targets(stem: Path, command: str = "predict") -> None:
    """``InputError`` when an output of ``stem`` exists and is not blurflow's own (a user's file
    is never overwritten)."""
    for target in output_paths(stem, command):
        if target.exists() and not is_output(target):
            raise InputError(f"{target} exists and is not an output of blurflow {command}; not overwritten (move it, or use --out)")


PREVIEW_PX = 1024  # the PNG shows at most this many pixels along a side (every n-th pixel of the flow)


PREDICT_BYTES = 1_000_000_000  # PyTorch, segmentation-models-pytorch, a model and its batch of tiles
PREDICT_BYTES_PER_PX = 64  # memory per pixel of a band's rows: the input, the raw sums, the smoothing's rows


def predict_working(tile: int, chosen: dict) -> Callable[[int, int], int]:
    """Memory (bytes) that predicting an image of h x w px takes beside its decoding: the model
    and a band of about three tile rows and the smoothing's margins (blurflow.evaluate.predict_bands)."""
    from blurflow.model import smoothing_reach

    rows = 3 * tile + 2 * smoothing_reach(chosen["smooth_px"], chosen["edges"])
    return lambda h, w: PREDICT_BYTES + PREDICT_BYTES_PER_PX * w * min(rows, h)


def predict_file(model, meta: dict, path: Path, stem: Path, args: argparse.Namespace, pixel_um: float, chosen: dict) -> list[Path]:
    """Predict one image and write ``<stem>_flow.tif`` (ImageJ hyperstack, float32, channels v1 v2
    v3 z0 w; written band by band) and ``<stem>_flow.png``; both appear only when complete.
    ``chosen``: the readout (keyword arguments of blurflow.evaluate.predict_bands).
    Memory: a few tile rows and what the file decodes at once, whatever the image size
    (blurflow.imagefile); an image that would not fit, or whose flow would not fit the disk, is
    refused before anything is written."""
    import tifffile

    from blurflow import figures
    from blurflow.evaluate import predict_bands, tile_count
    from blurflow.imagefile import preview as reduced

    tile = meta["image_px"]
    image, scanned = open_planes(path, args.offset, predict_working(tile, chosen))
    below_offset(path, scanned.below, args)
    skipped = scanned.skipped
    t, h, w = image.shape
    step = -(-max(h, w) // PREVIEW_PX)
    units = to_physical(np.zeros((5, 1, 1), np.float32), meta, pixel_um, args.exposure_ms)[1]
    labels = [f"{c} ({u})" for c, u in zip(CHANNELS, units)]
    shape, axes = ((t, 5, h, w), "TCYX") if t > 1 else ((5, h, w), "CYX")
    tif, png = output_paths(stem)
    check_disk(tif, t * 5 * h * w * 4)
    tiles = t * tile_count(h, w, tile)
    with (
        atomic_path(tif) as tmp_tif,
        atomic_path(png) as tmp_png,
        logs.progress(total=tiles, enabled=not args.quiet and tiles > 256, desc=path.name, unit="tile", leave=False) as bar,
    ):
        # the header and an empty data block, filled band by band below (plain writes: no image-sized buffer)
        offset, _ = tifffile.imwrite(
            tmp_tif, shape=shape, dtype="<f4", returnoffset=True, imagej=True, software=SOFTWARE, resolution=(1 / pixel_um, 1 / pixel_um),
            metadata={"axes": axes, "unit": "um", "Labels": labels * t, "Info": json.dumps(dict(zip(CHANNELS, units)))},
        )  # fmt: skip
        preview = np.zeros((5, -(-h // step), -(-w // step)), np.float32)
        shown = min(set(range(t)) - set(skipped))  # the preview's frame: the first one processed
        with open(tmp_tif, "r+b") as f:
            for i in range(t):
                if i in skipped:  # a frame left out: NaN flow
                    f.seek(offset + i * 5 * h * w * 4)
                    for _ in range(5 * h):
                        f.write(np.full(w, np.nan, "<f4").tobytes())
                    bar.update(tiles // t)
                    continue

                def read(y0: int, y1: int, i: int = i) -> torch.Tensor:
                    return torch.from_numpy((image.rows(i, y0, y1)[None] - args.offset) * args.gain)

                for y0, maps in predict_bands(model, read, h, w, tile, batch=args.batch, bar=bar, **chosen):
                    phys = to_physical(maps.numpy(), meta, pixel_um, args.exposure_ms)[0].astype("<f4")
                    for c in range(5):  # channel c of plane i is one contiguous block of h x w values
                        f.seek(offset + ((i * 5 + c) * h + y0) * w * 4)
                        f.write(phys[c].tobytes())
                    if i == shown:
                        first = -y0 % step
                        preview[:, (y0 + first) // step : (y0 + phys.shape[1] - 1) // step + 1] = phys[:, first::step, ::step]
        figures.save_png(figures.flow_overlay(reduced(image, shown, step), preview, units), tmp_png, SOFTWARE)
    return [tif, png]


MODEL_SUFFIXES = (".pt", ".pth")  # a first input with one of these is the model, never an image
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")  # what a folder given as input contributes


def split_model(inputs: list[str]) -> tuple[Path | None, list[Path]]:
    """(model file or None, images) of ``[MODEL] IMAGE...``: the first input is the model when it
    is a .pt / .pth file; a folder among the images stands for the image files in it (not its
    subfolders); ``UsageError`` when no image follows the model, ``InputError`` for a folder
    without images."""
    first = Path(inputs[0])
    model, given = (first, inputs[1:]) if first.suffix.lower() in MODEL_SUFFIXES else (None, inputs)
    if not given:
        raise UsageError(f"IMAGE: no image given after the model {first}")
    images = []
    for name in map(Path, given):
        try:
            name.resolve()
        except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError on a loop, 3.13 OSError
            raise InputError(f"{name}: its symbolic links lead in a loop") from None
        if name.suffix.lower() in MODEL_SUFFIXES:
            raise UsageError(f"IMAGE: {name} is a model file; give the model first, then the images")
        if name.is_dir():
            found = sorted(p for p in name.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{name} is a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        else:
            images.append(name)
    return model, images


def model_and_images(inputs: list[str]) -> tuple[Path, list[Path], bool]:
    """(model file, images, whether the model is the shipped one) of ``[MODEL] IMAGE...``."""
    from blurflow.modelfile import SHIPPED_MODEL

    model, images = split_model(inputs)
    if model is not None:
        return model, images, False
    if not SHIPPED_MODEL.is_file():
        raise InputError(f"no model given and no shipped model at {SHIPPED_MODEL}: give a model file first (results/model/model.pt after snakemake)")
    return SHIPPED_MODEL, images, True


def describe(path: Path, meta: dict) -> str:
    """One line on a model: file, images trained on (a starting model's included), validation R^2."""
    from blurflow.modelfile import images_trained

    if "samples_trained" not in meta:
        return str(path)
    return f"{path} ({images_trained(meta):,} training images, validation R2 {meta['final']['val_r2_mean']:.3f})"


def predict_command(args: argparse.Namespace) -> int:
    from blurflow.modelfile import load_model, readout

    model_path, image_paths, shipped = model_and_images(args.inputs)
    plan = plan_images(image_paths, args, "predict")
    try:
        device = devices.pick_device(args.device)
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None
    try:
        model, meta = load_model(model_path, device)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if shipped and not args.quiet:
        note(f"blurflow: using the shipped model {describe(model_path, meta)}")
    model_pixel = Optics.from_config(meta["optics"]).pixel_um
    pixel_um = args.pixel_size_um or model_pixel
    if abs(pixel_um - model_pixel) > 0.01 * model_pixel:
        note(
            f"blurflow: warning: pixel size {pixel_um:g} um differs from the model's {model_pixel:g} um: the blur is measured in pixels "
            f"of the training optics (NA {meta['optics']['na']}, {meta['optics']['wavelength_um']} um), results are approximate"
        )
    given = {"smooth_px": args.smooth_px, "edges": args.edges, "dihedral": args.dihedral}
    chosen = {k: v if given[k] is None else given[k] for k, v in readout(meta).items()}
    return run_images(plan, lambda path, stem: predict_file(model, meta, path, stem, args, pixel_um, chosen), args, "predict")


def plan_images(image_paths: list[Path], args: argparse.Namespace, command: str) -> dict[Path, Path]:
    """Output stem of every image to process (blurflow's own outputs among them are skipped):
    :func:`plan_outputs` under ``--out``, which is created when the first output is written (here
    only checked: one line, exit 2, when a file stands where it or a folder above it would be)."""
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--out: {out_dir} exists and is not a folder")
        blocking = next((p for p in out_dir.absolute().parents if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise UsageError(f"--out: cannot create folder {out_dir}: {blocking} is a file")
    images = []
    for path in image_paths:
        if not is_output(path):
            images.append(path)
        elif not args.quiet:
            note(f"blurflow: skipping {path}: an output of blurflow")
    if not images:
        raise InputError("no input images left: every one given is an output of blurflow")
    return plan_outputs(images, out_dir, command)


def run_images(plan: dict[Path, Path], process, args: argparse.Namespace, command: str) -> int:
    """``process(path, stem)`` for every planned image, which returns the files it wrote: a bad
    image, an unwritable folder or a full disk is one line for that image, and the others go on.
    Exit status 1 if any failed."""
    from blurflow.imagefile import ImageError

    failed = 0
    for folder in {stem.parent for stem in plan.values()}:  # what killed runs left in the output folders
        remove_stale_temporaries(folder, [f"*{suffix}" for suffix in OUTPUTS[command]])
    for path, stem in logs.progress(plan.items(), enabled=not args.quiet and len(plan) > 1, desc=command, unit="image"):
        try:
            check_targets(stem, command)
            written = process(path, stem)
            if not args.quiet:
                note(f"{path}: wrote {', '.join(str(p) for p in written)}", sys.stdout)
        except (InputError, ImageError) as exc:
            note(f"blurflow: error: {exc}")
            failed += 1
        except OSError as exc:  # an output folder that cannot be written, a full disk
            where = exc.filename or stem.parent
            note(f"blurflow: error: {path}: cannot write its results to {where}: {exc.strerror or exc}")
            failed += 1
        except (RuntimeError, ValueError, MemoryError) as exc:  # not foreseen: this image fails in one line, the others go on
            note(f"blurflow: error: {path}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'failed'}")
            failed += 1
    return 1 if failed else 0


PARTICLE_COLUMNS = (
    "particle", "frame", "x", "y", "mass", "x_px", "y_px", "x_um", "y_um", "x_std_px", "y_std_px", "dx_px", "dy_px",
    "v1", "v1_std", "v2", "v2_std", "v3", "v3_std", "z0_um", "z0_std_um", "speed_unit",
    "photons", "photons_std", "background", "background_std", "deviance", "direction_resolved", "depth_sign_resolved", "crosses_focus", "at_bound", "converged",
    "group", "neighbours", "flag",
)  # fmt: skip
BELOW_OFFSET = 0.95  # an image with more of its pixels at or below the offset holds almost no signal: a warning, and a flag on its particles
FAINT = 5.0  # photons below this many of their std: not significant against the background (a flag)


def merged_blobs(found: list) -> np.ndarray:
    """(M, 3) frame, row, col of the merged blobs of ``found`` (blurflow.particles.Detection, one per frame)."""
    return np.concatenate([np.column_stack([np.full(len(d.merged), f), d.merged]) for f, d in enumerate(found)] + [np.zeros((0, 3))])


def particle_table(
    particles, merged: np.ndarray, scales, pixel_um: float, exposure_ms: float | None, flag: str = "", saturated: np.ndarray | None = None
) -> list[dict]:
    """One row per particle (PARTICLE_COLUMNS) of blurflow.particles.fit_frames' ``particles`` in
    physical units: ``frame`` (the plane of a stack: a time series), positions in px of the image
    (column x, row y; ``x``, ``y`` and ``mass`` = photons as trackpy reads them) and um, of the
    path midpoint; dx, dy the lateral path over the exposure in px; v1, v2, v3 in um per exposure,
    or um/s with ``exposure_ms``; z0 in um; ``group``: particles fitted together share it,
    ``neighbours``: streaks reaching its window. ``flag``: what is wrong with the image (on every
    row); a fit whose window held ``saturated`` pixels (N,) bool (left out of it) 'saturated';
    a fit whose deviance exceeds POOR_FIT per counted pixel is flagged 'poor_fit', one whose
    photons lie within FAINT of their std of none 'faint' (maybe no particle: noise or a
    neighbour's tail); the
    ``merged`` blobs (M, 3: frame, row, col; :func:`merged_blobs`) get rows with their position,
    flag 'merged' and no numbers."""
    per = 1000 / exposure_ms if exposure_ms else 1.0
    lateral, axial = scales.lateral_scale_px * pixel_um * per, scales.axial_scale_um
    fit, rows = particles.fit, []
    poor_fits = fit.poor_fit()
    faint = fit.params[:, 6] < FAINT * fit.std[:, 6]
    saturated = np.zeros(len(fit.params), bool) if saturated is None else saturated
    for i, ((cy, cx), p, sd) in enumerate(zip(particles.centres, fit.params, fit.std)):
        x, y = cx + p[0], cy + p[1]
        poor = ";".join(f for f, bad in (("saturated", saturated[i]), ("poor_fit", poor_fits[i]), ("faint", faint[i])) if bad)
        rows.append({
            "particle": i + 1, "frame": int(particles.frame[i]), "x": x, "y": y, "mass": p[6],
            "x_px": x, "y_px": y, "x_um": x * pixel_um, "y_um": y * pixel_um, "x_std_px": sd[0], "y_std_px": sd[1],
            "dx_px": p[2] * scales.lateral_scale_px, "dy_px": p[3] * scales.lateral_scale_px,
            "v1": p[2] * lateral, "v1_std": sd[2] * lateral, "v2": p[3] * lateral, "v2_std": sd[3] * lateral,
            "v3": p[4] * axial * per, "v3_std": sd[4] * axial * per, "z0_um": p[5] * axial, "z0_std_um": sd[5] * axial,
            "speed_unit": "um/s" if exposure_ms else "um/exposure", "photons": p[6], "photons_std": sd[6], "background": p[7], "background_std": sd[7],
            "deviance": fit.deviance[i], "direction_resolved": bool(fit.direction_resolved[i]), "depth_sign_resolved": bool(fit.depth_sign_resolved[i]),
            "crosses_focus": bool(fit.crosses_focus[i]),
            "at_bound": bool(fit.at_bound[i]), "converged": bool(fit.converged[i]), "group": int(particles.group[i]),
            "neighbours": int(particles.neighbours[i]), "flag": ";".join(f for f in (flag, poor) if f),
        })  # fmt: skip
    for f, y, x in merged:
        rows.append({
            "particle": len(rows) + 1, "frame": int(f), "x": x, "y": y, "x_px": x, "y_px": y, "x_um": x * pixel_um, "y_um": y * pixel_um,
            "flag": ";".join(g for g in (flag, "merged") if g),
        })  # fmt: skip
    return rows


PIECE_PX = 2048  # px: own rows and columns of a piece of a frame longer than 1.5 times it (detected and fitted apart)
BATCH_PX = 1 << 24  # pixels of pieces (a movie's frames) fitted in one batch
BATCH_PARTICLES = 4096  # streaks fitted in one batch
PARTICLES_BYTES = 1_200_000_000  # PyTorch, the fitter's motion PSF and kernel bank, a batch's fits
DETECT_BYTES_PER_PX = 40  # memory per pixel of a piece while it is detected
HELD_BYTES_PER_PX = 12  # memory per pixel of a piece while it waits in its batch (counts, labels, masks)


def spans(n: int, margin: int) -> list[tuple[int, int, int, int]]:
    """(own start, own end, read start, read end) of the pieces along a side of ``n`` px: the whole
    side up to 1.5 PIECE_PX, else PIECE_PX each, read with ``margin`` px on either side (where a
    streak centred in its own part finds all of its neighbours)."""
    if n <= PIECE_PX * 3 // 2:
        return [(0, n, 0, n)]
    return [(a, min(a + PIECE_PX, n), max(a - margin, 0), min(a + PIECE_PX + margin, n)) for a in range(0, n, PIECE_PX)]


def particles_working(window: int) -> Callable[[int, int], int]:
    """Memory (bytes) that fitting the particles of an image of h x w px takes beside its decoding:
    the fitter, a piece being detected and a batch of pieces waiting to be fitted."""
    side = PIECE_PX * 3 // 2 + 4 * window
    return lambda h, w: PARTICLES_BYTES + DETECT_BYTES_PER_PX * min(h, side) * min(w, side) + HELD_BYTES_PER_PX * min(BATCH_PX, h * w)


def particles_file(fitter, path: Path, stem: Path, args: argparse.Namespace) -> list[Path]:
    """Detect and fit the beads of every plane of one image (a stack is a time series: one kernel
    bank, batches across its frames, neighbours fitted together); write ``<stem>_particles.csv``
    (PARTICLE_COLUMNS) and ``<stem>_particles.png`` (the first frame processed). A frame longer
    than 1.5 PIECE_PX is detected and fitted in pieces (:func:`spans`), each particle where its
    centre lies: memory stays bounded whatever the image size (blurflow.imagefile)."""
    import pandas as pd

    from blurflow import figures
    from blurflow.imagefile import preview as reduced
    from blurflow.particles import POOR_FIT, Particles, detect, fit_frames, windows

    w = fitter.window
    image, scanned = open_planes(path, args.offset, particles_working(w))
    t, height, width = image.shape
    if w > min(height, width):
        raise InputError(f"{path}: the fit window ({w} px) is larger than the image ({height} x {width} px): use a smaller --window")
    flag = "below_offset" if below_offset(path, scanned.below, args) else ""
    saturation = saturation_level(path, scanned, args.saturation, image.top, args.quiet)
    shown = min(set(range(t)) - set(scanned.skipped))  # the figure's frame: the first one processed
    step = -(-max(height, width) // PREVIEW_PX)
    streaks = np.zeros((-(-height // step), -(-width // step)), bool)  # the figure's frame's streaks, reduced
    fitted_rows: list[dict] = []
    merged_rows: list[dict] = []
    rejected = {"border": 0, "merged": 0}
    groups = 0
    batch: list[tuple] = []  # (frame, own box, origin, counts, detection, saturated pixels)

    def fit_batch() -> None:
        nonlocal groups
        if not batch:
            return
        fitted = fit_frames(fitter, [b[3] for b in batch], [b[4] for b in batch])
        piece, (cy, cx) = fitted.frame, fitted.centres.T
        own = np.array([b[1] for b in batch]).reshape(-1, 4)
        mine = np.flatnonzero((own[piece, 0] <= cy) & (cy < own[piece, 1]) & (own[piece, 2] <= cx) & (cx < own[piece, 3]))
        clipped = np.zeros(len(piece), bool)  # fits whose window held saturated pixels
        for j, (_, _, _, _, _, hot) in enumerate(batch):
            if hot is not None and hot.any():
                clipped[piece == j] = windows(hot.astype(np.float32), fitted.centres[piece == j], w).numpy().any(axis=(1, 2))
        origin = np.array([b[2] for b in batch]).reshape(-1, 2)
        frames = np.array([b[0] for b in batch])
        at = piece[mine]
        kept = Particles(frames[at], fitted.centres[mine] + origin[at], fitted.group[mine] + groups, fitted.neighbours[mine], fitted.fit.take(mine), [])
        merged = merged_blobs(fitted.detections)
        merged[:, 1:] += origin[merged[:, 0].astype(int)]
        merged[:, 0] = frames[merged[:, 0].astype(int)]
        rows = particle_table(kept, merged, fitter.scales, fitter.optics.pixel_um, args.exposure_ms, flag, clipped[mine])
        fitted_rows.extend(rows[: len(mine)])
        merged_rows.extend(rows[len(mine) :])
        groups += int(fitted.group.max()) + 1 if len(piece) else 0
        for (k, (y0, y1, x0, x1), (oy, ox), *_), det in zip(batch, fitted.detections):
            rejected.update({r: rejected[r] + n for r, n in det.rejected.items()})
            if k == shown:
                ys, xs = np.nonzero(det.labels[y0:y1, x0:x1])
                streaks[(ys + y0 + oy) // step, (xs + x0 + ox) // step] = True
        batch.clear()

    for k in sorted(set(range(t)) - set(scanned.skipped)):
        for ys in spans(height, 2 * w):
            for xs in spans(width, 2 * w):
                raw = image.rows(k, ys[2], ys[3], xs[2], xs[3])
                counts = (raw - args.offset) * args.gain
                box = (ys[0] - ys[2], ys[1] - ys[2], xs[0] - xs[2], xs[1] - xs[2])
                det = detect(counts, w, threshold=args.threshold, own=None if counts.shape == (height, width) else box)
                hot = raw >= saturation if saturation is not None else None
                if hot is not None:
                    det.unfitted |= hot  # left out of every fit
                batch.append((k, box, (ys[2], xs[2]), counts, det, hot))
                if sum(b[3].size for b in batch) >= BATCH_PX or sum(len(b[4].centres) for b in batch) >= BATCH_PARTICLES:
                    fit_batch()
    fit_batch()
    rows = fitted_rows + merged_rows
    for i, row in enumerate(rows):
        row["particle"] = i + 1
    table = pd.DataFrame(rows, columns=list(PARTICLE_COLUMNS))
    if fitter.static:  # held at 0, not measured
        table[["dx_px", "dy_px", "v1", "v1_std", "v2", "v2_std", "v3", "v3_std"]] = np.nan
    csv, png = output_paths(stem, "particles")
    tracks = link_table(path, table, args) if args.link else None
    with atomic_path(csv) as tmp_csv, atomic_path(png) as tmp_png:
        table.to_csv(tmp_csv, index=False)
        drawn = table[table["frame"] == shown].copy()
        drawn[["x_px", "y_px", "dx_px", "dy_px"]] = (drawn[["x_px", "y_px", "dx_px", "dy_px"]] + [0.5, 0.5, 0, 0]) / step - [0.5, 0.5, 0, 0]
        figure = figures.particles_overlay((reduced(image, shown, step) - args.offset) * args.gain, streaks, drawn)
        figures.save_png(figure, tmp_png, SOFTWARE)
    written = [csv, png]
    if tracks is not None:
        written.append(output_paths(stem, "tracks")[0])
        with atomic_path(written[-1]) as tmp:
            tracks.to_csv(tmp, index=False)
    if not args.quiet:
        why = {"border": "at the border", "merged": "merged blobs wider than the window (rows flagged 'merged')"}
        left = ", ".join(f"{n} {why[k]}" for k, n in rejected.items() if n)
        flags = table["flag"].fillna("")
        jointly = int((table["neighbours"].fillna(0) > 0).sum())
        frames = f" in {t} frames" if t > 1 else ""
        note(
            f"blurflow: {path}: {int((~flags.str.contains('merged')).sum())} particles fitted{frames}"
            + (f", {jointly} of them with their neighbours" if jointly else "")
            + (f" (left out: {left})" if left else "")
        )
        clipped_n = int(flags.str.contains("saturated").sum())
        if clipped_n:
            note(f"blurflow: warning: {path}: {clipped_n} fits left saturated pixels out of their window (flagged 'saturated')")
        faint = int(flags.str.contains("faint").sum())
        if faint:
            note(f"blurflow: warning: {path}: {faint} fits hold photons within {FAINT:g} std of none (flagged 'faint'): maybe no particle")
        poor = int(flags.str.contains("poor_fit").sum())
        if poor:
            note(
                f"blurflow: warning: {path}: {poor} fits do not explain their window (deviance > {POOR_FIT:g} per pixel; "
                "flagged 'poor_fit'): crossing or unusual particles"
            )
        if tracks is not None:
            note(f"blurflow: {path}: {tracks_summary(tracks)}")
    return written


def link_table(path: Path, table, args: argparse.Namespace):
    """The tracks (blurflow.tracks.link) of a stack's particle ``table``, or None with a warning
    line where it has fewer than 2 frames with particles; InputError where it cannot be linked."""
    from blurflow.tracks import TracksError, link

    if table.loc[table["v1"].notna(), "frame"].nunique() < 2:
        note(f"blurflow: warning: {path}: particles in fewer than 2 frames: no tracks")
        return None
    try:
        return link(table, args.frame_interval_ms / 1000, args.exposure_ms / 1000)
    except TracksError as exc:
        raise InputError(f"{path}: {exc}") from None


def tracks_summary(tracks) -> str:
    """One line: how many tracks of how many particles, their lengths, how their directions are known."""
    lengths = tracks.groupby("particle").size()
    directions = tracks["direction"].value_counts()
    return (
        f"{tracks['particle'].nunique()} tracks of {len(tracks)} particles in {tracks['frame'].nunique()} frames "
        f"(median length {int(lengths.median())}, longest {int(lengths.max())}); directions: "
        + ", ".join(f"{directions.get(k, 0)} {k}" for k in ("fit", "track", "unknown"))
    )


def below_offset(path: Path, share: float, args: argparse.Namespace) -> bool:
    """Whether nearly all pixels (a ``share`` of more than BELOW_OFFSET) are at or below ``--offset``: a warning line."""
    if share > BELOW_OFFSET and not args.quiet:
        note(
            f"blurflow: warning: {path}: {share:.1%} of the pixels are at or below the offset {args.offset:g}: "
            "the image holds almost no signal (is --offset right?)"
        )
    return share > BELOW_OFFSET


PLATEAU = 4  # pixels at an image's maximum that make a plateau: the camera's saturation


def saturation_level(path: Path, scanned: Scan, saturation: float | None, top: float | None, quiet: bool) -> float | None:
    """The camera value (before --offset and --gain) at and above which pixels are saturated:
    ``saturation`` (--saturation), else the image's maximum (``scanned``) where it is an ADC's top
    (2^k - 1, 8 bits or more) and PLATEAU or more pixels hold it (a clipped bead of a 12-bit
    camera in a 16-bit file: one warning line), else the top of the file's integer dtype ``top``
    (None for floats: no pixel is saturated)."""
    if saturation is not None:
        return saturation
    peak = scanned.peak
    adc_top = peak >= 255 and float(peak + 1).is_integer() and (int(peak) + 1) & int(peak) == 0  # 2^k - 1: an ADC's top (8-16 bit)
    if adc_top and scanned.held >= PLATEAU:
        if not quiet:
            note(f"blurflow: warning: {path}: {scanned.held} pixels at the maximum {peak:g}: taken as the camera's saturation (--saturation sets it)")
        return peak
    return top


OPTICS_FLAGS = ("na", "n", "wavelength_um", "magnification", "camera_pixel_um")


def optics_and_scales(args: argparse.Namespace, model: Path | None, fallback: dict | None = None):
    """(Optics, MotionScales) of a command: from a model file, else a config file (``--config``: its
    optics and motion sections), else ``fallback`` (the optics of a PSF model), overlaid by the
    flags; the schema's defaults for what none of them sets."""
    from blurflow.optics import MotionScales

    if model is not None:
        from blurflow.modelfile import load_model

        try:
            _, meta = load_model(model)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        optics_cfg, scales_cfg = meta["optics"], meta["scales"]
    elif args.config:
        import yaml

        try:
            user_config = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"--config: cannot read {args.config}: {exc}") from None
        if not isinstance(user_config, dict):
            raise UsageError(f"--config: {args.config} is not a blurflow config (a YAML mapping of sections)")
        error = schema.schema_error(user_config)
        if error:
            raise UsageError(f"--config: {args.config}: {error}")
        optics_cfg, scales_cfg = user_config.get("optics", {}), user_config.get("motion", {})
    else:
        optics_cfg, scales_cfg = fallback or {}, {}
    flags = {k: getattr(args, k) for k in OPTICS_FLAGS if getattr(args, k, None) is not None}
    scale_flags = {k: getattr(args, k) for k in ("lateral_scale_px", "axial_scale_um") if getattr(args, k, None) is not None}
    try:
        return Optics.from_config({**optics_cfg, **flags}), MotionScales.from_config({**scales_cfg, **scale_flags})
    except (TypeError, ValueError) as exc:
        raise UsageError(f"optics: {exc}") from None


def read_psf_model(path: str):
    """The PSF model of ``--psf`` (blurflow.psfmodel.PSFModel); one line if it cannot be read."""
    from blurflow.psfmodel import PSFModel, PSFModelError

    try:
        return PSFModel.read(path)
    except PSFModelError as exc:
        raise InputError(f"--psf: {exc}") from None


def particles_command(args: argparse.Namespace) -> int:
    from blurflow.particles import BeadFitter
    from blurflow.psfmodel import PSFModelError

    model, image_paths = split_model(args.inputs)
    psf = read_psf_model(args.psf) if args.psf else None
    optics, scales = optics_and_scales(args, model, psf.optics.to_dict() if psf else None)
    if psf is not None:
        try:
            psf.check_pixel(optics)
        except PSFModelError as exc:
            raise InputError(f"--psf: {args.psf}: {exc}") from None
    plan = plan_images(image_paths, args, "particles")
    fitter = BeadFitter(optics, scales, args.window, psf=psf, static=args.static)
    return run_images(plan, lambda path, stem: particles_file(fitter, path, stem, args), args, "particles")


def read_stack(path: Path, repeats: int) -> np.ndarray:
    """A z-stack (Z, H, W) in its own dtype: a 3-D TIFF, or a 4-D one (planes, repeats, H, W), or
    ``repeats`` consecutive planes per step; repeated planes are averaged (float32 then)."""
    data = read_pixels(path)
    if data.ndim == 3 and repeats > 1:
        if data.shape[0] % repeats:
            raise InputError(f"{path}: {data.shape[0]} planes are not a whole number of steps of --repeats {repeats}")
        data = data.reshape(-1, repeats, *data.shape[1:])
    if data.ndim == 4:
        data = data.mean(1, dtype=np.float64).astype(np.float32) if data.shape[1] > 1 else data[:, 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a z-stack (planes, rows, cols) or (planes, repeats, rows, cols), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: the stack contains NaN or Inf pixels")
    return data


def calibrate_command(args: argparse.Namespace) -> int:
    """``blurflow calibrate``: a PSF model file from a bead z-stack, or from the ideal optics."""
    from blurflow import figures
    from blurflow.particles.calibrate import CalibrationError, calibrate
    from blurflow.psfmodel import SYMMETRY_TOL, PSFModel

    out = Path(args.out)
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise UsageError(f"--out: a PSF model file ends in .h5, got {out.name}")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out: {out} is a folder")
    optics, scales = optics_and_scales(args, None)
    if args.stack is None:
        if args.z_step_um is not None:
            raise UsageError("--z-step-um: without a STACK the model is the ideal optics' (give the stack to calibrate)")
        reach = 2 * scales.axial_scale_um  # the depths of the synthesis ranges (z0 + v3 <= 2 A)
        model = PSFModel.from_optics(optics, (-reach, reach), args.window or 64)
    else:
        if args.z_step_um is None:
            raise UsageError("--z-step-um: the z step between the stack's planes (um) is needed")
        stack = read_stack(Path(args.stack), args.repeats)
        try:
            model = calibrate(stack, args.z_step_um, optics, args.offset, args.gain, args.window, args.oversample, args.saturation, snr_min=args.snr_min)
        except CalibrationError as exc:
            raise InputError(f"{args.stack}: {exc}") from None
    size = model.table.shape[-1] // model.oversample
    ideal = PSFModel.from_optics(optics, model.z_range_um, size)
    png = out.with_name(f"{out.stem}_calibration.png")
    with atomic_path(png) as tmp_png:
        figures.save_png(figures.calibration(model, ideal), tmp_png, SOFTWARE)
        model.write(out)
    if not args.quiet:
        lo, hi = model.z_range_um
        left = ", ".join(f"{n} {k}" for k, n in model.extra.get("left_out", {}).items() if n)
        made = f"{model.beads} beads" + (f" (left out: {left})" if left else "") if model.beads else "the ideal optics"
        check = model.extra.get("sign_check", {})
        if model.asymmetry < SYMMETRY_TOL:
            depth = "symmetric in depth: depths are folded"
        elif model.symmetric:
            depth = (
                f"asymmetric in depth ({model.asymmetry:.2f}), but its sign does not reproduce on the calibration beads "
                "(one half fitted with the other's model): depths are folded"
            )
        else:
            depth = f"asymmetric in depth ({model.asymmetry:.2f}): depths are fitted signed"
            if check.get("planes"):
                depth += f" (the calibration beads' signs: {check['right_resolved']:.0%} right where resolved, {check['resolved']:.0%} of planes)"
        note(
            f"blurflow: {out}: PSF model from {made}, z {lo:.3g}..{hi:.3g} um every {model.z_step_um:.3g} um, "
            f"{model.table.shape[-1]} x {model.table.shape[-1]} samples of {model.pixel_um / model.oversample:.3g} um, {depth}"
        )
        note(f"{args.stack or 'optics'}: wrote {out}, {png}", sys.stdout)
    return 0


def note(message: str, file=None) -> None:
    """One line to ``file`` (stderr by default), above the progress bar when one is shown."""
    tqdm.write(message, file=file or sys.stderr)


def info_command(args: argparse.Namespace) -> int:
    from blurflow.modelfile import SHIPPED_MODEL, load_model

    path = Path(args.model) if args.model else SHIPPED_MODEL
    if args.model is None and not path.is_file():
        raise InputError(f"no model given and no shipped model at {path}")
    try:
        _, meta = load_model(path)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    print(json.dumps({"model_file": str(path), "shipped": args.model is None, **meta}, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blurflow",
        description="3D flow (v1, v2, v3) and start depth z0 of moving particles from single motion-blurred widefield images.",
        epilog="Method: Shajkofci & Liebling, ISBI 2021. Documentation: README.md.",
    )
    parser.add_argument("--version", action="version", version=f"blurflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "predict",
        help="predict flow maps of your own images",
        description=(
            "Predict the flow field of each image with a trained model. Writes IMAGE_flow.tif (ImageJ hyperstack, float32, "
            "channels v1, v2, v3, z0, w; stacks get one time point per plane) and IMAGE_flow.png (velocity as RGB and a quiver "
            "plot of the lateral motion where w > 0.5). Velocities are in um/s with --exposure-ms, in um per exposure without; "
            "z0 in um; w is the validity (texture enough to show blur) in [0, 1]. Lateral motion is an orientation: (v1, v2) "
            "has v2 >= 0."
        ),
    )
    p.add_argument(
        "inputs", metavar="[MODEL] IMAGE", nargs="+",
        help="MODEL: a model file (.pt) from training, results/model/model.pt; without it the shipped model (models/blurflow.pt, "
        "docs/model.md) is used. IMAGE: TIFF (2D or stack, any dtype), PNG or JPEG; camera counts work best",
    )  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="output folder (default: beside each image)")
    p.add_argument("--exposure-ms", type=float, metavar="T", help="exposure time in ms: velocities in um/s")
    p.add_argument("--pixel-size-um", type=float, metavar="P", help="sample pixel size in um (default: the model's)")
    p.add_argument("--offset", type=float, default=0.0, help="camera offset subtracted from the pixel values (default 0)")
    p.add_argument("--gain", type=float, default=1.0, help="photo-electrons per pixel value after the offset (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--batch", type=int, default=8, help="tiles per inference batch (default 8)")
    p.add_argument(
        "--smooth-px", type=float, metavar="S",
        help="smooth the flow over S pixels (Gaussian sigma, weighted by w; 0: off); default: the width chosen on the model's validation set",
    )  # fmt: skip
    p.add_argument(
        "--edges", action=argparse.BooleanOptionalAction,
        help="smooth without blurring the edges between regions of different motion (3 bilateral passes); default: as chosen on the model's validation set",
    )  # fmt: skip
    p.add_argument(
        "--dihedral", action=argparse.BooleanOptionalAction,
        help="average the flow over the 8 rotations and reflections of each tile (8x the time); default: as chosen on the model's validation set",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=predict_command)

    p = sub.add_parser(
        "particles",
        help="3D velocity of every isolated bead by a maximum-likelihood fit of its streak",
        description=(
            "Find the isolated streaks of tracer particles (beads) in each image and fit each one with the motion PSF by "
            "Poisson maximum likelihood: position, v1, v2, v3, z0, photons and background, each with its Cramer-Rao standard "
            "deviation. Writes IMAGE_particles.csv (one row per particle) and IMAGE_particles.png (streaks outlined, arrows for "
            "the lateral motion coloured by v3). The path is reported moving away from focus (v3 >= 0, z0 >= 0 unless it crosses "
            "focus); (v1, v2) is its direction where direction_resolved, else an orientation. Optics from a model file, a "
            "config file (--config, its optics and motion sections) or the flags; the defaults are config.yaml's."
        ),
    )
    p.add_argument(
        "inputs",
        metavar="[MODEL] IMAGE",
        nargs="+",
        help="MODEL: a model file (.pt) whose optics and blur scales to use; IMAGE: TIFF, PNG or JPEG in camera counts",
    )
    p.add_argument("--config", metavar="YAML", help="a blurflow config file: its optics and motion sections")
    default = {**schema.defaults("optics"), **schema.defaults("motion")}
    for name, what in (("na", "numerical aperture"), ("n", "immersion refractive index"), ("wavelength_um", "emission wavelength in um"),
                       ("magnification", "magnification"), ("camera_pixel_um", "camera pixel in um"),
                       ("lateral_scale_px", "L: px of lateral motion per unit v"), ("axial_scale_um", "A: um of axial motion per unit v3")):  # fmt: skip
        p.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"{what} ({default[name]:g})")
    p.add_argument("--out", metavar="DIR", help="output folder (default: beside each image)")
    p.add_argument("--exposure-ms", type=float, metavar="T", help="exposure time in ms: velocities in um/s")
    p.add_argument("--offset", type=float, default=0.0, help="camera offset subtracted from the pixel values (default 0)")
    p.add_argument("--gain", type=float, default=1.0, help="photo-electrons per pixel value after the offset (default 1)")
    p.add_argument("--window", type=int, default=64, help="fit window in px, even, 16-512 (default 64): holds the longest streak")
    p.add_argument("--threshold", type=float, default=5.0, help="detection threshold in noise standard deviations (default 5)")
    p.add_argument(
        "--psf", metavar="PSF.h5",
        help="a PSF model file (blurflow calibrate): fit with the measured PSF; its optics unless a model, --config or flags give them "
        "(the pixel sizes must agree); depths signed where it is asymmetric in z",
    )  # fmt: skip
    p.add_argument(
        "--saturation", type=float,
        help="the camera's top value (before --offset and --gain): pixels at it are left out of the fits and their particles flagged 'saturated' "
        "(default: the image's maximum where it is 2^k - 1 and 4 or more pixels hold it, else the top of an integer dtype)",
    )  # fmt: skip
    p.add_argument("--static", action="store_true", help="the beads do not move during the exposure: fit x, y, z0, photons and background only")
    p.add_argument("--link", action="store_true", help="also link a stack's particles into 3D tracks (as blurflow tracks): IMAGE_tracks.csv")
    p.add_argument("--frame-interval-ms", type=float, metavar="T", help="with --link: time from one frame's start to the next's (ms)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=particles_command)

    p = sub.add_parser(
        "calibrate",
        help="a PSF model file from a z-stack of static beads (or from the ideal optics)",
        description=(
            "Measure the microscope's PSF from a z-stack of static beads (planes every --z-step-um): the isolated, unsaturated "
            "beads are registered to sub-pixel in x and y and to each other in z (their focus curves), averaged on a grid finer "
            "than the camera's and smoothed in z. Writes OUT (HDF5: the PSF table, the optics, z step and range, z = 0 at the "
            "sharpest mean plane, beads averaged, the stack's hash, a residual map) and OUT_calibration.png (xz, yz sections and "
            "focus curve beside the ideal PSF of the same optics). Without STACK, the ideal optics' PSF in the same format. "
            "Use it with blurflow particles --psf."
        ),
    )
    p.add_argument("stack", metavar="STACK", nargs="?", help="TIFF z-stack of static beads: (planes, rows, cols), or (planes, repeats, rows, cols)")
    p.add_argument("--out", metavar="PSF.h5", required=True, help="the PSF model file to write")
    p.add_argument("--z-step-um", type=float, metavar="S", help="z step between planes in um (required with STACK)")
    p.add_argument("--repeats", type=int, default=1, help="consecutive planes taken at each step, averaged (default 1)")
    p.add_argument("--config", metavar="YAML", help="a blurflow config file: its optics (and, without STACK, motion) sections")
    for name in OPTICS_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"{name.replace('_', ' ')} ({default[name]:g})")
    p.add_argument("--offset", type=float, default=0.0, help="camera offset subtracted from the pixel values (default 0)")
    p.add_argument("--gain", type=float, default=1.0, help="photo-electrons per pixel value after the offset (default 1)")
    p.add_argument("--saturation", type=float, help="the camera's top value: beads reaching it are left out (default: the top of an integer dtype)")
    p.add_argument("--window", type=int, help="window per bead in camera px, even, 8-256 (default: what the stack's depth needs, <= 64; 64 without STACK)")
    p.add_argument("--oversample", type=int, help="model samples per camera px, 1-4 (default: the optics' smallest unaliased one)")
    p.add_argument(
        "--snr-min", type=float, default=20.0,
        help="keep the planes about focus where the mean bead's peak stands this many standard errors above its noise (default 20; lower: deeper, noisier)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no messages")
    p.set_defaults(func=calibrate_command)

    p = sub.add_parser(
        "tracks",
        help="link the particles of a stack across frames in 3D (trackpy, each bead predicted by its own velocity)",
        description=(
            "Link the particles of a time series (the table of blurflow particles on a stack) into 3D tracks with trackpy: each "
            "bead's next position is predicted from its own velocity, the search range set by the prediction's std; beads whose "
            "direction the exposure leaves open take it from the track. Writes TABLE_tracks.csv (particle = track id, frame, t_s, "
            "x, y, z in um, velocities in um/s): napari's Tracks layer and trackpy's imsd / motion read it."
        ),
    )
    p.add_argument("table", metavar="PARTICLES_CSV", help="IMAGE_particles.csv of a stack (blurflow particles)")
    p.add_argument("--frame-interval-ms", type=float, required=True, help="time from one frame's start to the next's (ms)")
    p.add_argument("--exposure-ms", type=float, required=True, help="exposure of each frame (ms)")
    p.add_argument("--memory", type=int, default=0, help="frames a bead may be missing and keep its track (default 0)")
    p.add_argument("--out", help="the tracks' table (default beside the input: NAME_tracks.csv)")
    p.add_argument("--quiet", action="store_true", help="no summary")
    p.set_defaults(func=tracks_command)

    p = sub.add_parser(
        "field",
        help="the flow field on a grid from a particles or tracks table, or a flow map (mean velocity per cell, inverse-variance weighted)",
        description=(
            "Grid the signed velocities of a particles or tracks table (blurflow particles, blurflow tracks) on square cells "
            "from x = y = 0 (and depth bins): per cell the inverse-variance weighted mean (u, v, w = v1, v2, v3) with its standard "
            "error and count, as CSV with openpiv's column names, and a quiver figure. A particles table counts its "
            "direction-resolved beads only; a tracks table also those its tracks resolved. A flow map (IMAGE_flow.tif of blurflow "
            "predict) gives the same cells from its pixels where w > 0.5, each weighted by w (lateral motion as an orientation, "
            "v >= 0), for a comparison cell by cell."
        ),
    )
    p.add_argument("table", metavar="TABLE", help="NAME_particles.csv, NAME_tracks.csv or NAME_flow.tif")
    p.add_argument("--cell-um", type=float, required=True, help="cell side (um)")
    p.add_argument("--z-bins", type=int, default=1, help="bins of depth over the beads' range (default 1)")
    p.add_argument("--out", help="the field's table (default beside the input: NAME_field.csv; the figure beside it, .png)")
    p.add_argument("--quiet", action="store_true", help="no summary")
    p.set_defaults(func=field_command)

    p = sub.add_parser(
        "measurability",
        help="the ideal R² of each component for a textured sample (Cramér-Rao bound)",
        description=(
            "Print the ideal R² of (|v1|, |v2|, v3, z0) that the Cramér-Rao bound allows from one window of a random texture "
            "blurred by the motion PSF, for the synthesis ranges (the two-zone test's motions) and the cylinder test's flow "
            "profile, at 64 and 32 px windows (blurflow.measurability)."
        ),
    )
    p.add_argument("configs", nargs="*", default=["config.yaml"], metavar="CONFIG", help="config files, later ones overlay earlier ones (default config.yaml)")
    p.add_argument("--slope", type=float, help="spectral slope of the texture (default 2: natural images; smooth microscopy images 4-5)")
    p.add_argument("--contrast", type=float, help="texture standard deviation / photons (default 0.2)")
    p.set_defaults(func=measurability_command)

    p = sub.add_parser("info", help="show what a model file holds", description="Print the metadata of a model file as JSON.")
    p.add_argument("model", metavar="MODEL", nargs="?", help="model file (default: the shipped model, models/blurflow.pt)")
    p.set_defaults(func=info_command)
    return parser


def read_table(path: Path):
    """The CSV table at ``path`` (pandas); InputError (one line) where it is missing or not a CSV table."""
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a CSV table ({exc.__class__.__name__})") from None


def tracks_out(args: argparse.Namespace) -> Path:
    """The tracks' table of ``blurflow tracks``: ``--out``, else NAME_tracks.csv beside the input."""
    path = Path(args.table)
    return Path(args.out) if args.out else path.with_name(path.name.removesuffix("_particles.csv").removesuffix(".csv") + "_tracks.csv")


def tracks_command(args: argparse.Namespace) -> int:
    """Link the particles of a stack's table across frames (blurflow.tracks.link) and write the tracks' table."""
    from blurflow.tracks import TracksError, link

    path = Path(args.table)
    if args.memory < 0:
        raise UsageError(f"--memory must be >= 0 frames, got {args.memory}")
    table = read_table(path)
    try:
        tracks = link(table, args.frame_interval_ms / 1000, args.exposure_ms / 1000, memory=args.memory)
    except TracksError as exc:
        raise InputError(f"{path}: {exc}") from None
    out = tracks_out(args)
    with atomic_path(out) as tmp:
        tracks.to_csv(tmp, index=False)
    if not args.quiet:
        note(f"blurflow: {path}: {tracks_summary(tracks)}")
        note(f"{path}: wrote {out}", sys.stdout)
    return 0


def field_command(args: argparse.Namespace) -> int:
    """Grid the velocities of a particles or tracks table (blurflow.field.grid) or of a flow map
    (grid_flow): CSV and quiver figure."""
    from blurflow import figures
    from blurflow.field import FieldError, grid, grid_flow, read_flow

    path = Path(args.table)
    flow = path.suffix.lower() in (".tif", ".tiff")
    if flow and not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        if flow:
            maps, units, pixel_um = read_flow(path)
            field = grid_flow(maps, pixel_um, units["v1"], args.cell_um, args.z_bins)
        else:
            field = grid(read_table(path), args.cell_um, args.z_bins)
    except FieldError as exc:
        raise InputError(f"{path}: {exc}") from None
    stem = path.with_name(path.name.removesuffix(path.suffix).removesuffix("_particles").removesuffix("_tracks").removesuffix("_flow"))
    csv = Path(args.out) if args.out else stem.with_name(stem.name + "_field.csv")
    png = csv.with_suffix(".png")
    with atomic_path(csv) as tmp_csv, atomic_path(png) as tmp_png:
        field.to_csv(tmp_csv, index=False)
        figures.save_png(figures.flow_field(field), tmp_png, SOFTWARE)
    if not args.quiet:
        counted = "pixels with w > 0.5" if flow else "beads"
        note(f"blurflow: {path}: {len(field)} cells of {args.cell_um:g} um ({args.z_bins} depth bins) from {int(field['count'].sum())} {counted}")
        note(f"{path}: wrote {csv}, {png}", sys.stdout)
    return 0


def measurability_command(args: argparse.Namespace) -> int:
    """``blurflow measurability``: the texture Cramér-Rao report of the config files' setup."""
    from blurflow.measurability import report
    from blurflow.synthesis import Setup

    for path in args.configs:
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such config file")
    config = schema.load(args.configs)
    error = schema.schema_error(config)
    if error:
        raise UsageError(error)
    texture = {k: v for k, v in (("slope", args.slope), ("contrast", args.contrast)) if v is not None}
    for name, value in texture.items():
        if not (np.isfinite(value) and value > 0):
            raise UsageError(f"--{name} must be a positive number, got {value:g}")
    for case, r2 in report(Setup.from_config(config), config["testsets"]["cylinder"], **texture).items():
        scored = [v for v in r2.values() if not np.isnan(v)]
        print(f"{case}: " + ", ".join(f"{k} {v:.2f}" for k, v in r2.items()) + f"; mean {np.mean(scored):.2f}")
    return 0


def check_args(args: argparse.Namespace) -> None:
    """UsageError (one line) for a flag out of its range."""
    for name in ("exposure_ms", "frame_interval_ms", "pixel_size_um", "gain"):
        value = getattr(args, name, None)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value:g}")
    if getattr(args, "link", False) and (args.frame_interval_ms is None or args.exposure_ms is None or args.static):
        raise UsageError("--link needs --frame-interval-ms and --exposure-ms, and moving beads (not --static)")
    smooth = getattr(args, "smooth_px", None)
    if smooth is not None and not (np.isfinite(smooth) and smooth >= 0):
        raise UsageError(f"--smooth-px must be a number of pixels >= 0, got {smooth:g}")
    window = getattr(args, "window", 64)
    if args.command == "calibrate":
        if window is not None and (window < 8 or window > 256 or window % 2):
            raise UsageError(f"--window must be an even number of pixels from 8 to 256, got {window}")
        if args.z_step_um is not None and not (np.isfinite(args.z_step_um) and args.z_step_um > 0):
            raise UsageError(f"--z-step-um must be a positive number of um, got {args.z_step_um:g}")
        if args.repeats < 1:
            raise UsageError(f"--repeats must be a positive number of planes, got {args.repeats}")
        if args.oversample is not None and not 1 <= args.oversample <= 4:
            raise UsageError(f"--oversample must be 1 to 4, got {args.oversample}")
        if not (np.isfinite(args.snr_min) and args.snr_min >= 0):
            raise UsageError(f"--snr-min must be a number >= 0, got {args.snr_min:g}")
    elif window < 16 or window > MAX_WINDOW or window % 2:
        raise UsageError(f"--window must be an even number of pixels from 16 to {MAX_WINDOW}, got {window}")
    threshold = getattr(args, "threshold", 5.0)
    if not (np.isfinite(threshold) and threshold > 0):
        raise UsageError(f"--threshold must be a positive number of noise standard deviations, got {threshold:g}")
    offset = getattr(args, "offset", 0.0)
    if not np.isfinite(offset):
        raise UsageError(f"--offset must be a finite number, got {offset:g}")
    if getattr(args, "batch", 1) < 1:
        raise UsageError(f"--batch must be a positive number of tiles, got {args.batch}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="blurflow: %(message)s")
    logs.terminate_as_interrupt()
    try:
        check_args(args)
        return args.func(args)
    except InputError as exc:
        print(f"blurflow: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: files being written are removed, finished ones stay
        terminated = isinstance(exc, logs.Terminated)
        print(f"\nblurflow: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
