"""Source images: offline skimage set, phantoms, random textures, a user's folder, the Places365 download code."""

import hashlib
import io
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from blurflow import sources
from blurflow.schema import config_hash

CFG = {
    "kind": "skimage",
    "test_kind": "skimage",
    "tile_px": 128,
    "val_fraction": 0.2,
    "folder": None,
    "test_folder": None,
    "phantom": {"count": 3, "test_count": 2, "size_px": 128},
    "texture": {"count": 6, "size_px": 128, "slope": [2, 5], "skew": [0, 1]},
    "places365": {"archive": "val_256.tar", "base_url": "http://127.0.0.1:1/", "max_images": 0},
}


def names(items) -> list[str]:
    return [name for name, _ in items]


def test_skimage_splits_are_disjoint_and_offline():
    train = names(sources.images_for("train", CFG, 0, "unused"))
    val = names(sources.images_for("val", CFG, 0, "unused"))
    test = names(sources.images_for("test", CFG, 0, "unused"))
    assert train and val and test
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert "skimage:cell" in test and "skimage:camera" in train


def test_a_list_of_kinds_mixes_their_images():
    mixed = {**CFG, "kind": ["skimage", "phantom"]}
    train = names(sources.images_for("train", mixed, 0, "unused"))
    val = names(sources.images_for("val", mixed, 0, "unused"))
    skimage_only = names(sources.images_for("train", CFG, 0, "unused"))
    assert train[: len(skimage_only)] == skimage_only
    assert [n for n in train if n.startswith("phantom:")] == ["phantom:0:0", "phantom:0:1", "phantom:0:2"]
    # validation phantoms: val_fraction of the count (at least one), from their own seed
    assert [n for n in val if n.startswith("phantom:")] == ["phantom:1:0"]
    assert "skimage:coins" in val
    textures = {**CFG, "kind": ["texture"]}
    assert names(sources.images_for("train", textures, 0, "unused")) == [f"texture:0:{i}" for i in range(6)]
    assert names(sources.images_for("val", textures, 0, "unused")) == ["texture:1:0"]


def test_write_split_tiles_and_records_its_config(tmp_path):
    path = tmp_path / "train.h5"
    n = sources.write_split("train", CFG, 0, "unused", path)
    with h5py.File(path) as f:
        images, src = f["images"][()], f["source"][()]
        assert images.dtype == np.uint16 and images.shape == (n, CFG["tile_px"], CFG["tile_px"])
        assert f.attrs["tile_px"] == CFG["tile_px"] and f.attrs["kind"] == "skimage"
        assert len(f.attrs["names"]) == src.max() + 1
    assert images.max() == 65535 and images.min() == 0
    assert not list(tmp_path.glob(".*tmp*"))
    assert sources.recorded_hash(path) == config_hash(CFG, 0) != config_hash(CFG, 1)
    assert config_hash(CFG, 0) != config_hash({**CFG, "tile_px": CFG["tile_px"] // 2}, 0)
    sources.write_sources(sources.images_for("train", CFG, 0, "unused"), tmp_path / "bare.h5", CFG["tile_px"], "skimage")
    assert sources.recorded_hash(tmp_path / "bare.h5") == ""


def test_to_grey_handles_rgb_stacks_and_rejects_nan():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 1] = np.arange(5) * 50
    (grey,) = sources.to_grey(rgb)
    assert grey.shape == (4, 5) and np.isclose(grey.max(), 1) and np.isclose(grey.min(), 0)
    assert len(sources.to_grey(np.random.default_rng(0).random((3, 8, 8)))) == 3
    with pytest.raises(ValueError, match="NaN"):
        sources.to_grey(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_phantoms_are_seeded_textured_and_in_range():
    a = list(sources.phantom_images(2, 96, seed=5))
    b = list(sources.phantom_images(2, 96, seed=5))
    c = list(sources.phantom_images(2, 96, seed=6))
    for (_, x), (_, y), (_, z) in zip(a, b, c):
        assert np.array_equal(x, y) and not np.array_equal(x, z)
        assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
        assert x.std() > 0.05  # textured, not flat
    assert a[0][0] == "phantom:5:0"


def spectral_slope(image: np.ndarray) -> float:
    """The log-log slope of the radial power spectrum between 0.02 and 0.3 cycles/px."""
    power = np.abs(np.fft.fft2(image - image.mean())) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(image.shape[0]), np.fft.fftfreq(image.shape[1]), indexing="ij")
    f = np.hypot(fy, fx)
    band = (f > 0.02) & (f < 0.3)
    return float(np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0])


