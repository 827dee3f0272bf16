"""PSF model files and their calibration from a bead z-stack; the bead fit with a measured PSF."""

import h5py
import numpy as np
import pytest
import tifffile
import torch

from blurflow.cli import main
from blurflow.optics import MotionPSF, MotionScales, Optics, PupilPSF, SpherePSF, psf3d
from blurflow.particles import BeadFitter
from blurflow.particles.calibrate import CalibrationError, bead_stack, calibrate, find_beads
from blurflow.particles.fit import SIGN_GAP, toward_focus
from blurflow.psfmodel import PSFModel, PSFModelError

SCALES = MotionScales(24, 10)
ASTIGMATIC = Optics(zernike={6: 0.08, 11: 0.08})  # waves rms: 0.5 rad of astigmatism and of spherical aberration
Z = np.arange(-20, 21) * 0.5  # the calibration stacks' planes (um)


@pytest.fixture(scope="module")
def stack():
    """16 beads of the astigmatic microscope, focus spread +-0.3 um, planes every 0.5 um over +-10 um (uint16)."""
    counts, truth = bead_stack(ASTIGMATIC, Z, shape=(240, 240), beads=16, photons=2e5, background=10.0, focus_spread_um=0.3, spacing_px=48)
    return np.clip(counts, 0, 65535).astype(np.uint16), truth


@pytest.fixture(scope="module")
def model(stack):
    return calibrate(stack[0], 0.5, Optics(), window=32)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)


def test_a_model_file_of_the_ideal_optics_gives_the_motion_psf_of_the_optics():
    """Same physics: the table of the pupil's PSF, served to MotionPSF, gives its motion PSFs (random
    motions of the training ranges, sub-pixel offsets) to 1e-4, and every kernel keeps its energy."""
    optics = Optics()
    model = PSFModel.from_optics(optics, (-22.0, 22.0), 32)
    assert model.symmetric and model.asymmetry < 1e-6 and model.oversample == optics.min_oversample
    g = torch.Generator().manual_seed(0)
    motion = torch.rand(64, 4, generator=g) * torch.tensor([2.0, 2.0, 1.0, 1.0]) - torch.tensor([1.0, 1.0, 0.0, 0.0])
    offset = torch.rand(64, 2, generator=g) - 0.5
    ref = MotionPSF(optics, SCALES, 32, z_range_um=(-20.0, 20.0))(motion, offset_px=offset)
    new = MotionPSF(model, SCALES, 32, z_range_um=(-20.0, 20.0))(motion, offset_px=offset)
    assert relative_l2(ref, new).max() < 1e-4
    assert torch.allclose(new.sum((1, 2)), torch.ones(64), atol=1e-3)


def test_a_model_file_round_trips_and_a_bad_one_is_one_line(tmp_path, model):
    path = model.write(tmp_path / "psf.h5")
    back = PSFModel.read(path)
    assert np.array_equal(back.table, model.table) and np.array_equal(back.z_um, model.z_um) and back.optics == model.optics
    same = ("beads", "oversample", "stack_sha256", "symmetric", "sign_gap")
    assert [getattr(back, k) for k in same] == [getattr(model, k) for k in same]
    with h5py.File(path) as f:  # self-describing
        assert f.attrs["format"] == "blurflow-psf" and f.attrs["pixel_um"] == pytest.approx(0.65) and "sharpest" in f.attrs["z_zero"]
        assert f["residual"].shape == f["psf"].shape
    (tmp_path / "cut.h5").write_bytes(path.read_bytes()[:4000])
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["psf"] = np.zeros((4, 8, 8))
    for bad, words in (("cut.h5", "cannot read PSF model"), ("other.h5", "not a blurflow PSF model file"), ("none.h5", "no such PSF model file")):
        with pytest.raises(PSFModelError, match=words) as err:
            PSFModel.read(tmp_path / bad)
        assert "\n" not in str(err.value)
    with pytest.raises(PSFModelError, match="evenly spaced"):
        PSFModel(model.table[:5], np.array([0.0, 1.0, 2.0, 4.0, 5.0]), model.optics)
    with pytest.raises(PSFModelError, match="pixel is 0.65 um"):
        model.check_pixel(Optics(camera_pixel_um=3.25))


