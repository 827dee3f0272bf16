"""Physics of the 3D PSF and the 3D motion PSF against analytic and brute-force references."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from blurflow.measurability import ideal_r2, report, texture_cramer_rao
from blurflow.optics import MotionPSF, MotionScales, Optics, canonical_sign, noll_to_nm, psf3d, zernike
from blurflow.schema import defaults, load
from blurflow.synthesis import Setup

OPTICS = Optics()
SCALES = MotionScales(lateral_scale_px=8.0, axial_scale_um=5.0)


@pytest.fixture(scope="module")
def motion() -> MotionPSF:
    return MotionPSF(OPTICS, SCALES, size=32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's peak."""
    return float((a - b).abs().max() / b.abs().max())


def random_params(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(n, 2, generator=g) * 2 - 1, torch.rand(n, 2, generator=g)], dim=1)


def half_max_width(profile: np.ndarray, pitch: float) -> float:
    """Full width at half maximum of a centred, monotone-falling profile (linear interpolation)."""
    c = len(profile) // 2
    half = profile[c] / 2
    i = c + int(np.argmax(profile[c:] < half))
    x = i - 1 + (profile[i - 1] - half) / (profile[i - 1] - profile[i])
    return 2 * (x - c) * pitch


# --- optics parameters -------------------------------------------------------------------------


def test_defaults_give_the_design_sample_pixel():
    assert OPTICS.pixel_um == pytest.approx(0.65)
    assert OPTICS.lateral_nyquist_um == pytest.approx(0.65 / 1.2)
    assert OPTICS.axial_nyquist_um == pytest.approx(0.65 / (2 * (1 - math.sqrt(1 - 0.09))))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"na": 1.2, "n": 1.0}, "optics.na"),
        ({"na": 1.0, "n": 1.0}, "optics.na"),
        ({"na": 0.0}, "optics.na"),
        ({"wavelength_um": 0.0}, "optics.wavelength_um"),
        ({"wavelength_um": -0.5}, "optics.wavelength_um"),
        ({"camera_pixel_um": -6.5}, "optics.camera_pixel_um"),
        ({"magnification": 0}, "optics.magnification"),
        ({"n": float("nan")}, "optics.n"),
        ({"zernike": {0: 0.1}}, "Noll"),
        ({"zernike": {6: float("inf")}}, r"optics.zernike\[6\]"),
    ],
)
def test_bad_optics_raise_a_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Optics(**kwargs)


def test_from_config_rejects_unknown_fields_and_reads_string_noll_keys():
    """One policy for every section: the schema's defaults for missing keys, an error naming an
    unknown key, keys that another class of the section holds (motion.kernel_px) skipped."""
    with pytest.raises(ValueError, match=r"unknown config key\(s\) optics.numerical_aperture"):
        Optics.from_config({"numerical_aperture": 0.3})
    with pytest.raises(ValueError, match=r"motion.lateral_scale\b"):
        MotionScales.from_config({"lateral_scale": 3})
    assert MotionScales.from_config({"kernel_px": 40}) == MotionScales() == MotionScales(24, 10)  # config.yaml's and the schema's
    assert Optics.from_config({"zernike": {"6": 0.1}}).zernike == {6: 0.1}
    assert Optics.from_config(OPTICS.to_dict()) == OPTICS


