"""Particle mode: maximum-likelihood fits of single beads against the motion PSF."""

import numpy as np
import pytest
import torch

import blurflow.particles.fit as fit_module
from blurflow.optics import MotionPSF, MotionScales, Optics
from blurflow.particles import BeadFitter, canonical, detect, windows
from blurflow.synthesis import Setup

SCALES = MotionScales(24, 10)


@pytest.fixture(scope="module")
def fitter():
    torch.set_num_threads(2)
    return BeadFitter(Optics(), SCALES, 64)


def bead(v1, v2, v3, z0, photons=5000.0, background=3.0, x=0.3, y=-0.4):
    return torch.tensor([[x, y, v1, v2, v3, z0, photons, background]])


def test_noise_free_beads_give_back_their_parameters(fitter):
    truth = torch.cat([bead(0.3, 0.3, 0.8, 0.3), bead(-1.2, 0.7, 0.6, 0.1, 8000, 2), bead(0.5, -0.5, 0.0, 0.6, 3000, 1), bead(0.0, 0.05, 0.5, 1.2)])
    fit = fitter.fit(fitter.expected(truth))
    expected = canonical(truth).numpy()
    got = fit.params.copy()
    lateral_sign = np.where(expected[:, 4] == 0, np.sign((got[:, 2:4] * expected[:, 2:4]).sum(1)), 1)  # no axial motion: an orientation
    got[:, 2:4] *= lateral_sign[:, None]
    assert np.abs(got[:, :6] - expected[:, :6]).max() < 0.01, (got, expected)
    assert np.allclose(got[:, 6], expected[:, 6], rtol=0.01) and np.allclose(got[:, 7], expected[:, 7], atol=0.05)
    assert fit.converged.all() and not fit.at_bound.any() and (np.abs(fit.deviance) < 1).all()
    assert list(fit.direction_resolved) == [True, True, False, True]


def test_the_time_reversed_path_is_the_same_image_and_the_same_fit(fitter):
    """The project's identity (v1, v2, v3, z0) == (-v1, -v2, -v3, z0 + v3) as a rendered image, and
    the fit returns the one representative; the opposite direction is fitted as opposite."""
    forward, backward = bead(0.4, -0.3, 0.7, 0.2), bead(-0.4, 0.3, -0.7, 0.9)
    assert torch.allclose(fitter.expected(forward), fitter.expected(backward), rtol=1e-5, atol=1e-4)
    fit = fitter.fit(torch.cat([fitter.expected(forward), fitter.expected(backward), fitter.expected(bead(-0.4, 0.3, 0.7, 0.2))]))
    assert np.abs(fit.params[0, 2:6] - [0.4, -0.3, 0.7, 0.2]).max() < 0.01 and np.abs(fit.params[1, 2:6] - fit.params[0, 2:6]).max() < 0.01
    assert np.abs(fit.params[2, 2:6] - [-0.4, 0.3, 0.7, 0.2]).max() < 0.01 and fit.direction_resolved.all()


def test_the_spread_of_fits_over_noise_matches_the_cramer_rao_bound(fitter):
    """200 Poisson draws of one bead: the standard deviation of the estimates is the bound (within
    25 %) for every motion component, and the estimates are unbiased within their error."""
    truth = bead(0.4, 0.3, 0.6, 0.4, photons=5000, background=2.0)
    g = torch.Generator().manual_seed(1)
    fit = fitter.fit(fitter.simulate(truth.repeat(200, 1), g))
    est, bound = fit.params[:, 2:6], fit.std[:, 2:6]
    spread = est.std(0)
    assert np.all(np.abs(spread / np.median(bound, 0) - 1) < 0.25), (spread, np.median(bound, 0))
    assert np.all(np.abs(est.mean(0) - truth[0, 2:6].numpy()) < 3 * spread / np.sqrt(200) + 0.01)


def test_fit_ranges_follow_the_optics_and_window():
    wide = BeadFitter(Optics(na=0.3), SCALES, 64)
    narrow = BeadFitter(Optics(na=0.6), SCALES, 64)
    assert narrow.z_max < wide.z_max / 2  # larger NA: defocus blurs faster, less depth fits
    assert BeadFitter(Optics(), SCALES, 96).v_max == pytest.approx(1.5 * wide.v_max)


def test_motion_psf_offset_and_its_gradient():
    psf = MotionPSF(Optics(), SCALES, 64)
    p = torch.tensor([[0.3, 0.2, 0.5, 0.2]])
    assert torch.allclose(psf(p, offset_px=torch.tensor([[3.0, -2.0]])), torch.roll(psf(p), (-2, 3), (-2, -1)), atol=1e-7)
    off, h = torch.tensor([[0.3, -0.2]]), 1e-2
    k = psf(p, offset_px=off, gradient=True)
    dx = (psf(p, offset_px=off + torch.tensor([h, 0])) - psf(p, offset_px=off - torch.tensor([h, 0]))) / (2 * h)
    assert k.shape == (1, 7, 64, 64) and torch.allclose(k[:, 0], psf(p, offset_px=off)) and torch.allclose(k[:, 1], dx, atol=1e-4 * dx.abs().max())