def test_calibration_recovers_the_aberrated_psf_from_noisy_beads(stack, model):
    """16 beads at random sub-pixel offsets and focus +-0.3 um: all found, averaged on the optics'
    finer grid (2 samples per px), the PSF within 4 % (relative L2, median over planes; the end
    planes, which fewer beads reach once aligned in depth, within 8 %) of the true one
    shifted to its sharpest plane, z = 0 there, and the model asymmetric in depth (astigmatism)."""
    truth = stack[1]
    assert model.beads == 16 and model.oversample == 2 and model.table.shape[1:] == (64, 64)
    true = psf3d(ASTIGMATIC, torch.from_numpy(np.arange(-80, 81) * 0.125), 64, 2).numpy()[:, 32:96, 32:96]  # the window's light
    sharpest = np.arange(-80, 81)[(true**2).sum((1, 2)).argmax()] * 0.125
    expected = psf3d(ASTIGMATIC, torch.from_numpy(model.z_um + sharpest), 64, 2).numpy()[:, 32:96, 32:96]
    error = np.linalg.norm(model.table - expected, axis=(1, 2)) / np.linalg.norm(expected, axis=(1, 2))
    assert np.median(error) < 0.04 and error.max() < 0.08, error
    assert not model.symmetric and model.asymmetry > 0.3
    focus = np.array(model.extra["bead_focus_um"])  # each bead's focus found against the others'
    found = np.argmin(np.hypot(np.array(model.extra["bead_rows"])[:, None] - truth["rows"], np.array(model.extra["bead_cols"])[:, None] - truth["cols"]), 1)
    assert np.corrcoef(focus, truth["focus_um"][found])[0, 1] > 0.9


def test_calibration_is_deterministic(stack, model):
    again = calibrate(stack[0], 0.5, Optics(), window=32)
    assert np.array_equal(again.table, model.table) and again.stack_sha256 == model.stack_sha256


@pytest.mark.parametrize(
    "case, words",
    [
        ("flat", "no isolated bead in the stack"),
        ("two", "2 isolated beads in the stack"),
        ("saturated", "saturated"),
        ("crowded", "crowded"),
    ],
)
def test_a_stack_that_gives_no_model_is_one_line_naming_why(case, words):
    rng = np.random.default_rng(0)
    if case == "flat":
        counts = rng.poisson(10.0, (8, 96, 96)).astype(np.uint16)
    else:
        beads = {"two": 2, "saturated": 4, "crowded": 4}[case]
        size, spacing = (96, 24) if case == "crowded" else (144, 48)
        counts, _ = bead_stack(Optics(), np.arange(-4, 4) * 1.0, shape=(size, size), beads=beads, spacing_px=spacing)
        counts = np.clip(counts * (40 if case == "saturated" else 1), 0, 65535).astype(np.uint16)
    with pytest.raises(CalibrationError, match=words) as err:
        calibrate(counts, 1.0, Optics(), window=32)
    assert "\n" not in str(err.value) and "needs >= 3" in str(err.value)


def test_a_bead_with_a_dim_neighbour_closer_than_half_a_window_is_crowded():
    """A neighbour at a third of the bead's brightness 12 px away (closer than the peaks' spacing of
    half a window, so no peak of its own) makes the bead crowded: its light would enter the model."""
    counts, truth = bead_stack(Optics(), np.arange(-4, 4) * 1.0, shape=(144, 144), beads=4, spacing_px=48)
    assert len(find_beads(counts, 32, np.zeros(counts.shape, bool))[0]) == 4
    y, x = round(float(truth["rows"][0])), round(float(truth["cols"][0]))
    counts[:, y - 16 + 12 : y + 16 + 12, x - 16 : x + 16] += (counts[:, y - 16 : y + 16, x - 16 : x + 16] - 10.0) / 3  # the bead's light, dimmer, 12 px down
    centres, left = find_beads(counts, 32, np.zeros(counts.shape, bool))
    assert len(centres) == 3 and left["crowded"] == 1 and not (np.abs(centres - (y, x)).max(1) < 3).any()


def test_a_sign_that_does_not_reproduce_on_the_calibration_beads_is_not_claimed(stack, model):
    """The astigmatic stack's beads fitted with a model of the other half of them come out with
    their signs right, so the sign is measured above the least gap (SIGN_GAP). With every third
    bead's planes reversed in depth (a bead whose own asymmetry runs against the rest, as real
    particles' texture can) the model is as asymmetric, but a third of the signs come out wrong
    at any gap: the sign is not claimed, the depths are folded (and the file says so)."""
    assert model.sign_gap == SIGN_GAP and not model.symmetric
    assert model.extra["sign_check"]["right_resolved"] >= 0.95 and model.extra["sign_check"]["resolved"] >= 0.9
    counts = stack[0].copy()
    centres, _ = find_beads(counts.astype(np.float64), 32, np.zeros(counts.shape, bool))
    for y, x in centres[2::3]:
        counts[:, y - 24 : y + 24, x - 24 : x + 24] = counts[::-1, y - 24 : y + 24, x - 24 : x + 24]
    mixed = calibrate(counts, 0.5, Optics(), window=32)
    assert mixed.asymmetry > 0.3 and mixed.sign_gap == np.inf and mixed.symmetric
    assert mixed.extra["sign_check"]["right"] < 0.8
    assert not BeadFitter(Optics(), SCALES, 32, psf=mixed).signed