def test_config_files_overlay_each_other_over_the_schema_defaults(tmp_path):
    """Later files win key by key inside a section (as snakemake's --configfile); what none sets
    is the schema's default."""
    (tmp_path / "a.yaml").write_text("testsets:\n  cylinder:\n    speed: 0.5\n    z0: 0.2\noptics:\n  na: 0.4\n")
    (tmp_path / "b.yaml").write_text("testsets:\n  cylinder:\n    z0: 0.7\n")
    config = load([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    cylinder = defaults("testsets")["cylinder"]
    assert config["testsets"]["cylinder"] == {**cylinder, "speed": 0.5, "z0": 0.7}
    assert config["optics"] == {**defaults("optics"), "na": 0.4}
    assert load([]) == defaults()


def test_bad_scales_and_kernel_size_raise():
    with pytest.raises(ValueError, match="motion.axial_scale_um"):
        MotionScales(axial_scale_um=0)
    with pytest.raises(ValueError, match="kernel_px"):
        MotionPSF(OPTICS, SCALES, size=31)


# --- Zernike -----------------------------------------------------------------------------------


def test_noll_indices():
    expected = {1: (0, 0), 2: (1, 1), 3: (1, -1), 4: (2, 0), 5: (2, -2), 6: (2, 2), 11: (4, 0), 22: (6, 0)}
    assert {j: noll_to_nm(j) for j in expected} == expected


def test_zernike_are_orthonormal_on_the_unit_disc():
    x = torch.linspace(-1, 1, 801, dtype=torch.float64)
    y, x = torch.meshgrid(x, x, indexing="ij")
    rho, theta = torch.hypot(x, y), torch.atan2(y, x)
    disc = rho <= 1
    z = torch.stack([zernike(j, rho, theta)[disc] for j in range(2, 12)])
    gram = z @ z.T / disc.sum()
    assert torch.allclose(gram, torch.eye(10, dtype=torch.float64), atol=1e-2)


# --- static 3D PSF -----------------------------------------------------------------------------


def test_in_focus_fwhm_matches_airy():
    psf = psf3d(OPTICS, 0.0, size=64, oversample=8, pixel_integrate=False)[0].double().numpy()
    width = half_max_width(psf[psf.shape[0] // 2], OPTICS.pixel_um / 8)
    airy = 0.5145 * OPTICS.wavelength_um / OPTICS.na
    assert width == pytest.approx(airy, rel=0.03)


def test_fwhm_scales_with_wavelength_over_na():
    optics = Optics(na=0.5, wavelength_um=0.5, magnification=40)
    psf = psf3d(optics, 0.0, size=64, oversample=4, pixel_integrate=False)[0].double().numpy()
    width = half_max_width(psf[psf.shape[0] // 2], optics.pixel_um / 4)
    assert width == pytest.approx(0.5145 * 0.5 / 0.5, rel=0.03)


def test_every_psf_sums_to_one_at_any_depth():
    z = torch.tensor([-40.0, -10.0, -2.0, 0.0, 0.5, 3.0, 10.0, 40.0])
    for integrate in (True, False):
        sums = psf3d(OPTICS, z, size=32, oversample=2, pixel_integrate=integrate).double().sum((1, 2))
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


def test_defocus_spreads_the_psf():
    peaks = psf3d(OPTICS, torch.tensor([0.0, 2.0, 5.0, 10.0]), size=32).amax((1, 2))
    assert torch.all(peaks[1:] < peaks[:-1])


def test_defocus_symmetry_without_aberrations():
    psf = psf3d(OPTICS, torch.tensor([3.7, -3.7]), size=32)
    assert rel_err(psf[0], psf[1]) < 1e-5


def test_in_focus_psf_is_rotationally_symmetric():
    psf = psf3d(OPTICS, 0.0, size=32, oversample=4, pixel_integrate=False)[0].double().numpy()
    centred = psf[1:, 1:]  # odd size, origin in the middle
    assert np.abs(np.rot90(centred) - centred).max() < 1e-6 * psf.max()
    assert np.abs(centred.T - centred).max() < 1e-6 * psf.max()
    c = psf.shape[0] // 2
    for radius in (2.0, 4.5, 7.0):  # fine samples: inside the core, around the first ring
        angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        ring = ndimage.map_coordinates(psf, [c + radius * np.sin(angles), c + radius * np.cos(angles)], order=3)
        assert ring.std() < 0.01 * psf.max()


def test_astigmatism_swaps_axes_with_depth_and_breaks_defocus_symmetry():
    optics = Optics(zernike={6: 0.15})
    up, down = psf3d(optics, torch.tensor([2.5, -2.5]), size=32)
    assert rel_err(up, down.T) < 1e-5  # h(x, y, z) == h(y, x, -z)
    assert rel_err(up, down) > 0.05  # h(z) != h(-z)


# --- motion PSF --------------------------------------------------------------------------------


def test_motion_kernels_sum_to_one(motion):
    kernels = motion(random_params(64, seed=1))
    assert kernels.shape == (64, 32, 32)
    assert torch.allclose(kernels.double().sum((1, 2)), torch.ones(64, dtype=torch.float64), atol=1e-5)


def test_no_motion_equals_static_psf(motion):
    z0 = torch.tensor([0.0, 0.137, 0.5, 1.0])
    params = torch.stack([torch.zeros(4), torch.zeros(4), torch.zeros(4), z0], dim=1)
    assert rel_err(motion(params), psf3d(OPTICS, z0 * SCALES.axial_scale_um, 32)) < 1e-3


def brute_force_lateral(z_um: float, shift_px: tuple[float, float], size: int, sub: int = 16) -> torch.Tensor:
    """Static PSF on a fine grid, convolved with a densely sampled segment, box-summed per pixel."""
    fine = psf3d(OPTICS, z_um, size, oversample=sub, pixel_integrate=False)[0].double()
    m = fine.shape[0]
    segment = torch.zeros(m, m, dtype=torch.float64)
    t = torch.linspace(-0.5, 0.5, 4001, dtype=torch.float64)
    x = m // 2 + t * shift_px[0] * sub
    y = m // 2 + t * shift_px[1] * sub
    x0, y0 = x.floor().long(), y.floor().long()
    fx, fy = x - x0, y - y0
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            segment.index_put_((y0 + dy, x0 + dx), wy * wx / t.numel(), accumulate=True)
    shifted = torch.fft.ifftshift(fine)
    image = torch.fft.ifft2(torch.fft.fft2(shifted) * torch.fft.fft2(torch.fft.ifftshift(segment))).real
    image = torch.fft.fftshift(image)
    trapezoid = torch.ones(sub + 1, dtype=torch.float64)
    trapezoid[[0, -1]] = 0.5
    box = torch.outer(trapezoid, trapezoid)  # fine samples hold probability per cell: sum them
    padded = torch.nn.functional.pad(image[None, None], (sub // 2,) * 4, mode="circular")
    pixel = torch.nn.functional.conv2d(padded, box[None, None])[0, 0]
    return pixel[::sub, ::sub]


@pytest.mark.parametrize("v1, v2, z0", [(0.8, 0.3, 0.0), (-0.35, 0.9, 0.4), (1.0, 0.0, 0.2)])
def test_lateral_motion_is_psf_convolved_with_a_segment(motion, v1, v2, z0):
    kernel = motion(torch.tensor([[v1, v2, 0.0, z0]]))[0].double()
    reference = brute_force_lateral(z0 * SCALES.axial_scale_um, (v1 * SCALES.lateral_scale_px, v2 * SCALES.lateral_scale_px), 32)
    assert rel_err(kernel, reference) < 5e-3


def test_axial_motion_is_the_average_of_static_psfs(motion):
    v3, z0 = 0.9, 0.1
    kernel = motion(torch.tensor([[0.0, 0.0, v3, z0]]))[0]
    t = (torch.arange(400, dtype=torch.float64) + 0.5) / 400
    depths = (z0 + v3 * t) * SCALES.axial_scale_um
    reference = psf3d(OPTICS, depths, 32).double().mean(0)
    assert rel_err(kernel.double(), reference) < 1e-3


def test_time_reversal(motion):
    params = random_params(32, seed=2)
    z0, v3, u = params[:, 3], params[:, 2], params[:, :2]
    reversed_ = torch.cat([-u, (-v3)[:, None], (z0 + v3)[:, None]], dim=1)
    assert rel_err(motion(params), motion(reversed_)) < 1e-5


def test_doubling_time_steps_changes_kernels_by_less_than_1e3(motion):
    params = random_params(200, seed=3)
    base, fine = motion(params), motion(params, step_factor=2)
    err = (base - fine).abs().amax((1, 2)) / fine.amax((1, 2))
    assert float(err.max()) < 1e-3
    assert int(motion.n_steps(params).max()) <= 32


def test_opposite_lateral_motions_give_the_same_kernel_without_axial_motion(motion):
    params = random_params(16, seed=4)
    params[:, 2] = 0
    flipped = params.clone()
    flipped[:, :2] *= -1
    assert rel_err(motion(params), motion(flipped)) < 1e-6
    assert torch.equal(canonical_sign(params), canonical_sign(flipped))


def test_canonical_sign():
    p = torch.tensor([[0.3, -0.2, 0.5, 0.1], [-0.4, 0.0, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0], [-0.1, 0.7, 1.0, 0.0]])
    c = canonical_sign(p)
    assert torch.equal(c[:, 2:], p[:, 2:])
    assert c.tolist()[0][:2] == pytest.approx([-0.3, 0.2])
    assert c.tolist()[1][:2] == pytest.approx([0.4, 0.0])
    assert torch.equal(c[2:], p[2:])


def test_kernel_is_independent_of_its_batch(motion):
    params = random_params(40, seed=5)
    params[::3, 2] = 0  # mixed step counts, one-step kernels included
    together = motion(params, chunk=7)
    alone = torch.cat([motion(p[None]) for p in params])
    assert rel_err(together, alone) < 1e-6


def test_depth_outside_the_table_is_an_error(motion):
    with pytest.raises(ValueError, match="table range"):
        motion(torch.tensor([[0.0, 0.0, 1.0, 1.5]]))
    with pytest.raises(ValueError, match="finite"):
        motion(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(motion):
    params = random_params(64, seed=6)
    gpu = MotionPSF(OPTICS, SCALES, size=32, device="cuda")
    assert rel_err(gpu(params.cuda()).cpu(), motion(params)) < 1e-4


def test_texture_bound_follows_the_physics():
    optics, scales = Optics(), MotionScales(24, 10)
    m = torch.tensor([[0.5, 0.2, 0.4, 0.3], [0.2, 0.5, 0.4, 0.3], [0.5, 0.2, 0.01, 0.0], [0.5, 0.2, 0.01, 0.5]])
    std = texture_cramer_rao(optics, scales, m)
    assert torch.isfinite(std).all() and (std > 0).all()
    assert torch.allclose(std[0, [1, 0, 2, 3]], std[1], rtol=0.02)  # a transposed motion swaps the bounds of v1 and v2
    mirrored = texture_cramer_rao(optics, scales, m[:1] * torch.tensor([1.0, 1.0, -1.0, -1.0]))
    assert torch.allclose(mirrored, std[:1], rtol=0.02)  # defocus is even in z: the path mirrored in the focal plane looks the same
    assert std[2, 2] > 5 * std[3, 2]  # so in focus a small axial motion leaves almost no trace
    ratio = texture_cramer_rao(optics, scales, m[:1], window_px=32)[0, :2] / std[0, :2]
    assert 1.5 < ratio.min() and ratio.max() < 3  # a quarter of the area (and of the frequencies): about twice the error
    assert (texture_cramer_rao(optics, scales, m[:1], photons=60000.0)[0] < std[0]).all()
    smooth = texture_cramer_rao(optics, scales, m[:1], slope=4.0)[0]  # less power at the high frequencies that defocus removes
    assert (smooth[2:] > 1.5 * std[0, 2:]).all() and (smooth > std[0]).all()
    with pytest.raises(ValueError, match="multiple of window_px"):
        texture_cramer_rao(optics, scales, m[:1], window_px=48)


def test_ideal_r2_of_known_errors():
    truth = torch.tensor([[0.0] * 4, [1.0] * 4])
    truth[:, 3] = 0.5  # z0 does not vary
    r2 = ideal_r2(truth, torch.tensor([[0.0, 0.25, 9.0, 0.1]] * 2))
    assert torch.allclose(r2[:3], torch.tensor([1.0, 0.75, 0.0])) and torch.isnan(r2[3])


def test_measurability_report_covers_both_test_sets_and_windows():
    out = report(Setup.from_config({}), defaults("testsets")["cylinder"], motions=6)
    assert list(out) == ["synthesis ranges, 64 px window", "cylinder, 64 px window", "synthesis ranges, 32 px window", "cylinder, 32 px window"]
    assert math.isnan(out["cylinder, 64 px window"]["z0"])  # z0 is constant along the cylinder
    for r2 in out.values():
        assert all(0 <= v <= 1 for k, v in r2.items() if not math.isnan(v))
    assert out["synthesis ranges, 64 px window"]["v3"] >= out["synthesis ranges, 32 px window"]["v3"]  # a larger window knows more
    smooth = report(Setup.from_config({}), defaults("testsets")["cylinder"], motions=6, slope=4.0)["synthesis ranges, 64 px window"]
    assert smooth["z0"] < out["synthesis ranges, 64 px window"]["z0"]  # a smoother texture says less about depth


@pytest.mark.parametrize("max_steps", [None, 40])
def test_kernels_equal_those_of_ec4be71(max_steps):
    """Kernels and offset derivatives against those the motion PSF of commit ec4be71 computed
    (tests/data/motion_psf_reference.npz), with its per-kernel step loop (None) and with a fixed
    number of masked steps: within 1e-6 of the peak."""
    ref = np.load(Path(__file__).parent / "data" / "motion_psf_reference.npz")
    psf = MotionPSF(OPTICS, SCALES, size=32, max_steps=max_steps)
    assert rel_err(psf(torch.from_numpy(ref["params"])), torch.from_numpy(ref["kernels"])) < 1e-6
    fit = MotionPSF(OPTICS, SCALES, 32, z_range_um=(-8.0, 8.0), lateral_step_px=2.0, max_steps=max_steps)
    grads = fit(torch.from_numpy(ref["fit_params"]), offset_px=torch.from_numpy(ref["fit_offsets"]), gradient=True)
    for i in range(3):
        assert rel_err(grads[:, i], torch.from_numpy(ref["fit_kernels"][:, i])) < 1e-6


def test_a_fixed_step_count_reads_nothing_back_and_refuses_longer_paths():
    psf = MotionPSF(OPTICS, SCALES, size=32, max_steps=20)
    params = random_params(8, seed=7)
    with torch.profiler.profile() as prof:
        psf(params, check=False)
    assert "aten::_local_scalar_dense" not in {e.key for e in prof.key_averages()}
    assert psf.steps_for(1.0, 1.0) == int(psf.n_steps(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))[0]) == 16
    with pytest.raises(ValueError, match="more than the 20"):
        psf(torch.tensor([[1.0, 1.0, 0.5, 0.0]]))  # hypot(8, 8) px / 0.5 px: 23 steps
