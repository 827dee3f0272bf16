"""Sharp source images for synthesis: scikit-image samples, phantoms, random textures, Places365, a
user's folder.

Every source is turned into greyscale tiles of ``tile_px`` x ``tile_px`` pixels scaled to [0, 1]
(0.1 and 99.9 percentiles of each image) and stored as uint16 in one HDF5 file per split:
``images`` (N, T, T) uint16, ``source`` (N,) int32 index into the ``names`` attribute.
"""

from __future__ import annotations

import itertools
import logging
import os
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pooch
import requests
from scipy import ndimage

from blurflow import __version__, logs
from blurflow.files import atomic_path
from blurflow.schema import config_hash

log = logging.getLogger(__name__)

# Bundled with scikit-image (no download). Natural images train; microscopy-like ones are held out.
SKIMAGE_TRAIN = (  # every 5th (coins, gravel) validates with the default val_fraction 0.2
    "astronaut", "brick", "camera", "cat", "coins", "chelsea",
    "clock", "coffee", "grass", "gravel", "moon", "rocket",
)  # fmt: skip
SKIMAGE_TEST = ("cell", "immunohistochemistry", "retina", "hubble_deep_field")

PLACES365_URL = "http://data.csail.mit.edu/places/places365/"
PLACES365_MD5 = {  # archive name: md5 (as published with the dataset, also used by torchvision)
    "val_256.tar": "e27b17d8d44f4af9a78502beb927f808",
    "test_256.tar": "f532f6ad7b582262a2ec8009075e186b",
    "train_256_places365standard.tar": "53ca1c756c3d1e7809517cc47c5561c5",
    "train_256_places365challenge.tar": "741915038a5e3471ec7332404dfb64ef",
}
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grey values (float64) of an (…, 3 or 4) RGB(A) array; alpha is ignored."""
    return rgb[..., :3].astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])


def to_grey(image: np.ndarray) -> list[np.ndarray]:
    """2D float32 planes in [0, 1] from a 2D image, an RGB(A) image or a stack of planes."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.float32)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = luminance(image)
    planes = [image] if image.ndim == 2 else list(image.reshape(-1, *image.shape[-2:]))
    out = []
    for plane in planes:
        plane = plane.astype(np.float64)
        if not np.isfinite(plane).all():
            raise ValueError("image contains NaN or Inf pixels")
        lo, hi = np.percentile(plane, [0.1, 99.9])
        if hi <= lo:
            lo, hi = plane.min(), plane.max()
        scaled = (plane - lo) / (hi - lo) if hi > lo else np.zeros_like(plane)
        out.append(np.clip(scaled, 0, 1).astype(np.float32))
    return out


def tiles(image: np.ndarray, tile: int) -> list[np.ndarray]:
    """Non-overlapping tile x tile pieces, centred in the image (none if it is smaller)."""
    h, w = image.shape
    ny, nx = h // tile, w // tile
    y0, x0 = (h - ny * tile) // 2, (w - nx * tile) // 2
    return [image[y0 + i * tile : y0 + (i + 1) * tile, x0 + j * tile : x0 + (j + 1) * tile] for i in range(ny) for j in range(nx)]


def skimage_images(names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Images bundled with scikit-image, by name."""
    from skimage import data

    for name in names:
        yield f"skimage:{name}", getattr(data, name)()


def phantom(size: int, rng: np.random.Generator) -> np.ndarray:
    """Fluorescence-like sample (float32 in [0, 1]): actin-like filaments, beads, cell-like blobs."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    # cells: smooth random blobs with a textured interior
    n_cells = rng.integers(2, 7)
    field = ndimage.zoom(rng.standard_normal((8, 8)), size / 8, order=3)[:size, :size]
    for _ in range(n_cells):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(0.08, 0.2) * size
        angle = np.arctan2(y - cy, x - cx)
        wobble = 1 + 0.25 * np.sin(rng.integers(2, 5) * angle + rng.uniform(0, 2 * np.pi))
        inside = np.hypot(y - cy, x - cx) < r * wobble
        img += inside * rng.uniform(0.15, 0.4) * (1 + 0.3 * field)
    img = ndimage.gaussian_filter(img, 2.0)
    # filaments: smooth random walks rendered as thin lines
    lines = np.zeros_like(img)
    for _ in range(rng.integers(20, 60)):
        n = int(size * rng.uniform(0.3, 1.0))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.05, n))
        py = rng.uniform(0, size) + np.cumsum(np.sin(heading))
        px = rng.uniform(0, size) + np.cumsum(np.cos(heading))
        ok = (py >= 0) & (py < size) & (px >= 0) & (px < size)
        np.add.at(lines, (py[ok].astype(int), px[ok].astype(int)), rng.uniform(0.3, 1.0))
    img += ndimage.gaussian_filter(lines, 0.8) * 2
    # beads: sub-resolution points
    beads = np.zeros_like(img)
    n_beads = rng.integers(20, 200)
    beads[rng.integers(0, size, n_beads), rng.integers(0, size, n_beads)] = rng.uniform(2, 8, n_beads)
    img += ndimage.gaussian_filter(beads, 1.0)
    return np.clip(img / max(float(np.percentile(img, 99.9)), 1e-6), 0, 1)