def test_a_sphere_conserves_energy_and_a_wider_bead_is_dimmer_at_focus():
    source = PupilPSF(Optics())
    point = MotionPSF(source, SCALES, 32)(torch.zeros(1, 4))
    tiny = MotionPSF(SpherePSF(source, 0.01), SCALES, 32)(torch.zeros(1, 4))
    beads = [MotionPSF(SpherePSF(source, d), SCALES, 32)(torch.zeros(1, 4)) for d in (0.5, 1.0, 2.0)]
    assert relative_l2(point, tiny).item() < 1e-3
    assert all(abs(float(b.sum()) - 1) < 1e-3 for b in beads)
    peaks = [float(point.max())] + [float(b.max()) for b in beads]
    assert peaks == sorted(peaks, reverse=True)


def test_with_a_measured_asymmetric_psf_the_depth_is_signed_and_the_ideal_fit_cannot_tell(model):
    """Beads either side of focus, moving away from it, simulated with the true microscope: the
    calibrated fit gives signed depths (z0 and v3 within 3 of their std, the path's mean depth within
    0.05 A, its sign right); the ideal optics' fit folds them to z0 + v3 / 2 >= 0."""
    truth = torch.tensor([[0.2, -0.3, 0.5, 0.4, 0.3, 0.2, 12000.0, 3.0], [-0.1, 0.2, -0.4, 0.6, -0.25, -0.3, 12000.0, 3.0]])
    fitter = BeadFitter(Optics(), SCALES, 32, psf=model)
    assert fitter.signed and fitter.z_lo < 0 < fitter.z_hi
    counts = fitter.simulate(truth, torch.Generator().manual_seed(3))
    fit = fitter.fit(counts)
    assert (np.abs(fit.params[:, 4:6] - truth[:, 4:6].numpy()) < 3 * fit.std[:, 4:6]).all(), (fit.params[:, 2:6], fit.std[:, 2:6])
    mean = fit.params[:, 5] + fit.params[:, 4] / 2
    assert np.allclose(mean, (truth[:, 5] + truth[:, 4] / 2).numpy(), atol=0.05) and (np.sign(mean) == [1, -1]).all()
    assert np.allclose(fit.params[:, 2:4], truth[:, 2:4], atol=0.05)
    assert fit.depth_sign_resolved.all()  # the mirror image in depth is far less likely
    ideal = BeadFitter(Optics(), SCALES, 32).fit(counts)
    assert (ideal.params[:, 5] + ideal.params[:, 4] / 2 >= 0).all() and not ideal.depth_sign_resolved.any()


def test_the_signed_report_starts_at_the_end_nearer_focus():
    theta = torch.tensor([[0.0, 0.0, 0.5, 0.1, 0.3, -0.1, 1e3, 1.0], [0.0, 0.0, 0.5, 0.1, 0.3, -0.6, 1e3, 1.0]])
    out = toward_focus(theta)
    assert torch.equal(out[0], theta[0])  # from -0.1 to 0.2: the start is nearer focus
    assert torch.allclose(out[1, 2:6], torch.tensor([-0.5, -0.1, -0.3, -0.3]))  # from -0.3 to -0.6, the other way in time


def test_static_beads_of_the_measured_microscope_give_their_depth(model):
    """--static: v1 = v2 = v3 = 0 held (std 0); the depth of still beads over the model's range within
    3 std, and their std under 0.1 um (NA 0.3: a depth of field of about 7 um)."""
    fitter = BeadFitter(Optics(), MotionScales(1.0, 1.0), 32, psf=model, static=True)
    lo, hi = model.z_range_um
    depth = torch.linspace(lo + 1, hi - 1, 12)
    truth = torch.stack([torch.full((12,), 0.3), torch.full((12,), -0.2), torch.zeros(12), torch.zeros(12), torch.zeros(12), depth,
                         torch.full((12,), 20000.0), torch.full((12,), 5.0)], 1)  # fmt: skip
    fit = fitter.fit(fitter.simulate(truth, torch.Generator().manual_seed(4)))
    assert (fit.params[:, 2:5] == 0).all() and (fit.std[:, 2:5] == 0).all() and not fit.at_bound.any()
    assert (np.abs(fit.params[:, 5] - depth.numpy()) < 3 * fit.std[:, 5]).all() and fit.std[:, 5].max() < 0.1


