"""`blurflow predict` and `blurflow info`: round trip in physical units, bad inputs, help."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from blurflow import cli
from blurflow.model import FlowNet, encode, save_model
from blurflow.optics import Optics

KNOWN = torch.tensor([0.3, 0.4, 0.6, 0.25])  # canonical (v1, v2, v3, z0)
SCALES = {"lateral_scale_px": 8.0, "axial_scale_um": 10.0}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A model that predicts KNOWN everywhere with w = sigmoid(4): its head is a constant."""
    model = FlowNet("resnet18")
    head = model.unet.segmentation_head[0]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.cat([encode(KNOWN[None, :, None, None], "doubled_angle")[0, :, 0, 0], torch.tensor([4.0])]))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(model, path, {"optics": Optics().to_dict(), "scales": SCALES, "image_px": 64})
    return path


def image(shape, seed=0, dtype=np.uint16):
    return (np.random.default_rng(seed).random(shape) * 1000).astype(dtype)


def test_round_trip_in_physical_units(model_file, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "cells.tif", image((150, 90)))
    assert cli.main(["predict", str(model_file), str(tmp_path / "cells.tif"), "--exposure-ms", "200", "--out", str(tmp_path / "out")]) == 0
    with tifffile.TiffFile(tmp_path / "out/cells_flow.tif") as tif:
        flow = tif.asarray()
        ij = tif.imagej_metadata
    assert flow.dtype == np.float32 and flow.shape == (5, 150, 90)
    pixel = 0.65
    expected = [0.3 * 8 * pixel / 0.2, 0.4 * 8 * pixel / 0.2, 0.6 * 10 / 0.2, 0.25 * 10, 1 / (1 + np.exp(-4))]
    for channel, value in zip(flow, expected):
        assert np.allclose(channel, value, rtol=1e-4), (channel.mean(), value)
    assert ij["Labels"][:3] == ["v1 (um/s)", "v2 (um/s)", "v3 (um/s)"] and ij["Labels"][3] == "z0 (um)"
    with Image.open(tmp_path / "out/cells_flow.png") as png:
        assert png.size[0] > 500
    assert "cells_flow.tif" in capsys.readouterr().out


def test_without_exposure_velocities_are_per_exposure_and_stacks_keep_planes(model_file, tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", image((3, 64, 70), dtype=np.float32), photometric="minisblack")
    assert cli.main(["predict", str(model_file), str(tmp_path / "stack.tif"), "--quiet"]) == 0
    with tifffile.TiffFile(tmp_path / "stack_flow.tif") as tif:
        flow = tif.asarray()
        assert tif.imagej_metadata["Labels"][0] == "v1 (um/exposure)"
    assert flow.shape == (3, 5, 64, 70)
    assert np.allclose(flow[:, 2], 0.6 * 10, rtol=1e-4)


def test_rgb_is_converted_with_a_warning(model_file, tmp_path, capsys):
    Image.fromarray(image((64, 64, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.warns(UserWarning, match="converted to grey"):
        assert cli.main(["predict", str(model_file), str(tmp_path / "rgb.png"), "--quiet"]) == 0
    assert (tmp_path / "rgb_flow.tif").exists()


def test_differing_pixel_size_warns(model_file, tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    with pytest.warns(UserWarning, match="differs from the model's 0.65 um"):
        assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), "--pixel-size-um", "0.325", "--quiet"]) == 0
    with tifffile.TiffFile(tmp_path / "a_flow.tif") as tif:
        assert np.allclose(tif.asarray()[0], 0.3 * 8 * 0.325, rtol=1e-4)  # px displacement x the given pixel


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("broken.tif", lambda p: p.write_bytes(b"II*\x00garbage"), "cannot read image"),
        ("nan.tif", lambda p: tifffile.imwrite(p, np.full((64, 64), np.nan, np.float32)), "NaN or Inf"),
        ("tiny.tif", lambda p: tifffile.imwrite(p, image((16, 40))), "smaller than the network's minimum"),
        ("volume.tif", lambda p: tifffile.imwrite(p, image((2, 2, 40, 40))), "expected a 2D image or a stack"),
    ],
)
def test_bad_images_give_one_line_errors_and_no_output(model_file, tmp_path, capsys, name, write, message):
    write(tmp_path / name)
    assert cli.main(["predict", str(model_file), str(tmp_path / name), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*_flow*")) and not list(tmp_path.glob(".*tmp*"))


def test_one_bad_file_does_not_stop_the_others(model_file, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"nope")
    tifffile.imwrite(tmp_path / "good.tif", image((64, 64)))
    assert cli.main(["predict", str(model_file), str(tmp_path / "bad.png"), str(tmp_path / "good.tif"), "--quiet"]) == 1
    assert (tmp_path / "good_flow.tif").exists() and "bad.png" in capsys.readouterr().err


def test_bad_model_and_options(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    assert cli.main(["predict", str(tmp_path / "none.pt"), str(tmp_path / "a.tif")]) == 1
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["predict", str(tmp_path / "none.pt"), str(tmp_path / "a.tif"), "--exposure-ms", "-5"])
    assert exit_.value.code == 2 and "--exposure-ms must be a positive number" in capsys.readouterr().err


def test_info_prints_the_model_metadata(model_file, capsys):
    assert cli.main(["info", str(model_file)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["encoder"] == "resnet18" and meta["scales"] == SCALES


def test_console_script_help_is_complete():
    out = subprocess.run(["blurflow", "--help"], capture_output=True, text=True, check=True).stdout
    assert "predict" in out and "info" in out
    out = subprocess.run([sys.executable, "-m", "blurflow.cli", "predict", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--out", "--exposure-ms", "--pixel-size-um", "--offset", "--gain", "--device", "um/s", "v2 >= 0"):
        assert option in out
