"""Image files read piece by piece: every layout gives the pixels a whole read gives, large images
are processed in bands and pieces with the results of a whole read, and an image that would not
fit the memory or the disk is refused before anything is decoded or written."""

import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from blurflow import cli, imagefile
from blurflow.imagefile import ImageError, open_image, scan
from blurflow.model import FlowNet
from blurflow.modelfile import save_model
from blurflow.optics import Optics
from blurflow.sources import luminance

RNG = np.random.default_rng(0)
PLANE = RNG.integers(0, 4000, (3, 150, 170)).astype(np.uint16)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A model of random weights: its flow depends on every pixel."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(FlowNet("resnet18"), path, {"optics": Optics().to_dict(), "scales": {"lateral_scale_px": 8.0, "axial_scale_um": 10.0}, "image_px": 64})
    return path


@pytest.mark.parametrize(
    "layout",
    [
        {},  # uncompressed, contiguous: read from the file row band by row band
        {"byteorder": ">"},
        {"compression": "zlib", "rowsperstrip": 7},  # deflate strips
        {"compression": "zlib", "tile": (32, 48)},  # deflate tiles, the last ones partial
        {"compression": "zlib", "rowsperstrip": 150},  # one strip per page: decoded once per plane
    ],
)
@pytest.mark.parametrize("stack", [False, True])
def test_every_tiff_layout_reads_the_pixels_of_a_whole_read(tmp_path, layout, stack):
    data = PLANE if stack else PLANE[0]
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack", **layout)
    image = open_image(tmp_path / "a.tif")
    planes = data.reshape(-1, 150, 170).astype(np.float32)
    assert image.shape == planes.shape and image.top == 65535 and not image.colour
    for t in range(len(planes)):
        for y0, y1, x0, x1 in ((0, 150, 0, 170), (5, 73, 0, 170), (140, 150, 13, 101), (31, 32, 47, 49)):
            assert np.array_equal(image.rows(t, y0, y1, x0, x1), planes[t, y0:y1, x0:x1]), (t, y0, y1, x0, x1)


def test_colour_tiffs_and_pngs_are_read_as_their_grey(tmp_path):
    rgb = RNG.integers(0, 255, (64, 80, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb", compression="zlib", rowsperstrip=5)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    for name in ("c.tif", "c.png"):
        image = open_image(tmp_path / name)
        assert image.shape == (1, 64, 80) and image.colour and "colour image converted to grey" in image.notes[0]
        assert np.allclose(image.rows(0, 10, 30, 5, 70), luminance(rgb[10:30, 5:70]), atol=1e-4)


def test_the_scan_finds_the_frames_without_an_image_the_peak_and_the_pixels_below_the_offset(tmp_path):
    stack = PLANE.astype(np.float32)
    stack[1, 100, 3] = np.inf
    stack[2] = 0
    stack[0, :10, :10] = 5000  # 100 pixels at the peak
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack", compression="zlib", rowsperstrip=3)
    found = scan(open_image(tmp_path / "s.tif"), offset=1000)
    assert found.skipped == [1, 2] and found.peak == 5000 and found.held == 100
    assert found.below == pytest.approx(np.mean(stack[0] <= 1000)) and "1 (NaN or Inf pixels); 2 (all pixels 0)" in found.notes[0]


def huge_single_strip_tiff(path, height: int, width: int) -> None:
    """A TIFF that declares ``height`` x ``width`` uint16 pixels in one deflate strip (its bytes are a
    few hundred: decoding it would need height x width x 2 bytes)."""
    strip = zlib.compress(bytes(4096))
    tags = [(256, 4, width), (257, 4, height), (258, 3, 16), (259, 3, 8), (262, 3, 1), (273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, len(strip))]
    ifd = 8 + len(strip)
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0) for tag, kind, value in tags)
    path.write_bytes(b"II*\x00" + struct.pack("<I", ifd) + strip + struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0))


