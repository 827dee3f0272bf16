"""How well the motion can be measured at all from a textured sample: the Cramér-Rao bound of
(v1, v2, v3, z0) from one window of a random texture blurred by the motion PSF (the bound for one
bead is blurflow.particles.cramer_rao_map).

Model: the sharp sample is a stationary Gaussian texture of power spectrum c (f^2 + f_min^2)^(-slope/2)
(natural images: slope about 2), whose amplitude c and slope are unknown (nuisance parameters),
imaged with ``mean`` x photons expected counts per pixel and a standard deviation of ``contrast`` x
photons, plus Poisson noise. Its periodogram is exponentially distributed around
mu(f) = photons^2 |H(f)|^2 S(f) + mean x photons (Whittle's likelihood), so the Fisher information is
sum_f grad log mu(f) grad log mu(f)^T over the window's independent frequencies. Only |H| enters: the
phases of a random texture carry no information, so the bound holds for any estimator that treats the
sample as such a texture; an estimator that knows more of the sample (beads) can do better.

``blurflow measurability [CONFIG ...] [--slope S] [--contrast C]`` (default config.yaml; later
files overlay earlier ones, as snakemake's --configfile) prints the ideal R^2 for the synthesis
ranges (the two-zone test's motions) and for the cylinder test's flow profile, for a texture of
that spectral slope (default 2, natural images; smooth microscopy images 4-5) and contrast
(default 0.2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from blurflow.optics import MotionPSF, MotionScales, Optics
from blurflow.synthesis import Setup
from blurflow.testsets import cylinder_params

LATERAL_STEP = 2e-3  # central-difference step of v1 and v2, normalised units
NATURAL_SLOPE = 2.0  # default spectral slope of the texture: natural images
CONTRAST = 0.2  # default texture standard deviation / photons


@torch.no_grad()
def texture_cramer_rao(
    optics: Optics, scales: MotionScales, params: torch.Tensor, window_px: int = 64, kernel_px: int = 64,
    photons: float = 6000.0, mean: float = 0.4, contrast: float = CONTRAST, slope: float = NATURAL_SLOPE,
) -> torch.Tensor:  # fmt: skip
    """Cramér-Rao standard deviations (B, 4) of (v1, v2, v3, z0), normalised units, for the motions
    ``params`` (B, 4), from a ``window_px`` window of a texture (module docstring) whose amplitude
    and spectral slope are unknown. ``kernel_px``: the motion PSF's kernel (a multiple of
    ``window_px`` when larger, so that its transfer function is sampled at the window's frequencies)."""
    if kernel_px > window_px and kernel_px % window_px:
        raise ValueError(f"kernel_px ({kernel_px}) must be a multiple of window_px ({window_px}) when larger")
    params = torch.as_tensor(params, dtype=torch.float32).reshape(-1, 4)
    depth = (params[:, 3].abs() + params[:, 2].abs()).max().item()
    reach = depth * scales.axial_scale_um + 1.0
    psf = MotionPSF(optics, scales, kernel_px, z_range_um=(-reach, reach))  # symmetric: a table node at focus
    axial = 2 * psf.dz / scales.axial_scale_um  # two pitches of the PSF's depth table: its linear interpolation is smooth at that scale
    steps = torch.tensor([LATERAL_STEP, LATERAL_STEP, axial, axial])
    step = torch.diag(steps)
    shifted = torch.cat([params[:, None], params[:, None] + step, params[:, None] - step], 1)  # (B, 9, 4)
    size = max(window_px, kernel_px)
    otf = torch.fft.rfft2(psf(shifted.reshape(-1, 4)).double(), s=(size, size)).abs() ** 2
    stride = size // window_px  # the window's frequencies k / window_px on the kernel's grid
    mtf2 = otf[:, ::stride, ::stride].reshape(len(params), 9, window_px, window_px // 2 + 1)
    fy = torch.fft.fftfreq(window_px, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(window_px, dtype=torch.float64)[None, :]
    g = fy**2 + fx**2 + window_px**-2.0
    spectrum = g ** (-slope / 2)
    weight = torch.ones_like(g)
    weight[:, 0] = weight[:, -1] = 0.5  # those columns hold each frequency and its mirror image
    weight[0, 0] = 0.0  # the mean carries no information on the blur
    spectrum = spectrum / (spectrum * weight).sum() * weight.sum() * contrast**2  # mean spectral density contrast^2
    signal = photons**2 * mtf2 * spectrum
    mu = signal + mean * photons
    log_mu = mu.log()
    kinematic = (log_mu[:, 1:5] - log_mu[:, 5:9]) / (2 * steps.double()[None, :, None, None])
    share = signal[:, 0] / mu[:, 0]  # d log mu / d log c; times -log(g) / 2: d log mu / d slope
    jac = torch.cat([kinematic, share[:, None], (share * -0.5 * g.log())[:, None]], 1).flatten(2)  # (B, 6, F)
    fisher = torch.einsum("bpf,bqf,f->bpq", jac, jac, weight.flatten())
    cov = torch.linalg.pinv(fisher)
    return torch.diagonal(cov, dim1=1, dim2=2)[:, :4].clamp(min=0).sqrt().float()


def ideal_r2(truth: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """R^2 (4,) that estimates with errors of standard deviation ``std`` (B, 4) on the values
    ``truth`` (B, 4) reach, each error capped at the values' own spread (where the data say nothing,
    an estimator reports the mean): 1 - mean(min(std^2, var)) / var. NaN where the values do not vary."""
    var = truth.var(0, unbiased=False).double()
    err = torch.minimum(std.double() ** 2, var).mean(0)
    return torch.where(var > 1e-12, 1 - err / var, torch.full_like(var, math.nan)).float()


def report(
    setup: Setup, cylinder: Mapping, motions: int = 64, seed: int = 0, slope: float = NATURAL_SLOPE, contrast: float = CONTRAST,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Ideal R^2 per scored component (|v1|, |v2|, v3, z0) for 64 px and 32 px windows: for
    ``motions`` motions drawn in the synthesis ranges (two-zone-like) and for the cylinder profile
    (the ``testsets.cylinder`` section: speed, z0, direction_deg), from a texture of spectral
    ``slope`` and ``contrast`` (:func:`texture_cramer_rao`)."""
    syn = setup.synthesis
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([syn.v_lateral[0], syn.v_lateral[0], max(syn.v3[0], 0.01), syn.z0[0]])
    hi = torch.tensor([syn.v_lateral[1], syn.v_lateral[1], syn.v3[1], syn.z0[1]])
    drawn = lo + (hi - lo) * torch.rand(motions, 4, generator=g)
    profile = torch.as_tensor(cylinder_params(24, cylinder["speed"], cylinder["z0"], cylinder["direction_deg"]))
    profile[:, 2] = profile[:, 2].clamp(min=0.01)
    out = {}
    for window in (64, 32):
        kernel = -(-setup.kernel_px // window) * window  # the smallest multiple of the window that holds the PSF
        for name, params in (("synthesis ranges", drawn), ("cylinder", profile)):
            std = texture_cramer_rao(setup.optics, setup.scales, params, window, kernel, slope=slope, contrast=contrast)
            r2 = ideal_r2(params.abs(), std)
            out[f"{name}, {window} px window"] = dict(zip(("|v1|", "|v2|", "v3", "z0"), r2.tolist()))
    return out
