"""`blurflow predict` and `blurflow info`: round trip in physical units, bad inputs, help."""

import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from blurflow import cli
from blurflow.imagefile import open_image, scan
from blurflow.model import FlowNet, encode
from blurflow.modelfile import save_model
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
    assert not plt.get_fignums()  # the preview figure is closed: many images do not pile figures up


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
    assert cli.main(["predict", str(model_file), str(tmp_path / "rgb.png"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("blurflow: warning:") and "rgb.png: colour image converted to grey" in err
    assert (tmp_path / "rgb_flow.tif").exists()


def test_differing_pixel_size_warns(model_file, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), "--pixel-size-um", "0.325", "--quiet"]) == 0
    assert "blurflow: warning: pixel size 0.325 um differs from the model's 0.65 um" in capsys.readouterr().err
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


def test_bad_model_file(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    assert cli.main(["predict", str(tmp_path / "none.pt"), str(tmp_path / "a.tif")]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04" + bytes(200))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name, message in (("corrupt.pt", "not a readable PyTorch file"), ("other.pt", "no blurflow metadata")):
        assert cli.main(["predict", str(tmp_path / name), str(tmp_path / "a.tif")]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert "weights_only" not in err and "Traceback" not in err  # no advice to load untrusted pickles


@pytest.mark.parametrize(
    "args, option, message",
    [
        (["--exposure-ms", "-5"], "--exposure-ms", "must be a positive number"),
        (["--batch", "0"], "--batch", "must be a positive number of tiles"),
        (["--smooth-px", "-1"], "--smooth-px", "must be a number of pixels >= 0"),
        (["--device", "bogus"], "--device", "unknown device 'bogus'"),
        (["--out", "{file}"], "--out", "exists and is not a folder"),
    ],
)
def test_bad_options_give_one_line_naming_the_option(model_file, tmp_path, capsys, args, option, message):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    args = [a.format(file=tmp_path / "a.tif") for a in args]
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blurflow: error: {option}") and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*_flow*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_blames_the_option_not_the_model(model_file, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blurflow: error: --device") and "no CUDA GPU" in err and "model" not in err


def test_same_names_in_two_folders_keep_both_results(model_file, tmp_path, capsys):
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "img.tif", image((64, 64)))
    inputs = [str(tmp_path / "d1/img.tif"), str(tmp_path / "d2/img.tif")]
    assert cli.main(["predict", str(model_file), *inputs, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*_flow.tif")) == ["d1/img_flow.tif", "d2/img_flow.tif"]
    assert cli.main(["predict", str(model_file), *inputs, "--quiet"]) == 0  # beside each image
    assert (tmp_path / "d1/img_flow.tif").exists() and (tmp_path / "d2/img_flow.tif").exists()


def test_two_inputs_with_one_output_name_are_refused_before_writing(model_file, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "img.tif", image((64, 64)))
    Image.fromarray(image((64, 64), dtype=np.uint8)).save(tmp_path / "img.png")
    assert cli.main(["predict", str(model_file), str(tmp_path / "img.tif"), str(tmp_path / "img.png")]) == 1
    err = capsys.readouterr().err
    assert "would both write" in err and "img_flow.tif" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*_flow*"))


def test_a_rerun_on_a_glob_skips_its_own_outputs(model_file, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), "--quiet"]) == 0
    everything = sorted(str(p) for p in tmp_path.iterdir())  # a.tif, a_flow.png, a_flow.tif
    assert cli.main(["predict", str(model_file), *everything]) == 0
    out = capsys.readouterr()
    assert "skipping" in out.err and "a_flow.tif: an output of blurflow" in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "a_flow.png", "a_flow.tif"]


def test_a_corrupt_png_says_what_is_wrong(model_file, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    assert cli.main(["predict", str(model_file), str(tmp_path / "bad.png")]) == 1
    err = capsys.readouterr().err
    assert "bad.png: cannot read image" in err and "plugin" not in err and "imageio" not in err


def test_errors_are_not_printed_into_the_progress_bar(model_file, tmp_path):
    pty = pytest.importorskip("pty")
    import fcntl
    import os
    import struct
    import termios

    (tmp_path / "bad.png").write_bytes(b"nope")
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", image((64, 64)))
    files = [str(tmp_path / n) for n in ("a.tif", "bad.png", "b.tif")]
    master, slave = pty.openpty()  # a terminal of 100 columns, so the progress bar is drawn
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "blurflow.cli", "predict", str(model_file), *files], stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 1
    out = b"".join(chunks).decode()
    assert "predict:" in out and "%|" in out  # the bar was shown
    messages = [f"{files[0]}: wrote", "blurflow: error:", f"{files[2]}: wrote"]
    for message in messages:
        assert out.count(message) == 1
        assert out[out.index(message) - 1] in "\r\n", message  # on a line of its own, not after the bar's text


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


# --- files a user owns, file-system faults, interrupts (issue 16) -----------------------------


def test_a_users_own_file_is_never_overwritten(model_file, tmp_path, capsys):
    for name in ("x", "y"):
        tifffile.imwrite(tmp_path / f"{name}.tif", image((64, 64)))
    (tmp_path / "x_flow.tif").write_bytes(b"my own notes")
    assert cli.main(["predict", str(model_file), str(tmp_path / "x.tif"), str(tmp_path / "y.tif"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x_flow.tif exists and is not an output of blurflow predict; not overwritten" in err[0]
    assert (tmp_path / "x_flow.tif").read_bytes() == b"my own notes" and not (tmp_path / "x_flow.png").exists()
    assert (tmp_path / "y_flow.tif").exists()  # the others are written


def test_an_unwritable_target_fails_alone_with_one_line(model_file, tmp_path, capsys):
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "img.tif", image((64, 64)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out/d1").write_text("a file where the output folder of d1 would go")
    args = ["predict", str(model_file), str(tmp_path / "d1/img.tif"), str(tmp_path / "d2/img.tif"), "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blurflow: error: ") and "d1/img.tif: cannot write its results" in err[0], err
    assert (tmp_path / "out/d2/img_flow.tif").exists() and not list(tmp_path.rglob(".*tmp*"))


def test_a_full_disk_fails_that_file_with_one_line(model_file, tmp_path, capsys, monkeypatch):
    import errno

    import matplotlib.figure

    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    tifffile.imwrite(tmp_path / "b.tif", image((64, 64)))
    real = matplotlib.figure.Figure.savefig

    def full_once(self, path, *args, **kwargs):  # the first PNG finds the disk full
        if "a_flow" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_once)
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.tif: cannot write its results" in err[0] and "No space left on device" in err[0]
    assert not list(tmp_path.glob("a_flow*")) and not list(tmp_path.glob(".*tmp*")) and (tmp_path / "b_flow.tif").exists()


def test_out_below_a_file_is_an_option_error(model_file, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), "--out", str(tmp_path / "a.tif/sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blurflow: error: --out: cannot create folder") and "Traceback" not in err[0]


@pytest.mark.parametrize("sig, status, words", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_ctrl_c_or_a_schedulers_sigterm_gives_one_line_its_status_and_no_leftovers(model_file, tmp_path, sig, status, words):
    import signal
    import time

    tifffile.imwrite(tmp_path / "big.tif", image((1500, 1500)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "blurflow.cli", "predict", str(model_file), str(tmp_path / "big.tif")], stderr=subprocess.PIPE, text=True,
        # as in a terminal: a shell's background job (`cmd &`) ignores SIGINT, and so would its children
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".big_flow.tif.tmp*")) and time.monotonic() < deadline:  # inference has begun
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=300)[1]  # generous: a loaded 2-core machine was seen to need more than 60 s
    assert proc.returncode == status and err.strip() == f"blurflow: {words}", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif"]


def test_a_killed_writers_temporary_files_are_removed_by_the_next_run_in_their_folder(model_file, tmp_path):
    """What SIGKILL during a write leaves (``.NAME.tmpPID`` of a dead process) goes when the folder
    is next written to, whatever image it was for; a live writer's and a user's files stay."""
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False).stdout.strip()
    for name in (f".a_flow.tif.tmp{dead}", f".big_flow.tif.tmp{dead}", f".big_flow.png.tmp{dead}"):
        (tmp_path / name).write_bytes(bytes(100))
    kept = [f".other_flow.tif.tmp{os.getpid()}", f".notes.txt.tmp{dead}"]  # a live writer's; not blurflow's
    for name in kept:
        (tmp_path / name).write_bytes(bytes(10))
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.tif", "a_flow.png", "a_flow.tif", *kept])


@pytest.mark.parametrize("mode", ["P", "LA"])
def test_palette_and_grey_alpha_images_are_read_as_seen(model_file, tmp_path, mode):
    grey = image((96, 96), dtype=np.uint8)
    if mode == "P":  # a reversed grey palette: the indices are the negative of the picture
        im = Image.fromarray(255 - grey, "L").convert("P")
        im.putpalette([c for i in range(256) for c in (255 - i,) * 3])
    else:
        im = Image.fromarray(np.stack([grey, np.full_like(grey, 200)], -1), "LA")
    seen = grey.astype(np.float32)
    im.save(tmp_path / "a.png")
    picture = open_image(tmp_path / "a.png")
    assert picture.shape == (1, 96, 96) and np.array_equal(picture.rows(0, 0, 96), seen) and scan(picture).skipped == []
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.png"), "--quiet"]) == 0


def test_a_stacks_frame_without_an_image_is_left_out_by_name_and_the_others_are_processed(model_file, tmp_path, capsys):
    """Frames 1 (a NaN pixel) and 3 (all 0) of a 5-frame stack: one warning line names both; predict
    writes NaN flow for them and the others' as alone; particles has no rows for them; a stack of
    such frames only is one line."""
    stack = image((5, 64, 64), dtype=np.float32)
    stack[1, 5, 5], stack[3] = np.nan, 0.0
    tifffile.imwrite(tmp_path / "s.tif", stack)
    tifffile.imwrite(tmp_path / "f4.tif", stack[4])
    assert cli.main(["predict", str(model_file), str(tmp_path / "s.tif"), str(tmp_path / "f4.tif"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"blurflow: warning: {tmp_path / 's.tif'}: frames left out (counted from 0): 1 (NaN or Inf pixels); 3 (all pixels 0)"]
    flow = tifffile.imread(tmp_path / "s_flow.tif")
    assert flow.shape == (5, 5, 64, 64) and np.isnan(flow[[1, 3]]).all() and np.isfinite(flow[[0, 2, 4]]).all()
    assert np.array_equal(flow[4], tifffile.imread(tmp_path / "f4_flow.tif"))
    assert cli.main(["particles", str(tmp_path / "s.tif"), "--quiet"]) == 0
    assert "frames left out" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "bad.tif", np.stack([stack[1], stack[3]]))
    assert cli.main(["predict", str(model_file), str(tmp_path / "bad.tif"), "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == f"blurflow: error: {tmp_path / 'bad.tif'}: no frame of the stack holds an image (NaN/Inf pixels or all 0)"
    assert not list(tmp_path.glob("bad_*"))


def test_a_folder_stands_for_its_images(model_file, tmp_path, capsys, monkeypatch):
    """A folder among the inputs is the images in it (not its subfolders, not other files); given
    alone it is not taken as a model; one without images is one line."""
    import blurflow.modelfile

    monkeypatch.setattr(blurflow.modelfile, "SHIPPED_MODEL", model_file)
    (tmp_path / "in/sub").mkdir(parents=True)
    for name in ("a.tif", "b.png", "sub/c.tif"):
        Image.fromarray(image((64, 64), dtype=np.uint8)).save(tmp_path / "in" / name)
    (tmp_path / "in/notes.txt").write_text("not an image")
    assert cli.main(["predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_flow.png", "a_flow.tif", "b_flow.png", "b_flow.tif"]
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(model_file), str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"blurflow: error: {tmp_path / 'empty'} is a folder without images (.tif, .tiff, .png, .jpg, .jpeg)"]


def test_a_pth_model_is_the_model_never_an_image(model_file, tmp_path, capsys):
    import shutil

    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    shutil.copy(model_file, tmp_path / "model.pth")
    assert cli.main(["predict", str(tmp_path / "model.pth"), str(tmp_path / "a.tif"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "a_flow.png", "a_flow.tif", "model.pth"]
    (tmp_path / "weights.pth").write_bytes(b"not a model")
    assert cli.main(["predict", str(tmp_path / "weights.pth"), str(tmp_path / "a.tif")]) == 1
    assert "weights.pth is not a blurflow model file" in capsys.readouterr().err
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), str(tmp_path / "model.pth")]) == 2
    assert "model.pth is a model file; give the model first" in capsys.readouterr().err


def test_an_offset_above_the_pixels_is_a_warning(model_file, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    assert cli.main(["predict", str(model_file), str(tmp_path / "a.tif"), "--offset", "1e6"]) == 0
    assert "100.0% of the pixels are at or below the offset 1e+06: the image holds almost no signal (is --offset right?)" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["device", "model"])
def test_the_output_folder_appears_only_with_the_first_output(model_file, tmp_path, capsys, problem):
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    model, extra = (str(model_file), ["--device", "bogus"]) if problem == "device" else (str(tmp_path / "bad.pt"), [])
    assert cli.main(["predict", model, str(tmp_path / "a.tif"), "--out", str(tmp_path / "new/out"), *extra]) in (1, 2)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("smooth_px, edges", [(8.0, False), (6.0, True)])
def test_a_large_image_is_predicted_in_bands_with_the_whole_image_result(model_file, tmp_path, smooth_px, edges, monkeypatch):
    """Band by band (bounded memory), each band smoothed in blocks of 40 columns, gives the maps of
    the whole image at once (one batch of all 72 tiles: a single band, smoothed whole), smoothing
    included, Gaussian or edge-preserving."""
    from blurflow import evaluate
    from blurflow.evaluate import predict, predict_bands
    from blurflow.modelfile import load_model

    model, _ = load_model(model_file)
    with torch.no_grad():  # a model whose output varies with the input, so that blending and smoothing show
        model.unet.segmentation_head[0].weight.normal_(0, 0.1)
    counts = torch.from_numpy(image((300, 257))).float()[None, None]
    whole = predict(model, counts, tile=64, batch=72, smooth_px=smooth_px, edges=edges)
    ticks = []
    monkeypatch.setattr(evaluate, "SMOOTH_BLOCK_PX", 40)

    class Bar:
        def update(self, n):
            ticks.append(n)

    rows = 0
    for y0, maps in predict_bands(model, lambda a, b: counts[0, :, a:b], 300, 257, tile=64, batch=4, smooth_px=smooth_px, edges=edges, bar=Bar()):
        assert y0 == rows and maps.shape[1] < 300
        assert torch.allclose(maps, whole[0, :, y0 : y0 + maps.shape[1]], atol=1e-5)
        rows += maps.shape[1]
    assert rows == 300 and sum(ticks) == 9 * 8  # 9 tile rows x 8 tile columns


def test_without_a_model_the_shipped_one_is_used_and_named(model_file, tmp_path, capsys, monkeypatch):
    import blurflow.modelfile

    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    monkeypatch.setattr(blurflow.modelfile, "SHIPPED_MODEL", model_file)
    assert cli.main(["predict", str(tmp_path / "a.tif")]) == 0
    assert f"blurflow: using the shipped model {model_file}" in capsys.readouterr().err
    assert (tmp_path / "a_flow.tif").exists()
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shipped"] is True and info["model_file"] == str(model_file) and info["scales"] == SCALES
    monkeypatch.setattr(blurflow.modelfile, "SHIPPED_MODEL", tmp_path / "none.pt")
    assert cli.main(["predict", str(tmp_path / "a.tif")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model given and no shipped model" in err[0]
    assert cli.main(["predict", str(model_file)]) == 2 and "no image given after the model" in capsys.readouterr().err


def test_the_dihedral_mean_follows_the_model_file_unless_an_option_says(tmp_path):
    """A model whose validation chose the mean over 8 rotations and reflections is read that way
    by default; --no-dihedral gives the single pass, --dihedral forces the mean."""
    from blurflow.evaluate import predict
    from blurflow.modelfile import load_model

    model = FlowNet("resnet18", depth=3, decoder_channels=(32, 16, 8)).eval()
    path = tmp_path / "model.pt"
    save_model(model, path, {"optics": Optics().to_dict(), "scales": SCALES, "image_px": 64, "dihedral_mean": True})
    tifffile.imwrite(tmp_path / "a.tif", image((64, 80)))
    runs = {}
    for name, option in (("default", []), ("on", ["--dihedral"]), ("off", ["--no-dihedral"])):
        assert cli.main(["predict", str(path), str(tmp_path / "a.tif"), "--out", str(tmp_path / name), "--quiet", *option]) == 0
        runs[name] = tifffile.imread(tmp_path / name / "a_flow.tif")
    assert np.array_equal(runs["default"], runs["on"]) and not np.allclose(runs["on"], runs["off"], atol=1e-3)
    counts = torch.from_numpy(image((64, 80))).float()[None, None]
    loaded, _ = load_model(path)
    w = {d: predict(loaded, counts, tile=64, dihedral=d)[0, 4].numpy() for d in (False, True)}
    assert np.allclose(runs["on"][4], w[True], atol=1e-5) and np.allclose(runs["off"][4], w[False], atol=1e-5)


def test_measurability_prints_the_ideal_r2_per_case_and_a_missing_config_is_one_line(tmp_path, capsys):
    """``blurflow measurability``: four lines (the synthesis ranges and the cylinder, at 64 and 32 px
    windows), R² within [0, 1], a smoother texture (a steeper slope) measuring v3 worse."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = os.path.join(root, "config.yaml")

    def v3(args: list[str]) -> float:
        assert cli.main(["measurability", config, *args]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert [line.split(":")[0] for line in lines] == [f"{c}, {w} px window" for w in (64, 32) for c in ("synthesis ranges", "cylinder")]
        return float(lines[0].split("v3 ")[1].split(",")[0])

    natural, smooth = v3([]), v3(["--slope", "4"])
    assert 0 <= smooth < natural <= 1
    assert cli.main(["measurability", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"blurflow: error: {tmp_path / 'none.yaml'}: no such config file"
    for flag, value in (("--slope", "nan"), ("--slope", "-1"), ("--contrast", "-1"), ("--contrast", "0")):
        assert cli.main(["measurability", config, flag, value]) == 2
        assert capsys.readouterr().err.strip() == f"blurflow: error: {flag} must be a positive number, got {float(value):g}"


@pytest.mark.parametrize("command", ["predict", "particles"])
def test_an_input_whose_symbolic_links_loop_is_one_line(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    os.symlink("a", "b")
    os.symlink("b", "a")
    assert cli.main([command, "a"]) == 1
    assert capsys.readouterr().err.strip() == "blurflow: error: a: its symbolic links lead in a loop"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_the_preview_draws_the_lateral_motion_along_rows_and_columns_as_the_image():
    """v1 along columns, v2 along rows (downwards in the image): the preview's segments point the same way."""
    from blurflow import figures

    flow = np.zeros((5, 32, 32), np.float32)
    flow[0], flow[1], flow[4] = 1.0, 2.0, 1.0
    fig = figures.flow_overlay(np.ones((32, 32)), flow, ["um/s"] * 5, arrows=4)
    ax = fig.axes[0]
    quiver = ax.collections[0]
    assert ax.yaxis_inverted() and np.allclose(quiver.U, 1.0) and np.allclose(quiver.V, 2.0)
    plt.close(fig)


def test_a_workflow_jobs_sigterm_is_raised_as_ctrl_c_is():
    """logs.job installs it: a scheduler's SIGTERM ends a rule's script through KeyboardInterrupt
    (its temporary files removed, one log line 'terminated')."""
    import signal
    import time

    from blurflow import logs

    before = signal.getsignal(signal.SIGTERM)
    try:
        logs.terminate_as_interrupt()
        with pytest.raises(logs.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, before)