def test_blurflow_calibrate_writes_the_model_and_its_figure_and_particles_fits_with_it(tmp_path, stack, capsys):
    counts, _ = stack
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([counts, counts], 1))  # (planes, repeats, rows, cols): averaged
    assert main(["calibrate", str(tmp_path / "stack.tif"), "--z-step-um", "0.5", "--window", "32", "--out", str(tmp_path / "psf.h5")]) == 0
    err = capsys.readouterr().err
    assert "PSF model from 16 beads" in err and "asymmetric in depth" in err
    assert (tmp_path / "psf_calibration.png").stat().st_size > 10_000
    model = PSFModel.read(tmp_path / "psf.h5")
    assert model.beads == 16 and len(model.extra["bead_rows"]) == 16
    # a frame of still beads: --static reports depths, no velocities
    fitter = BeadFitter(Optics(), SCALES, 32, psf=model, static=True)
    image = np.full((96, 96), 5.0, np.float32)
    one = fitter.expected(torch.tensor([[0.0, 0.0, 0, 0, 0, 0.15, 20000.0, 0.0]]))[0].numpy()
    image[32:64, 32:64] += one
    tifffile.imwrite(tmp_path / "beads.tif", np.random.default_rng(1).poisson(image).astype(np.uint16))
    assert main(["particles", str(tmp_path / "beads.tif"), "--psf", str(tmp_path / "psf.h5"), "--static", "--window", "32"]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "beads_particles.csv")
    assert len(table) == 1 and table["v1"].isna().all() and table["v3"].isna().all() and table["depth_sign_resolved"].iloc[0]
    assert table["z0_um"].iloc[0] == pytest.approx(1.5, abs=0.2) and table[["x", "y"]].iloc[0].tolist() == pytest.approx([48, 48], abs=0.3)


def test_blurflow_calibrate_from_the_optics_and_its_bad_input(tmp_path, capsys, stack):
    assert main(["calibrate", "--out", str(tmp_path / "ideal.h5"), "--na", "0.25"]) == 0
    capsys.readouterr()
    ideal = PSFModel.read(tmp_path / "ideal.h5")
    assert ideal.optics.na == 0.25 and ideal.symmetric and ideal.z_range_um[0] <= -20 <= 20 <= ideal.z_range_um[1]
    tifffile.imwrite(tmp_path / "stack.tif", stack[0])
    cases = [
        (["calibrate", str(tmp_path / "stack.tif"), "--out", str(tmp_path / "a.h5")], 2, "--z-step-um: the z step"),
        (["calibrate", str(tmp_path / "stack.tif"), "--z-step-um", "0", "--out", str(tmp_path / "a.h5")], 2, "--z-step-um must be a positive"),
        (["calibrate", str(tmp_path / "stack.tif"), "--z-step-um", "0.5", "--out", str(tmp_path / "a.tif")], 2, "ends in .h5"),
        (["calibrate", str(tmp_path / "stack.tif"), "--z-step-um", "0.5", "--repeats", "3", "--out", str(tmp_path / "a.h5")], 1, "not a whole number"),
        (["particles", str(tmp_path / "stack.tif"), "--psf", str(tmp_path / "none.h5")], 1, "no such PSF model file"),
        (["particles", str(tmp_path / "stack.tif"), "--psf", str(tmp_path / "ideal.h5"), "--camera-pixel-um", "3.25"], 1, "calibrate with the images' optics"),
    ]
    for args, status, words in cases:
        assert main(args) == status
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    assert not (tmp_path / "a.h5").exists() and not list(tmp_path.glob("a_calibration.png")) and not list(tmp_path.glob(".*tmp*"))


def test_a_bead_beyond_the_models_depths_is_flagged_at_bound(model):
    """A still bead 3 um deeper than the model reaches: its depth ends at the model's edge, flagged."""
    fitter = BeadFitter(Optics(), MotionScales(1.0, 1.0), 32, psf=model, static=True)
    lo, hi = model.z_range_um
    inside = BeadFitter(Optics(), MotionScales(1.0, 1.0), 32, psf=PSFModel.from_optics(ASTIGMATIC, (lo, hi + 6.0), 32), static=True)
    truth = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, hi + 3.0, 20000.0, 5.0]])
    fit = fitter.fit(inside.simulate(truth, torch.Generator().manual_seed(5)))
    assert fit.at_bound[0] and fit.params[0, 5] == pytest.approx(hi, abs=0.5)


def test_the_finer_grid_asks_for_enough_beads():
    """Each camera frequency holds oversample^2 unknowns: 4 beads give a camera-grid table by default,
    and 2 samples per px (8 beads needed) is refused in one line."""
    counts, _ = bead_stack(Optics(), np.arange(-6, 7) * 1.0, shape=(144, 144), beads=4, spacing_px=48)
    assert calibrate(counts, 1.0, Optics(), window=32).oversample == 1
    with pytest.raises(CalibrationError, match="2 samples per px need >= 8 beads, the stack has 4"):
        calibrate(counts, 1.0, Optics(), window=32, oversample=2)