def texture(size: int, slope: float, skew: float, rng: np.random.Generator) -> np.ndarray:
    """Random texture (float32 in [0, 1]): a Gaussian random field of power spectrum
    (f^2 + f_min^2)^(-slope/2) (f in cycles/px, f_min = 1/size; natural images: slope about 2,
    smooth microscopy images 3.5-5), made log-normal by exp(skew x field / its std) (0: Gaussian; larger:
    sparse bright structure as in fluorescence), stretched to its 0.1st..99.9th percentiles."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    amplitude = (fy**2 + fx**2 + size**-2.0) ** (-slope / 4)
    field = np.fft.ifft2(amplitude * np.fft.fft2(rng.standard_normal((size, size)))).real
    field = field / field.std()
    img = np.expm1(skew * field) / skew if skew else field
    lo, hi = np.percentile(img, [0.1, 99.9])
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)


def texture_images(count: int, size: int, seed: int, slope: Sequence[float], skew: Sequence[float]) -> Iterator[tuple[str, np.ndarray]]:
    """``count`` random textures (:func:`texture`), each from its own seed derived from ``seed``, with
    spectral slope and skew drawn uniformly in the ranges ``slope`` and ``skew``."""
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(count)):
        rng = np.random.default_rng(child)
        yield f"texture:{seed}:{i}", texture(size, rng.uniform(*slope), rng.uniform(*skew), rng)


def phantom_images(count: int, size: int, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """``count`` phantoms, each from its own seed derived from ``seed``."""
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(count)):
        yield f"phantom:{seed}:{i}", phantom(size, np.random.default_rng(child))


def read_image(path: Path) -> np.ndarray:
    """Pixels of a TIFF (tifffile) or of a PNG, JPEG or other Pillow-readable file, as the picture a
    person sees: palette images as their colours (2D when the palette is grey), grey + alpha as the
    grey values. Raises on unreadable files with the reader's own account of what is wrong."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "PA"):  # palette indices -> the colours a person sees (grey palettes stay grey)
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
            rgb = np.asarray(im)
            return rgb[..., 0] if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all() else rgb
        if im.mode in ("LA", "La"):  # grey + alpha: the grey values
            return np.asarray(im.getchannel("L"))
        return np.asarray(im)


def folder_images(folder: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Images of a folder (recursively; TIFF, PNG, JPEG), skipping unreadable files with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"source folder {folder} does not exist or is not a folder")
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            yield str(path), read_image(path)
        except Exception as exc:  # noqa: BLE001 - any reader error means: skip this file
            warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=2)


def download_resumable(url: str, output_file: str, pooch_obj: pooch.Pooch | None, part: Path) -> None:
    """Pooch downloader that continues ``part`` with an HTTP Range request, then moves it in place."""
    done = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    with requests.get(url, headers=headers, stream=True, timeout=60) as r:
        r.raise_for_status()
        if r.status_code != 206:
            done = 0  # server ignored the range: start over
        total = done + int(r.headers.get("Content-Length", 0))
        with open(part, "ab" if done else "wb") as f, logs.progress(total=total, initial=done, unit="B", unit_scale=True, desc=part.name) as bar:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(part, output_file)


def fetch_places365(archive: str, resources: str | Path, base_url: str = PLACES365_URL, md5: str | None = None) -> Path:
    """Download (resumably, checksum-verified, atomically) and unpack a Places365 archive.

    Returns the folder with the unpacked images. A wrong checksum raises ``ValueError`` and leaves
    no archive behind.
    """
    if md5 is None:
        if archive not in PLACES365_MD5:
            raise ValueError(f"unknown Places365 archive {archive!r}; known: {', '.join(PLACES365_MD5)}")
        md5 = PLACES365_MD5[archive]
    resources = Path(resources)
    resources.mkdir(parents=True, exist_ok=True)
    part = resources / f"{archive}.part"

    def downloader(url: str, output_file: str, pooch_obj: pooch.Pooch | None) -> None:
        download_resumable(url, output_file, pooch_obj, part)

    try:
        path = pooch.retrieve(base_url.rstrip("/") + "/" + archive, known_hash=f"md5:{md5}", fname=archive, path=resources, downloader=downloader)
    finally:
        part.unlink(missing_ok=True)
    folder = resources / archive.removesuffix(".tar")
    marker = folder / ".unpacked"
    if not marker.exists():
        with tarfile.open(path) as tar:
            tar.extractall(folder, filter="data")
        marker.touch()
    return folder