@pytest.mark.parametrize("command", ["predict", "particles"])
def test_an_image_that_would_not_fit_the_memory_is_refused_in_one_line_before_decoding(model_file, tmp_path, capsys, command):
    """A 200,000 x 200,000 px deflate TIFF in one strip (80 GB decoded, then held: 160 GB; 80 bytes
    on disk): one line naming the memory it needs and the memory available, exit 1, nothing written."""
    huge_single_strip_tiff(tmp_path / "huge.tif", 200_000, 200_000)
    assert tifffile.TiffFile(tmp_path / "huge.tif").pages[0].shape == (200_000, 200_000)
    with pytest.raises(ImageError, match=r"needs about 160 GB of memory to process \(80 GB for the largest piece it decodes at once\), .* available: not read"):
        open_image(tmp_path / "huge.tif")
    model = [str(model_file)] if command == "predict" else []
    assert cli.main([command, *model, str(tmp_path / "huge.tif"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huge.tif: image of 1 x 200000 x 200000 px needs about" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.tif"]


def test_the_memory_check_counts_the_decoded_piece_and_the_working_set(tmp_path, monkeypatch):
    """The same image passes or is refused by the memory at hand: a page in one strip counts whole,
    strips of 8 rows count 8 rows; the working set is added."""
    tifffile.imwrite(tmp_path / "one.tif", PLANE[0], compression="zlib", rowsperstrip=150)
    tifffile.imwrite(tmp_path / "strips.tif", PLANE[0], compression="zlib", rowsperstrip=8)
    monkeypatch.setattr(imagefile, "available_memory", lambda: 3 * 150 * 170 * 2)
    open_image(tmp_path / "one.tif")  # 2 x 51 kB decoded
    with pytest.raises(ImageError, match="needs about"):
        open_image(tmp_path / "one.tif", lambda h, w: 2 * h * w * 2)
    open_image(tmp_path / "strips.tif", lambda h, w: 2 * h * w * 2)


def test_a_flow_that_would_not_fit_the_disk_is_refused_and_nothing_is_written(model_file, tmp_path, capsys, monkeypatch):
    import shutil

    tifffile.imwrite(tmp_path / "a.tif", PLANE[0])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**5, 10**5))
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "a_flow.tif: needs 0.00051 GB of disk, 0.0001 GB free there: nothing written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


def test_predict_gives_the_same_flow_from_a_tiled_compressed_tiff_as_from_its_pixels(model_file, tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", PLANE[:2], photometric="minisblack")
    tifffile.imwrite(tmp_path / "tiled.tif", PLANE[:2], photometric="minisblack", compression="zlib", tile=(48, 64))
    assert cli.main(["predict", str(model_file), str(tmp_path / "plain.tif"), str(tmp_path / "tiled.tif"), "--quiet"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "plain_flow.tif"), tifffile.imread(tmp_path / "tiled_flow.tif"))


def test_particles_of_a_frame_fitted_in_pieces_are_those_of_the_whole_frame(tmp_path, monkeypatch):
    """A 300 x 330 px frame of 12 beads, 4 of them across the pieces' borders, fitted whole and in
    pieces of 96 px (margins of two windows): the same particles, each once, at the same fit."""
    from blurflow.optics import MotionScales, Optics
    from blurflow.particles import BeadFitter

    fitter = BeadFitter(Optics(), MotionScales.from_config({}), 32)
    mu = torch.full((300, 330), 4.0)
    centres = [(40, 50), (40, 190), (95, 95), (96, 250), (150, 40), (150, 193), (190, 140), (200, 290), (250, 60), (250, 200), (270, 120), (272, 250)]
    for k, (y, x) in enumerate(centres):
        theta = torch.tensor([[0.0, 0.0, 0.2 + 0.02 * k, 0.1, 0.3, 0.1, 5000.0, 0.0]])
        mu[y - 16 : y + 16, x - 16 : x + 16] += fitter.expected(theta)[0]
    frame = torch.poisson(mu, generator=torch.Generator().manual_seed(3)).numpy().astype(np.uint16)
    tifffile.imwrite(tmp_path / "f.tif", frame, compression="zlib", rowsperstrip=16)
    args = ["particles", str(tmp_path / "f.tif"), "--window", "32", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(cli, "PIECE_PX", 96)
    assert cli.spans(330, 64)[:2] == [(0, 96, 0, 160), (96, 192, 32, 256)]
    assert cli.main([*args, "--out", str(tmp_path / "pieces")]) == 0
    whole, pieces = (pd.read_csv(tmp_path / d / "f_particles.csv").sort_values(["y", "x"]).reset_index(drop=True) for d in ("whole", "pieces"))
    assert len(whole) == len(pieces) == len(centres)
    assert np.allclose(whole[["x", "y", "v1", "v2", "v3", "z0_um"]], pieces[["x", "y", "v1", "v2", "v3", "z0_um"]], atol=1e-3)
    assert sorted(pieces["particle"]) == list(range(1, len(centres) + 1))