@pytest.mark.parametrize("slope", [2.0, 4.0])
def test_gaussian_texture_has_the_requested_spectral_slope(slope):
    image = sources.texture(256, slope, 0.0, np.random.default_rng(0))
    assert abs(spectral_slope(image) + slope) < 0.1
    assert image.dtype == np.float32 and image.min() == 0 and image.max() == 1
    assert abs(np.median(image) - image.mean()) < 0.03  # Gaussian: symmetric about its mean


def test_texture_skew_makes_sparse_bright_structure_and_is_seeded():
    a = list(sources.texture_images(3, 96, seed=5, slope=[2, 5], skew=[1, 1]))
    b = list(sources.texture_images(3, 96, seed=5, slope=[2, 5], skew=[1, 1]))
    assert [n for n, _ in a] == ["texture:5:0", "texture:5:1", "texture:5:2"]
    for (_, x), (_, y) in zip(a, b):
        assert np.array_equal(x, y)
        assert np.median(x) < 0.7 * x.mean()  # log-normal: most pixels dark, a few bright (Gaussian: about 1)
    assert not np.array_equal(a[0][1], a[1][1])


def test_folder_skips_a_corrupt_file_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((160, 160)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "b.tif", (rng.random((2, 150, 150)) * 4000).astype(np.uint16))
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="broken.jpg"):
        items = list(sources.folder_images(tmp_path))
    assert [Path(n).name for n, _ in items] == ["a.png", "b.tif"]
    n = sources.write_sources(items, tmp_path / "out.h5", 128, "folder")
    assert n == 3  # one tile from the PNG, one from each plane of the TIFF stack


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable source image"):
        sources.write_sources(sources.folder_images(tmp_path), tmp_path / "out.h5", 64, "folder")
    assert not (tmp_path / "out.h5").exists()
    with pytest.raises(ValueError, match="does not exist"):
        list(sources.folder_images(tmp_path / "missing"))
    with pytest.raises(ValueError, match="sources.folder"):
        sources.images_for("train", {**CFG, "kind": "folder"}, 0, tmp_path)


# --- Places365 download code against a loopback server ----------------------------------------


def tiny_archive() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            png = io.BytesIO()
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(png, format="PNG")
            info = tarfile.TarInfo(f"tiny/img{i}.png")
            info.size = png.getbuffer().nbytes
            png.seek(0)
            tar.addfile(info, png)
    return buf.getvalue()


@pytest.fixture()
def server(serve):
    """The tiny archive on 127.0.0.1, honouring Range requests; records them."""
    payload = tiny_archive()
    url, ranges = serve(payload)
    return url, payload, ranges


def test_download_with_good_checksum_unpacks(server, tmp_path):
    url, payload, _ = server
    md5 = hashlib.md5(payload).hexdigest()
    folder = sources.fetch_places365("tiny.tar", tmp_path, base_url=url, md5=md5)
    assert sorted(p.name for p in folder.rglob("*.png")) == ["img0.png", "img1.png", "img2.png"]
    assert (tmp_path / "tiny.tar").read_bytes() == payload
    assert len(list(sources.folder_images(folder))) == 3


def test_download_with_bad_checksum_leaves_nothing(server, tmp_path):
    url, _, _ = server
    with pytest.raises(ValueError, match="(?i)hash"):
        sources.fetch_places365("tiny.tar", tmp_path, base_url=url, md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes(server, tmp_path):
    url, payload, ranges = server
    half = len(payload) // 2
    (tmp_path / "tiny.tar.part").write_bytes(payload[:half])
    sources.fetch_places365("tiny.tar", tmp_path, base_url=url, md5=hashlib.md5(payload).hexdigest())
    assert ranges == [f"bytes={half}-"]
    assert (tmp_path / "tiny.tar").read_bytes() == payload
    assert not (tmp_path / "tiny.tar.part").exists()


def test_unknown_archive_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown Places365 archive"):
        sources.fetch_places365("nope.tar", tmp_path)