def write_sources(images: Iterable[tuple[str, np.ndarray]], path: str | Path, tile_px: int, kind: str, key: str = "") -> int:
    """Tile the images and write them atomically to ``path`` (HDF5); returns the tile count.
    ``key`` (the hash of the config that chose the images, if any) is kept as attribute ``config_hash``.

    Images that cannot be read as greyscale or are smaller than a tile are skipped with a warning;
    no usable tile at all is a ``ValueError``.
    """
    names: list[str] = []
    count = 0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset(
            "images",
            (0, tile_px, tile_px),
            np.uint16,
            maxshape=(None, tile_px, tile_px),
            chunks=(1, tile_px, tile_px),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
        )
        src = f.create_dataset("source", (0,), np.int32, maxshape=(None,), chunks=(4096,))
        for name, image in logs.progress(images, desc=f"sources -> {Path(path).name}", unit="image"):
            try:
                pieces = [t for plane in to_grey(image) for t in tiles(plane, tile_px)]
            except ValueError as exc:
                warnings.warn(f"skipping image {name}: {exc}", stacklevel=2)
                continue
            if not pieces:
                warnings.warn(f"skipping image {name}: smaller than a {tile_px} px tile", stacklevel=2)
                continue
            ds.resize(count + len(pieces), axis=0)
            src.resize(count + len(pieces), axis=0)
            ds[count:] = np.round(np.stack(pieces) * 65535).astype(np.uint16)
            src[count:] = len(names)
            names.append(name)
            count += len(pieces)
        if count == 0:
            raise ValueError(f"no usable source image for {path} (kind {kind!r}, tiles of {tile_px} px)")
        f.attrs.update(names=names, kind=kind, tile_px=tile_px, config_hash=key, blurflow_version=__version__)
    log.info("wrote %d tiles from %d images to %s", count, len(names), path)
    return count


def write_split(split: str, cfg: dict, seed: int, resources: str | Path, path: str | Path) -> int:
    """Write the source tiles of a split (``images_for``) to ``path``, with the hash of the config
    that chose them (``config_hash(cfg, seed)``, as synthesis shards record theirs); returns the tile count."""
    kind = "+".join(split_kinds(split, cfg))
    return write_sources(images_for(split, cfg, seed, resources), path, cfg["tile_px"], kind, config_hash(cfg, seed))


def recorded_hash(path: str | Path) -> str:
    """The ``config_hash`` attribute of a sources file ('' when it was written without one)."""
    with h5py.File(path, "r") as f:
        return str(f.attrs.get("config_hash", ""))


def images_for(split: str, cfg: dict, seed: int, resources: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Source images of a split ('train', 'val' or 'test') for the ``sources`` config section.

    ``kind`` may be a list of kinds: their images are concatenated (synthesis draws tiles uniformly,
    so each kind contributes in proportion to its tile count).
    """
    kinds = split_kinds(split, cfg)
    return itertools.chain(*[_kind_images(kind, split, cfg, seed, resources) for kind in kinds])  # config errors now, not on reading


def split_kinds(split: str, cfg: dict) -> list[str]:
    """The source kinds of a split: ``test_kind`` for 'test', ``kind`` (one or a list) otherwise."""
    kinds = cfg["test_kind"] if split == "test" else cfg["kind"]
    return [kinds] if isinstance(kinds, str) else list(kinds)


def _generated_count(section: dict, split: str, val_fraction: float) -> int:
    """Images of a generated kind (phantom, texture) in a split: ``count`` to train, ``val_fraction``
    of it (at least one) to validate, ``test_count`` to test."""
    if split == "test":
        return section["test_count"]
    return section["count"] if split == "train" else max(1, round(section["count"] * val_fraction))


def _kind_images(kind: str, split: str, cfg: dict, seed: int, resources: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    split_seed = seed * 1000 + {"train": 0, "val": 1, "test": 2}[split]
    if kind == "phantom":
        ph = cfg["phantom"]
        return phantom_images(_generated_count(ph, split, cfg["val_fraction"]), ph["size_px"], split_seed)
    if kind == "texture":
        tx = cfg["texture"]
        return texture_images(_generated_count(tx, split, cfg["val_fraction"]), tx["size_px"], split_seed, tx["slope"], tx["skew"])
    if kind == "skimage":
        if split == "test":
            return skimage_images(SKIMAGE_TEST)
        return split_items(skimage_images(SKIMAGE_TRAIN), split, cfg["val_fraction"])
    if kind == "folder":
        key = "test_folder" if split == "test" else "folder"
        if not cfg[key]:
            raise ValueError(f"sources kind 'folder' needs sources.{key}")
        items = folder_images(cfg[key])
        return items if split == "test" else split_items(items, split, cfg["val_fraction"])
    if kind == "places365":
        if split == "test":
            raise ValueError("Places365 is not microscopy-like; choose another sources.test_kind")
        folder = fetch_places365(cfg["places365"]["archive"], resources, cfg["places365"]["base_url"])
        items = folder_images(folder)
        limit = cfg["places365"]["max_images"]
        return split_items(itertools.islice(items, limit or None), split, cfg["val_fraction"])
    raise ValueError(f"unknown sources kind {kind!r}")


def split_items(items: Iterable[tuple[str, np.ndarray]], split: str, val_fraction: float) -> Iterator:
    """Deterministic split by image: every k-th image (k = round(1 / val_fraction)) validates."""
    k = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    for i, item in enumerate(items):
        is_val = bool(k) and i % k == k - 1
        if is_val == (split == "val"):
            yield item