@pytest.mark.parametrize("max_steps", [None, 60])
def test_motion_psf_derivatives_by_the_motion_equal_central_differences(max_steps):
    """The analytic derivatives by v1, v2 (exact in the time steps' phases) and v3, z0 (through the
    table's slope, held within a table row) against central differences of 0.01 (a table row
    that changes within a step makes the kernels step by a little, which a smaller difference
    sees): within 1 % of each derivative's peak for v1, v2 and 5 % for v3 and z0, the static and
    the shrinking loops alike."""
    psf = MotionPSF(Optics(), SCALES, 64, z_range_um=(-30.0, 30.0), lateral_step_px=4.0, axial_steps_per_nyquist=8.0, max_steps=max_steps)
    p = torch.tensor([[0.3, 0.2, 0.5, 0.2], [-0.7, 0.4, 0.0, 0.6], [0.05, -0.9, 0.8, 0.4], [0.0, 0.0, 0.3, 0.3]])
    off = torch.tensor([[0.3, -0.2], [1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]])
    grad, h = psf(p, offset_px=off, gradient=True), 1e-2
    for i, tol in enumerate((0.01, 0.01, 0.05, 0.05)):
        e = torch.zeros(4)
        e[i] = h
        central = (psf(p + e, offset_px=off) - psf(p - e, offset_px=off)) / (2 * h)
        if i == 2:  # v3 = 0 is one step (its derivative one-sided): only the moving ones
            central, mine = central[[0, 2, 3]], grad[[0, 2, 3], 3 + i]
        else:
            mine = grad[:, 3 + i]
        assert ((mine - central).abs().amax((1, 2)) <= tol * central.abs().amax((1, 2))).all(), i


