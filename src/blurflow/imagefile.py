"""Image files read piece by piece: a TIFF's strips or tiles are decoded only where a band of rows
needs them (zarr over tifffile; uncompressed data read directly), so memory stays bounded by a band
whatever the image size; an image whose smallest decodable piece and working set do not fit the
memory at hand is refused before a pixel is decoded."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blurflow.sources import luminance, read_image

MIN_SIZE = 32  # px: the smallest side processed (the U-Net halves the image five times)
BAND_PX = 1 << 23  # pixels per band of a pass over a whole image (scan, preview): 32 MB as float32


class ImageError(ValueError):
    """A problem with an image file, in one line that names it."""


def available_memory() -> int:
    """Bytes of memory this process may still take: /proc/meminfo's MemAvailable, less where a
    cgroup (a container, a SLURM job) limits it to its own limit minus its use."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            top = Path(limit).read_text().strip()
            if top != "max" and int(top) < 1 << 60:
                found.append(int(top) - int(Path(used).read_text()))
        except (OSError, ValueError):
            continue
    if not found:
        found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return max(min(found), 0)


def gigabytes(n: float) -> str:
    """``n`` bytes as '1.2 GB'."""
    return f"{n / 1e9:.3g} GB"


@dataclass
class ImageFile:
    """The planes (T, H, W) of an image file (a 2D image is one plane; RGB(A) is read as grey by
    luminance), read as float32 rows of one plane at a time: :meth:`rows`. ``top``: the largest
    value of its integer dtype (None for floats); ``notes``: warnings on reading."""

    path: Path
    shape: tuple[int, int, int]
    top: float | None
    colour: bool
    _read: Callable[[int, slice, slice], np.ndarray]
    notes: list[str] = field(default_factory=list)

    def rows(self, t: int, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        """Pixels of plane ``t``, rows y0..y1, columns x0..x1 (all by default) as float32
        (y1 - y0, x1 - x0); ImageError (one line) where the file's data cannot be decoded."""
        try:
            data = self._read(t, slice(y0, y1), slice(x0, x1))
        except (MemoryError, ImageError):
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure is 'cannot read'
            raise ImageError(f"{self.path}: cannot read image rows {y0}-{y1} of plane {t} ({exc.__class__.__name__}: {exc})") from None
        return (luminance(data) if self.colour else data).astype(np.float32, copy=False)

    def bands(self, t: int, multiple: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) of plane ``t`` in bands of about BAND_PX pixels, each a whole
        number of ``multiple`` rows but the last."""
        h, w = self.shape[1:]
        step = max(1, BAND_PX // w // multiple) * multiple
        for y0 in range(0, h, step):
            yield y0, self.rows(t, y0, min(y0 + step, h))


def open_image(path: str | Path, working_bytes: Callable[[int, int], int] = lambda h, w: 0) -> ImageFile:
    """The image file at ``path`` (TIFF, 2D or a stack; PNG, JPEG or another Pillow-readable file).
    ImageError (one line) where it cannot be read, is not a 2D image or a stack of them, is
    smaller than MIN_SIZE, or where its largest decoded piece plus ``working_bytes(h, w)`` (what
    processing a plane of h x w px takes beside it) exceeds the memory available
    (:func:`available_memory`): then no pixel has been decoded."""
    path = Path(path)
    try:
        image = _open_tiff(path, working_bytes) if path.suffix.lower() in (".tif", ".tiff") else _open_pillow(path, working_bytes)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is 'unreadable'
        raise ImageError(f"{path}: cannot read image ({exc.__class__.__name__}: {exc})") from None
    h, w = image.shape[1:]
    if min(h, w) < MIN_SIZE:
        raise ImageError(f"{path}: image of {h} x {w} px is smaller than the network's minimum {MIN_SIZE} x {MIN_SIZE} px")
    return image


def _check_memory(path: Path, shape: tuple[int, ...], piece: int, held: int, working_bytes: Callable[[int, int], int]) -> None:
    """ImageError where the largest ``piece`` (bytes) the file decodes at once, what is ``held``
    decoded beside it and the working set of a plane of ``shape`` (T, H, W) exceed the memory available."""
    t, h, w = shape
    need, have = piece + held + working_bytes(h, w), available_memory()
    if need > have:
        raise ImageError(
            f"{path}: image of {t} x {h} x {w} px needs about {gigabytes(need)} of memory to process "
            f"({gigabytes(piece)} for the largest piece it decodes at once), {gigabytes(have)} available: not read "
            "(save it as a tiled or stripped TIFF, or crop it)"
        )


def _planes(path: Path, shape: tuple[int, ...]) -> tuple[tuple[int, int, int], bool, list[str]]:
    """((T, H, W), whether the last axis is RGB(A), warnings) of pixel data of ``shape``."""
    if len(shape) == 0 or 0 in shape:
        raise ImageError(f"{path}: cannot read image (no pixel data)")
    colour = len(shape) >= 3 and shape[-1] in (3, 4)  # (…, H, W, RGB[A]); a stack ends in W >= 32
    core = shape[:-1] if colour else shape
    if len(core) not in (2, 3):
        raise ImageError(f"{path}: expected a 2D image or a stack of 2D images, got shape {tuple(shape)}")
    notes = [f"{path}: colour image converted to grey (luminance)"] if colour else []
    return ((1, *core) if len(core) == 2 else tuple(core)), colour, notes


def _top(dtype: np.dtype) -> float | None:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else None


def _open_tiff(path: Path, working_bytes: Callable[[int, int], int]) -> ImageFile:
    """A TIFF's first series: uncompressed contiguous data read band by band from the file;
    otherwise through zarr over tifffile's store (a band decodes the strips or tiles it covers;
    pages stored as one piece are decoded whole, once per plane)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, dtype, offset = tuple(series.shape), np.dtype(series.dtype).newbyteorder(tif.byteorder), series.dataoffset
    planes, colour, notes = _planes(path, shape)
    _, h, w = planes
    samples = shape[-1] if colour else 1
    if offset is not None:  # uncompressed and contiguous: rows straight from the file
        _check_memory(path, planes, 0, 0, working_bytes)

        def read_rows(k: int, ys: slice, xs: slice) -> np.ndarray:
            y0, y1, _ = ys.indices(h)
            rows = np.fromfile(path, dtype, (y1 - y0) * w * samples, offset=offset + (k * h + y0) * w * samples * dtype.itemsize)
            return rows.reshape(y1 - y0, w, *shape[-1:] if colour else ())[:, xs].astype(dtype.newbyteorder("="))

        return ImageFile(path, planes, _top(dtype), colour, read_rows, notes)
    import zarr

    array = zarr.open_array(tifffile.imread(path, aszarr=True), mode="r")
    whole_page = array.chunks[-3 if colour else -2] >= h  # one piece holds every row of a plane: decoded once per plane
    chunk_bytes = int(np.prod(array.chunks)) * dtype.itemsize
    _check_memory(path, planes, chunk_bytes, chunk_bytes if whole_page else 0, working_bytes)  # a whole page: decoded, then held
    lead = len(shape) - colour == 3
    cached: dict[int, np.ndarray] = {}

    def read_pieces(k: int, ys: slice, xs: slice) -> np.ndarray:
        if not whole_page:
            return array[(k, ys, xs) if lead else (ys, xs)]
        if k not in cached:
            cached.clear()
            cached[k] = array[k] if lead else array[...]
        return cached[k][ys, xs]

    return ImageFile(path, planes, _top(dtype), colour, read_pieces, notes)