def test_the_fitters_coarse_time_steps_keep_the_cramer_rao_std_of_fine_ones(fitter, monkeypatch):
    """The fitter's kernels take time steps of LATERAL_STEP_PX and 1/AXIAL_STEPS of the axial
    Nyquist pitch; their Cramér-Rao std of v1, v2, v3, z0 stay within 2 % (median) and 8 % (90 %
    of 100 random beads) of those of steps of 0.5 px and 1/32 (measured: 1 % and 4.6 %)."""
    g = torch.Generator().manual_seed(3)
    beads = torch.cat([torch.rand(100, 2, generator=g) - 0.5, 2 * torch.rand(100, 2, generator=g) - 1, torch.rand(100, 2, generator=g)], 1)
    beads = torch.cat([beads, torch.full((100, 1), 5000.0), torch.full((100, 1), 3.0)], 1)
    coarse = fitter.cramer_rao(beads)[1][:, 2:6]
    monkeypatch.setattr(fit_module, "LATERAL_STEP_PX", 0.5)
    monkeypatch.setattr(fit_module, "AXIAL_STEPS", 32.0)
    fine = BeadFitter(Optics(), SCALES, 64).cramer_rao(beads)[1][:, 2:6]
    error = (coarse / fine - 1).abs()
    assert (error.median(0).values < 0.02).all() and (error.quantile(0.9, dim=0) < 0.08).all(), error.quantile(0.9, dim=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_fit_on_a_cuda_device_gives_the_cpus_fits(fitter):
    """The whole fit runs on the device (its bookkeeping too) and finds the CPU's fits, within 0.2
    of their std."""
    truth = torch.cat([bead(0.3, 0.3, 0.8, 0.3), bead(-1.2, 0.7, 0.6, 0.1, 8000, 2), bead(0.0, 0.05, 0.5, 1.2)])  # moving: each a direction
    counts = fitter.simulate(truth, torch.Generator().manual_seed(4))
    cpu, gpu = fitter.fit(counts), BeadFitter(Optics(), SCALES, 64, device="cuda").fit(counts)
    assert (np.abs(gpu.params[:, :6] - cpu.params[:, :6]) <= 0.2 * cpu.std[:, :6] + 1e-6).all() and np.allclose(gpu.std, cpu.std, rtol=0.01)


def test_detection_groups_neighbours_leaves_out_the_border_and_the_joint_fit_finds_each_bead(fitter):
    """A 300 x 400 image with four beads: one isolated, one too near the border for its window,
    two whose windows hold each other's streak, 40 px apart. Detection keeps three, the two as
    neighbours whose light does not touch (each fitted alone, the other's pixels left out, the
    other's light known): each is found at its true position and motion, with the std it has
    alone."""
    from blurflow.particles import fit_frames

    beads = torch.cat([bead(0.4, 0.3, 0.5, 0.3, 9000, 0, x=0, y=0), bead(0.5, 0.0, 0.2, 0.2, 9000, 0, x=0, y=0),
                       bead(-0.3, 0.6, 0.6, 0.2, 9000, 0, x=0, y=0), bead(0.2, 0.2, 0.3, 0.5, 9000, 0, x=0, y=0)])  # fmt: skip
    centres = [(100, 100), (250, 370), (200, 250), (220, 290)]  # (row, col) of each path midpoint
    mu = torch.full((300, 400), 4.0)
    for params, (y, x) in zip(beads, centres):
        kernel = fitter.expected(params[None])[0]
        top, left = y - 32, x - 32
        rows, cols = slice(max(top, 0), min(top + 64, 300)), slice(max(left, 0), min(left + 64, 400))
        mu[rows, cols] += kernel[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left]
    image = torch.poisson(mu, generator=torch.Generator().manual_seed(0)).numpy()
    found = detect(image, 64)
    assert found.centres.tolist() == [[100, 100], [200, 250], [220, 290]] and found.rejected == {"border": 1, "merged": 0}
    assert found.neighbours.tolist() == [[1, 2], [2, 1]] and found.touching.tolist() == [] and found.groups().tolist() == [0, 1, 2]
    assert found.labels.max() == 3 and found.labels[100, 100] == 1 and found.unfitted[250, 370] and not found.unfitted[100, 100]
    particles = fit_frames(fitter, [image], [found])
    assert particles.neighbours.tolist() == [0, 0, 0] and particles.group.tolist() == [0, 1, 2]
    truth = beads[[0, 2, 3]].numpy()
    fit = particles.fit
    position = fit.params[:, :2] + found.centres[:, ::-1] - np.array(centres)[[0, 2, 3]][:, ::-1]
    assert np.abs(position).max() < 0.3 and np.abs(fit.params[:, 2:6] - truth[:, 2:6]).max() < 0.1
    alone = fitter.cramer_rao(torch.from_numpy(fit.params[1:]))[1].numpy()
    # quasi-Poisson: times the dispersion's root; the information is the last point's evaluated (the last Newton step, promising
    # < 0.05 in log-likelihood, is taken untried: within 0.3 std of it), where the bound differs by at most a few %
    assert np.allclose(fit.std[1:, 2:6], alone[:, 2:6] * np.sqrt(fit.dispersion[1:, None]), rtol=0.03)


def test_the_joint_std_grows_where_a_neighbours_streak_covers_the_particles():
    """Two beads whose streaks cross: each one's Cramér-Rao std from the joint Fisher information is
    larger than alone (a neighbour explains some of its pixels); far apart, the same as alone."""
    from blurflow.particles import joint_std

    fitter = BeadFitter(Optics(), SCALES, 64)
    theta = torch.cat([bead(0.5, 0.0, 0.3, 0.2, 6000, 3, x=0, y=0), bead(0.0, 0.5, 0.3, 0.2, 6000, 3, x=0, y=0)])
    alone = fitter.cramer_rao(theta)[1].numpy()
    weight = torch.ones(2, 64 * 64)
    for gap, grows in ((3, True), (60, False)):
        centres = np.array([[100, 100], [100 + gap, 100]])
        std = joint_std(fitter, theta, centres, np.array([[0, 1], [1, 0]]), weight, np.array([0, 1]))
        if grows:
            assert (std[:, :6] > 1.1 * alone[:, :6]).any(1).all()
        else:
            assert np.allclose(std[:, :6], alone[:, :6], rtol=0.02)


def test_blurflow_particles_writes_a_table_in_physical_units_and_an_overlay(fitter, tmp_path, capsys):
    import pandas as pd
    import tifffile
    import yaml
    from PIL import Image

    from blurflow import cli

    truth = bead(-0.8, 0.3, 0.4, 0.1, 6000, 0, x=0, y=0)
    mu = torch.full((160, 200), 4.0)
    mu[68:132, 68:132] += fitter.expected(truth)[0]  # path midpoint at row 100, column 100
    tifffile.imwrite(tmp_path / "beads.tif", torch.poisson(mu, generator=torch.Generator().manual_seed(0)).numpy().astype(np.uint16))
    (tmp_path / "optics.yaml").write_text(yaml.safe_dump({"optics": {"na": 0.3}, "motion": {"lateral_scale_px": 24, "axial_scale_um": 10}}))
    args = ["particles", str(tmp_path / "beads.tif"), "--config", str(tmp_path / "optics.yaml"), "--exposure-ms", "100"]
    assert cli.main(args) == 0
    assert "1 particles fitted" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "beads_particles.csv")
    assert list(table.columns) == list(cli.PARTICLE_COLUMNS) and len(table) == 1
    row = table.iloc[0]
    per_s, pixel = 10.0, 0.65  # 100 ms exposure; 6.5 um camera pixel / 10x
    assert abs(row.x_px - 100) < 0.3 and abs(row.y_px - 100) < 0.3 and row.x_um == pytest.approx(row.x_px * pixel)
    assert row.v1 == pytest.approx(-0.8 * 24 * pixel * per_s, abs=0.05 * 24 * pixel * per_s) and row.speed_unit == "um/s"
    assert row.v3 == pytest.approx(0.4 * 10 * per_s, abs=0.1 * 10 * per_s) and row.z0_um == pytest.approx(1.0, abs=1.0)
    assert row.direction_resolved and row.converged and row.v1_std > 0
    with Image.open(tmp_path / "beads_particles.png") as im:
        assert im.size[0] > 500
    import matplotlib.pyplot as plt

    assert not plt.get_fignums()  # the overlay is closed once written
    # a rerun on everything skips its own outputs; a user's file of an output's name is never overwritten
    assert cli.main(["particles", *map(str, sorted(tmp_path.glob("beads*"))), "--quiet"]) == 0
    (tmp_path / "beads_particles.csv").write_text("my,own\n1,2\n")
    assert cli.main(["particles", str(tmp_path / "beads.tif"), "--quiet"]) == 1
    assert (tmp_path / "beads_particles.csv").read_text() == "my,own\n1,2\n"
    assert "not an output of blurflow particles; not overwritten" in capsys.readouterr().err


def test_blurflow_particles_bad_input_is_one_line(tmp_path, capsys):
    from blurflow import cli

    (tmp_path / "bad.tif").write_bytes(b"II*\x00junk")
    assert cli.main(["particles", str(tmp_path / "bad.tif"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read image" in err[0] and not list(tmp_path.glob("*_particles*"))
    assert cli.main(["particles", str(tmp_path / "bad.tif"), "--window", "63"]) == 2
    assert cli.main(["particles", str(tmp_path / "bad.tif"), "--na", "1.5"]) == 2
    assert "optics:" in capsys.readouterr().err


def test_the_cramer_rao_map_falls_with_photons_and_a_deeper_axial_scale_shows_v3():
    from blurflow.particles import cramer_rao_map

    rows = cramer_rao_map(Optics(), [(24, 10), (24, 20)], [1000, 20000], motions=8)
    by = {(r["axial_scale_um"], r["photons"]): r for r in rows}
    for name in ("v1", "v3", "z0"):
        for axial in (10, 20):
            assert by[(axial, 20000)][f"std_{name}"] < by[(axial, 1000)][f"std_{name}"] / 3  # ~ 1 / sqrt(photons)
            assert 0 <= by[(axial, 1000)][f"ideal_r2_{name}"] <= by[(axial, 20000)][f"ideal_r2_{name}"] <= 1
    assert by[(20, 1000)]["std_v3"] < by[(10, 1000)]["std_v3"]  # more axial blur per unit v3: v3 is better seen
    assert by[(20, 1000)]["window_px"] > by[(10, 1000)]["window_px"]


def test_the_dense_bead_set_needs_no_sources_and_is_fitted_bead_by_bead(tmp_path):
    """The dense bead set of 256 px (larger than the default run's 256 px source tiles would
    allow for other sets: it needs none): per image its beads' midpoints at least 8 px apart where
    a 64 px window fits, one motion per bead; fit_dense_testset gives one row per bead, matched
    fits within 3 px and with their motion, the rest NaN."""
    from blurflow import particles, testsets
    from blurflow.data import ShardDataset
    from blurflow.synthesis import SynthesisConfig

    torch.set_num_threads(2)
    cfg = SynthesisConfig(photons=(15000, 20000), background_sigma=(0, 2))
    testsets.write_beads_dense(tmp_path / "dense.h5", Setup(Optics(), SCALES, 64, cfg, seed=0), 256, 2, 1.0, progress=False)
    ds = ShardDataset([tmp_path / "dense.h5"])
    assert ds.attrs["window"] == 64 and len(ds) == 2 and ds[0]["image"].shape == (1, 256, 256)
    for rows, cols in zip(ds.attrs["bead_rows"], ds.attrs["bead_cols"]):
        where = np.stack([rows, cols], 1)
        assert len(where) == 4 and (where >= 32).all() and (where < 224).all()
        assert min(np.hypot(*(a - b)) for i, a in enumerate(where) for b in where[:i]) >= 8
    table = particles.fit_dense_testset(tmp_path / "dense.h5")
    assert len(table) == 8 and table["fitted"].sum() >= 6
    fitted = table[table["fitted"]]
    error = np.abs(fitted[["v3", "z0"]].to_numpy() - fitted[["true_v3", "true_z0"]].to_numpy())
    assert np.allclose(fitted["v2"].abs(), fitted["true_v2"].abs(), atol=0.05) and np.median(error) < 0.1
    assert table.loc[~table["fitted"], "v1"].isna().all()


def test_beads_of_the_training_synthesis_are_fitted_where_and_as_they_were_made(tmp_path, fitter):
    """The bead test set (rendered by the training synthesis: its kernel size, time steps and camera)
    against the fit (its own window and steps): positions, photons and motions agree."""
    import h5py

    from blurflow import sources, testsets
    from blurflow.data import ShardDataset
    from blurflow.synthesis import SynthesisConfig

    sources.write_sources(sources.phantom_images(1, 256, seed=0), tmp_path / "src.h5", 256, "phantom")
    cfg = SynthesisConfig(photons=(15000, 20000), background_sigma=(0, 2))
    testsets.write_beads(tmp_path / "beads.h5", tmp_path / "src.h5", Setup(Optics(), SCALES, 64, cfg, seed=0), 128, 2, progress=False)
    ds = ShardDataset([tmp_path / "beads.h5"])
    centres = np.stack([ds.attrs["bead_rows"], ds.attrs["bead_cols"]], 1)
    assert centres.tolist() == [[32, 32], [32, 96], [96, 32], [96, 96]]
    with h5py.File(tmp_path / "beads.h5") as f:
        truth, photons = f["params"][()], f["quantum_efficiency"][()] * f["photons"][()]
    assert (truth[..., 1] >= 0).all()  # drawn with v2 >= 0: the stored labels are the signed motions
    for i in range(2):
        fit = fitter.fit(windows(ds[i]["image"][0].numpy(), centres, 64))
        assert np.abs(fit.params[:, :2]).max() < 0.2 and np.allclose(fit.params[:, 6], photons[i], rtol=0.05)
        assert np.abs(fit.params[:, 2:4] - truth[i, :, :2]).max() < 0.03
        assert np.abs(fit.params[:, 4:6] - truth[i, :, 2:4]).max() < 0.15


def test_table1_bead_cases_are_fitted_to_their_motion(tmp_path):
    """Table 1's bead cases a-d (isolated beads, one motion per image) through the particle fit and
    table1_rows: the fit's columns within 0.05 (v1, v2) and 0.1 (v3, z0) of the truth, or three
    Cramér-Rao std of the four beads' mean where that is more (v3 of a bead in focus with no
    axial motion: 0.1-0.4 each), none for the texture case e."""
    import h5py
    import pandas as pd

    from blurflow import evaluate, particles, sources, testsets
    from blurflow.synthesis import SynthesisConfig

    torch.set_num_threads(2)
    sources.write_sources(sources.phantom_images(1, 256, seed=0), tmp_path / "src.h5", 256, "phantom")
    cfg = SynthesisConfig(photons=(15000, 20000), background_sigma=(0, 2))
    testsets.write_table1(tmp_path / "t1.h5", tmp_path / "src.h5", Setup(Optics(), SCALES, 64, cfg, seed=0), 128, repeats=1, per_side=2, progress=False)
    fits = particles.fit_testset(tmp_path / "t1.h5")
    assert sorted(set(fits["image"])) == [0, 1, 2, 3] and len(fits) == 16  # case e (image 4) is no bead image
    fits.to_csv(tmp_path / "fits.csv", index=False)
    with h5py.File(tmp_path / "pred.h5", "w") as f:
        f["pred"] = np.zeros((5, 5, 128, 128), np.float32)
    rows = evaluate.table1_rows(tmp_path / "t1.h5", tmp_path / "pred.h5", tmp_path / "fits.csv").set_index("case")
    truth, fit = rows[["v1", "v2", "v3", "z0"]].to_numpy(), rows[["fit_v1", "fit_v2", "fit_v3", "fit_z0"]].to_numpy()
    std_of_mean = np.sqrt((fits[["std_v1", "std_v2", "std_v3", "std_z0"]] ** 2).groupby(fits["image"]).mean() / 4).to_numpy()
    assert (np.abs(fit - truth)[:4] < np.maximum([0.05, 0.05, 0.1, 0.1], 3 * std_of_mean)).all(), pd.DataFrame(fit, index=rows.index)
    assert np.isnan(fit[4]).all() and rows["beads_fitted"].tolist() == [4, 4, 4, 4, 0]


def one_bead_image(fitter, seed=0) -> np.ndarray:
    """160 x 200 counts: one bead (path midpoint at row 100, column 100) on a background of 4."""
    mu = torch.full((160, 200), 4.0)
    mu[68:132, 68:132] += fitter.expected(bead(0.5, 0.3, 0.4, 0.1, 6000, 0, x=0, y=0))[0]
    return torch.poisson(mu, generator=torch.Generator().manual_seed(seed)).numpy().astype(np.uint16)


def test_images_without_a_particle_give_empty_tables_and_neighbours_are_fitted_together(fitter, tmp_path, capsys):
    """All zero and pure noise: an empty table each, one line each, no traceback; three beads
    whose windows hold each other's streaks: fitted together, each at its motion; the image after
    them is fitted."""
    import pandas as pd
    import tifffile

    from blurflow import cli

    rng = np.random.default_rng(1)
    crowded = np.full((160, 200), 4.0, np.float32)
    for y, x in ((80, 60), (80, 85), (80, 110)):  # three beads 25 px apart: every window holds another
        crowded[y - 32 : y + 32, x - 32 : x + 32] += fitter.expected(bead(0.2, 0.1, 0.3, 0.1, 6000, 0, x=0, y=0))[0].numpy()
    images = {
        "a_zero": np.zeros((128, 128), np.uint16),
        "b_noise": rng.poisson(5, (128, 128)).astype(np.uint16),
        "c_crowded": rng.poisson(crowded).astype(np.uint16),
        "d_bead": one_bead_image(fitter),
    }
    for name, data in images.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", data)
    assert cli.main(["particles", *(str(tmp_path / f"{n}.tif") for n in images)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "d_bead.tif: 1 particles fitted" in err
    assert "c_crowded.tif: 3 particles fitted, 3 of them with their neighbours" in err
    for name in images:
        table = pd.read_csv(tmp_path / f"{name}_particles.csv")
        assert list(table.columns) == list(cli.PARTICLE_COLUMNS) and len(table) == {"c_crowded": 3, "d_bead": 1}.get(name, 0), name
    crowded = pd.read_csv(tmp_path / "c_crowded_particles.csv")
    assert crowded["group"].nunique() == 1 and sorted(crowded["neighbours"]) == [1, 1, 2]
    assert np.allclose(crowded["dx_px"], 0.2 * 24, atol=0.3) and np.allclose(crowded["dy_px"], 0.1 * 24, atol=0.3)  # v3, z0: the density benchmark


def test_a_stack_is_linked_into_tracks_in_one_go(fitter, tmp_path, capsys):
    """Two beads moving 40 px (3.3 streaks) a frame along x over 3 frames, one sinking (its
    direction resolved by the exposure), one level (resolved by its track): --link writes their
    2 tracks of 3 points, velocities along +x; --link without the frame interval is one line."""
    import pandas as pd
    import tifffile

    from blurflow import cli

    rng = np.random.default_rng(0)
    frames = []
    for f in range(3):
        mu = np.full((160, 260), 4.0, np.float32)
        for row, v3 in ((50, 0.2), (110, 0.0)):
            x, z0 = 60 + 40 * f, 0.1 + v3 * 3.33 * f  # 3.33 exposures a frame
            mu[row - 32 : row + 32, x - 32 : x + 32] += fitter.expected(bead(0.5, 0.0, v3, z0, 8000, 0, x=0, y=0))[0].numpy()
        frames.append(rng.poisson(mu).astype(np.uint16))
    tifffile.imwrite(tmp_path / "movie.tif", np.stack(frames))
    argv = ["particles", str(tmp_path / "movie.tif"), "--link", "--exposure-ms", "10"]
    assert cli.main(argv) == 2 and "--link needs --frame-interval-ms" in capsys.readouterr().err
    assert not (tmp_path / "movie_particles.csv").exists()
    assert cli.main([*argv, "--frame-interval-ms", "33.3"]) == 0
    assert "2 tracks of 6 particles in 3 frames" in capsys.readouterr().err
    tracks = pd.read_csv(tmp_path / "movie_tracks.csv")
    assert tracks.groupby("particle").size().tolist() == [3, 3] and (tracks["v1"] > 0).all()
    assert sorted(tracks.groupby("particle")["y"].mean().round(-1)) == [50, 110] and set(tracks["direction"]) <= {"fit", "track"}


@pytest.mark.parametrize(
    "args, option",
    [
        (["--window", "100000"], "--window must be an even number of pixels from 16 to 512"),
        (["--window", "15"], "--window"),
        (["--threshold", "0"], "--threshold must be a positive number"),
        (["--threshold", "-1"], "--threshold"),
        (["--threshold", "nan"], "--threshold"),
        (["--offset", "nan"], "--offset must be a finite number"),
    ],
)
def test_bad_particle_options_are_one_line_naming_the_option(tmp_path, capsys, args, option):
    import tifffile

    from blurflow import cli

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((128, 128), np.uint16))
    assert cli.main(["particles", str(tmp_path / "a.tif"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and not list(tmp_path.glob("*_particles*"))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"optics": {"foo": 1}}, "unknown config key optics.foo"),
        ({"optics": {"na": "high"}}, "config key optics.na: 'high' is not of type 'number'"),
        ({"motion": {"axial_scale_um": -3}}, "config key motion.axial_scale_um"),
        ([1, 2], "is not a blurflow config"),
    ],
)
def test_a_particles_config_is_checked_by_the_schema(tmp_path, capsys, section, message):
    import tifffile
    import yaml

    from blurflow import cli

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((128, 128), np.uint16))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(section))
    assert cli.main(["particles", str(tmp_path / "a.tif"), "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blurflow: error: --config:") and message in err[0], err


def test_a_window_larger_than_the_image_fails_that_image_alone(fitter, tmp_path, capsys):
    import tifffile

    from blurflow import cli

    tifffile.imwrite(tmp_path / "a_small.tif", np.zeros((48, 200), np.uint16))
    tifffile.imwrite(tmp_path / "b_bead.tif", one_bead_image(fitter))
    assert cli.main(["particles", str(tmp_path / "a_small.tif"), str(tmp_path / "b_bead.tif"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"blurflow: error: {tmp_path / 'a_small.tif'}: the fit window (64 px) is larger than the image (48 x 200 px): use a smaller --window"]
    assert (tmp_path / "b_bead_particles.csv").exists() and not (tmp_path / "a_small_particles.csv").exists()


def test_an_offset_above_the_pixels_is_a_warning_and_a_flag(fitter, tmp_path, capsys):
    import pandas as pd
    import tifffile

    from blurflow import cli

    tifffile.imwrite(tmp_path / "bead.tif", one_bead_image(fitter))
    assert cli.main(["particles", str(tmp_path / "bead.tif"), "--offset", "1e9"]) == 0
    err = capsys.readouterr().err
    assert "100.0% of the pixels are at or below the offset 1e+09: the image holds almost no signal" in err
    table = pd.read_csv(tmp_path / "bead_particles.csv")
    assert (table["flag"].str.contains("below_offset")).all()


def test_merged_beads_are_flagged_and_not_reported_as_one_confident_particle(fitter, tmp_path, capsys):
    """Twenty beads 14 px apart along a row merge into one blob far wider than a streak: a row
    flagged 'merged' without numbers, not '1 particle fitted'; three beads 8-9 px apart, one blob
    within one window, are split into three (the residual of one streak's fit shows the others)
    and fitted together: each at its position and lateral motion."""
    import pandas as pd
    import tifffile

    from blurflow import cli

    kernel = fitter.expected(bead(0.1, 0.05, 0.2, 0.1, 6000, 0, x=0, y=0))[0].numpy()
    chain, cluster = np.full((200, 400), 4.0, np.float32), np.full((200, 200), 4.0, np.float32)
    for x in range(60, 60 + 20 * 14, 14):
        chain[68:132, x - 32 : x + 32] += kernel
    for y, x in ((96, 96), (100, 104), (105, 97)):  # one blob, within one window
        cluster[y - 32 : y + 32, x - 32 : x + 32] += kernel
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "chain.tif", rng.poisson(chain).astype(np.uint16))
    tifffile.imwrite(tmp_path / "cluster.tif", rng.poisson(cluster).astype(np.uint16))
    assert cli.main(["particles", str(tmp_path / "chain.tif"), str(tmp_path / "cluster.tif")]) == 0
    err = capsys.readouterr().err
    assert "chain.tif: 0 particles fitted (left out: 1 merged blobs wider than the window" in err
    chain_table = pd.read_csv(tmp_path / "chain_particles.csv")
    assert len(chain_table) == 1 and chain_table["flag"][0] == "merged" and chain_table[["v1", "v2", "v3", "z0_um"]].isna().all(axis=None)
    assert 100 < chain_table["x_px"][0] < 300
    cluster_table = pd.read_csv(tmp_path / "cluster_particles.csv").sort_values(["x", "y"])
    assert "cluster.tif: 3 particles fitted, 3 of them with their neighbours" in err and cluster_table["neighbours"].tolist() == [2, 2, 2]
    assert np.allclose(cluster_table[["x", "y"]], [[96, 96], [97, 105], [104, 100]], atol=0.5)
    assert np.allclose(cluster_table["dx_px"], 0.1 * 24, atol=0.3) and np.allclose(cluster_table["dy_px"], 0.05 * 24, atol=0.3)


def test_two_beads_side_by_side_that_one_streak_explains_are_fitted_as_two(fitter, monkeypatch):
    """Two beads 5 px apart across their parallel streaks: detected as one streak whose one-particle
    fit leaves no streak of residual (a wider, deeper streak explains them about as well); the pair
    trial fits two in its window, gains far more than a second particle's noise and splits it:
    each bead at its midpoint and motion. Without the trial (an unreachable gain) they stay one."""
    from blurflow import particles

    kernel = fitter.expected(bead(0.5, 0.1, 0.3, 0.3, 6000, 0, x=0, y=0))[0].numpy()
    image = np.full((128, 128), 4.0, np.float32)
    for y in (62, 67):
        image[y - 32 : y + 32, 32:96] += kernel
    counts = np.random.default_rng(0).poisson(image).astype(np.float32)
    found = detect(counts, 64)
    assert len(found.centres) == 1
    parts = particles.fit_frames(fitter, [counts], [found])
    order = np.argsort(parts.centres[:, 0])
    midpoints = (parts.centres + parts.fit.params[:, [1, 0]])[order]
    assert len(parts.centres) == 2 and np.allclose(midpoints, [[62, 64], [67, 64]], atol=0.5), midpoints
    assert np.allclose(parts.fit.params[:, 2:4], [0.5, 0.1], atol=0.03) and np.allclose(parts.fit.params[:, 4:6], 0.3, atol=0.1)
    assert parts.fit.converged.all() and not parts.fit.poor_fit().any() and parts.group.tolist() == [0, 0]
    monkeypatch.setattr(particles.frames, "PAIR_GAIN", np.inf)
    assert len(particles.fit_frames(fitter, [counts], [found]).centres) == 1


def test_a_stack_is_a_time_series_that_trackpy_links(fitter, tmp_path):
    """Three frames of two beads moving across the field: one table with a frame column, x, y and
    mass as trackpy reads them; trackpy.link joins each bead's fits into one track."""
    import pandas as pd
    import tifffile

    from blurflow import cli

    trackpy = pytest.importorskip("trackpy")
    kernel = fitter.expected(bead(0.3, 0.2, 0.2, 0.1, 8000, 0, x=0, y=0))[0].numpy()
    frames = np.full((3, 200, 260), 4.0, np.float32)
    for t in range(3):
        for y, x in ((60 + 4 * t, 60 + 6 * t), (140 - 3 * t, 190 - 5 * t)):
            frames[t, y - 32 : y + 32, x - 32 : x + 32] += kernel
    tifffile.imwrite(tmp_path / "movie.tif", np.random.default_rng(0).poisson(frames).astype(np.uint16), photometric="minisblack")
    assert cli.main(["particles", str(tmp_path / "movie.tif"), "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "movie_particles.csv")
    assert sorted(table["frame"]) == [0, 0, 1, 1, 2, 2] and (table["mass"] == table["photons"]).all()
    trackpy.quiet()
    tracks = trackpy.link(table, search_range=15)
    assert tracks["particle"].nunique() == 2
    for _, track in tracks.groupby("particle"):
        assert sorted(track["frame"]) == [0, 1, 2]
        step = np.diff(track.sort_values("frame")[["x", "y"]].to_numpy(), axis=0)
        assert np.allclose(np.abs(step), np.abs(step[0]), atol=0.5)  # a steady motion, frame to frame


def test_on_the_training_camera_the_fit_measures_its_noise_and_its_std_covers_the_errors(fitter):
    """The synthesis camera (blurflow.camera.CameraNoise: Poisson light plus a half-normal background
    of scale sigma outside the Poisson draw, rounded) is not the fitter's likelihood (Poisson with
    the background inside its mean): on purpose, since the fitter meets real cameras. It fits the
    background's mean (sigma sqrt(2 / pi)) as b, measures the excess noise as the dispersion (the
    half-normal's variance plus rounding over its mean: 3.66 at sigma 8) and widens its std by
    the square root of it (quasi-Poisson): unbiased fits whose std covers the errors, which the
    Poisson bound alone does not."""
    import math

    from blurflow.camera import CameraNoise, generator

    g = torch.Generator().manual_seed(0)
    n, sigma = 80, 8.0
    motion = torch.rand(n, 4, generator=g) * torch.tensor([2.0, 2.0, 1.0, 1.0]) - torch.tensor([1.0, 1.0, 0.0, 0.0])
    motion[:, 2] = motion[:, 2].clamp(min=0.1)
    truth = torch.cat([torch.rand(n, 2, generator=g) - 0.5, motion, torch.full((n, 1), 8000.0), torch.zeros(n, 1)], 1)
    counts = CameraNoise()(fitter.expected(truth), torch.ones(n), torch.ones(n), torch.full((n,), sigma), generator=generator(0))
    fit = fitter.fit(counts)
    mean = sigma * math.sqrt(2 / math.pi)
    assert abs(np.median(fit.dispersion) / ((sigma**2 * (1 - 2 / math.pi) + 1 / 12) / mean) - 1) < 0.05
    assert abs(np.median(fit.params[:, 7]) / mean - 1) < 0.02
    err = fit.params[:, 2:6] - canonical(truth).numpy()[:, 2:6]
    assert (np.abs(err.mean(0)) < 3 * err.std(0) / np.sqrt(n)).all()
    within = (np.abs(err) < 2 * fit.std[:, 2:6]).mean(0)
    poisson_only = (np.abs(err) < 2 * fit.std[:, 2:6] / np.sqrt(fit.dispersion)[:, None]).mean(0)
    assert (within >= 0.9).all() and poisson_only.mean() < within.mean() - 0.05, (within, poisson_only)


def test_fits_of_noise_are_flagged_faint_and_a_faint_bead_is_not(tmp_path, capsys):
    """Beads of 6,000 and 150 photons on a background of 4, detected down to 3 noise std: the noise
    peaks fitted beside them hold photons within 5 of their std of none (flag 'faint', one warning
    line); both beads stay unflagged."""
    import pandas as pd
    import tifffile

    from blurflow import cli

    fitter = BeadFitter(Optics.from_config({}), MotionScales.from_config({}), 64)
    mu = np.full((160, 260), 4.0)
    for x, photons in ((70, 6000.0), (190, 150.0)):
        mu[68:132, x - 32 : x + 32] += fitter.expected(bead(0.5, 0.3, 0.4, 0.1, photons, 0, x=0, y=0))[0].numpy()
    tifffile.imwrite(tmp_path / "f.tif", np.random.default_rng(0).poisson(mu).astype(np.uint16))
    assert cli.main(["particles", str(tmp_path / "f.tif"), "--threshold", "3"]) == 0
    table = pd.read_csv(tmp_path / "f_particles.csv")
    beads = (np.abs(table["y"] - 100) < 2) & ((np.abs(table["x"] - 70) < 2) | (np.abs(table["x"] - 190) < 2))
    assert beads.sum() == 2 and table.loc[beads, "flag"].isna().all()
    assert len(table) > 2 and (table.loc[~beads, "flag"] == "faint").all()
    assert (table.loc[~beads, "photons"] < 5 * table.loc[~beads, "photons_std"]).all()
    assert f"{(~beads).sum()} fits hold photons within 5 std of none (flagged 'faint')" in capsys.readouterr().err


def test_a_saturated_bead_is_fitted_from_its_other_pixels_and_flagged(tmp_path, capsys):
    """A bead of 400,000 photons clipped at a 12-bit camera's 4095 (32 pixels) beside one of 5,000:
    its plateau is taken as the saturation (one warning line), the clipped pixels left out of the
    fit: v3 and z0 within 4 std of the truth, photons within 3 %, flag 'saturated'; the other bead
    unflagged. Fitted on the clipped pixels (--saturation above them) v3 came out half."""
    import pandas as pd
    import tifffile

    from blurflow import cli

    fitter = BeadFitter(Optics.from_config({}), MotionScales.from_config({}), 64)
    mu = np.full((160, 260), 4.0)
    for x, photons in ((70, 5000.0), (190, 400_000.0)):
        mu[68:132, x - 32 : x + 32] += fitter.expected(bead(0.5, 0.3, 0.4, 0.1, photons, 0, x=0, y=0))[0].numpy()
    tifffile.imwrite(tmp_path / "s.tif", np.minimum(np.random.default_rng(0).poisson(mu), 4095).astype(np.uint16))
    assert cli.main(["particles", str(tmp_path / "s.tif")]) == 0
    err = capsys.readouterr().err
    assert "32 pixels at the maximum 4095: taken as the camera's saturation" in err and "1 fits left saturated pixels out" in err
    table = pd.read_csv(tmp_path / "s_particles.csv").sort_values("x")
    dim, bright = table.iloc[0], table.iloc[1]
    assert pd.isna(dim["flag"]) and bright["flag"] == "saturated"
    assert abs(bright["v3"] - 4.0) < 4 * bright["v3_std"] and abs(bright["z0_um"] - 1.0) < 4 * bright["z0_std_um"]
    assert bright["photons"] == pytest.approx(400_000, rel=0.03)
    assert cli.main(["particles", str(tmp_path / "s.tif"), "--saturation", "5000", "--out", str(tmp_path / "raw"), "--quiet"]) == 0
    clipped = pd.read_csv(tmp_path / "raw/s_particles.csv").sort_values("x").iloc[1]
    assert clipped["v3"] < 0.6 * 4.0 and "saturated" not in str(clipped["flag"])