def _open_pillow(path: Path, working_bytes: Callable[[int, int], int]) -> ImageFile:
    """A PNG, JPEG or other Pillow-readable file: its size read first, then its pixels decoded
    whole (blurflow.sources.read_image) and held."""
    from PIL import Image

    with Image.open(path) as im:
        (w, h), bands = im.size, len(im.getbands())
    _check_memory(path, (1, h, w), h * w * bands * 2, h * w * bands * 2, working_bytes)  # up to 16 bits a sample; decoded, then held
    data = np.asarray(read_image(path))
    planes, colour, notes = _planes(path, data.shape)
    stack = data.reshape(planes + data.shape[-1:] if colour else planes)
    return ImageFile(path, planes, _top(data.dtype), colour, lambda k, ys, xs: stack[k, ys, xs], notes)


@dataclass
class Scan:
    """What a pass over every plane found: ``skipped`` planes (NaN/Inf pixels, or all 0, in a
    stack; counted from 0), ``below`` the share of the other planes' pixels at or below the
    offset, ``peak`` their largest value and ``held`` how many pixels hold it; ``notes``: warnings."""

    skipped: list[int]
    below: float
    peak: float
    held: int
    notes: list[str]


def scan(image: ImageFile, offset: float = 0.0) -> Scan:
    """One pass over ``image``, band by band. A single image with NaN/Inf pixels, or a stack
    whose every plane has them or is all 0, is an ImageError; other such planes of a stack are
    skipped (one warning names them)."""
    t = image.shape[0]
    broken, empty = np.zeros(t, bool), np.ones(t, bool)
    below, total, held, peak = (np.zeros(t, np.int64), np.zeros(t, np.int64), np.zeros(t, np.int64), np.full(t, -np.inf))
    for k in range(t):
        for _, band in image.bands(k):
            if not np.isfinite(band).all():
                broken[k], empty[k] = True, False
                break
            empty[k] &= not band.any()
            below[k] += np.count_nonzero(band <= offset)
            total[k] += band.size
            top = float(band.max())
            held[k] = held[k] * (top <= peak[k]) + np.count_nonzero(band == top) * (top >= peak[k])
            peak[k] = max(peak[k], top)
    if t == 1 and broken[0]:
        raise ImageError(f"{image.path}: image contains NaN or Inf pixels")
    skipped = broken | empty if t > 1 else np.zeros(1, bool)
    if skipped.all():
        raise ImageError(f"{image.path}: no frame of the stack holds an image (NaN/Inf pixels or all 0)")
    named = [f"{', '.join(map(str, np.flatnonzero(m)))} ({why})" for m, why in ((broken, "NaN or Inf pixels"), (empty, "all pixels 0")) if m.any()]
    notes = [f"{image.path}: frames left out (counted from 0): {'; '.join(named)}"] if skipped.any() else []
    used = ~skipped
    top = float(peak[used].max())
    return Scan([int(k) for k in np.flatnonzero(skipped)], below[used].sum() / total[used].sum(), top, int(held[used][peak[used] == top].sum()), notes)


def preview(image: ImageFile, t: int, step: int) -> np.ndarray:
    """Plane ``t`` reduced ``step`` times along each side (the mean of each block; blocks at the
    far edges padded with 0), band by band."""
    from skimage.measure import block_reduce

    if step == 1:
        return image.rows(t, 0, image.shape[1])
    return np.concatenate([block_reduce(band, step, np.mean) for _, band in image.bands(t, step)])
