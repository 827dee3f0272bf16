"""Particle mode, calibration: a PSF model (blurflow.psfmodel) measured from a z-stack of static
beads, as single-molecule and defocus-tracking users calibrate their microscopes.

Steps (:func:`calibrate`): camera counts -> the beads of the stack's maximum projection that stand
alone in their window and inside the image, unsaturated ones kept (saturated ones counted) ->
each bead's window per plane less its background (the median of the window's rim) and normalised to
its photons (the share of its light per pixel) -> each bead's focus (the plane
of its sharpest image, to a fraction of a plane) and its planes shifted in depth onto the beads'
median focus (cubic spline) -> the table, by least squares per spatial frequency over the beads at
their sub-pixel positions (each bead samples the PSF at its own offset, so beads at several offsets
give the PSF on a grid finer than the camera's: ``oversample``), alternating with each bead's
position refined against the table (Gauss-Newton) -> smoothed in depth (a cubic smoothing spline
whose cut-off is the optics' axial band limit), z = 0 at the plane of the sharpest mean image, the
planes far from focus where the mean bead is lost in its noise (SNR_MIN) left out.
Units: um in the sample, counts in photo-electrons.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from blurflow.optics import Optics, PSFSource
from blurflow.particles.fit import SIGN_GAP, BeadFitter, centroid
from blurflow.psfmodel import PSFModel, stack_hash

MIN_BEADS = 3  # beads needed for a model
SNR_MIN = 20.0  # the mean bead's peak over its standard error below which planes far from focus are left out of the model
BEADS_PER_UNKNOWN = 2  # beads for each of the oversample^2 unknowns per camera frequency (their sub-pixel offsets tell them apart)
FAINT = 0.1  # share of the median bead's photons below which a peak is left out ('faint')
CROWD_PROMINENCE = 0.05  # of the median bead's peak height: a maximum as prominent is another bead (find_beads)
RIDGE = 1e-4  # Tikhonov weight per unit of bead weight in the per-frequency least squares


class CalibrationError(ValueError):
    """A stack that gives no PSF model (one line)."""


def auto_window(optics: Optics, depth_um: float) -> int:
    """Even window (px, 16-64) that holds a bead's defocus blur ``depth_um`` from focus (geometric
    radius depth tan(asin(NA / n))) with two Airy FWHM of margin each side."""
    radius = depth_um * math.tan(math.asin(optics.na / optics.n)) / optics.pixel_um
    fwhm = 0.5145 * optics.wavelength_um / optics.na / optics.pixel_um
    size = math.ceil(2 * radius + 4 * fwhm)
    return int(min(64, max(16, size + size % 2)))


def find_beads(counts: np.ndarray, window: int, saturated: np.ndarray, threshold: float = 8.0) -> tuple[np.ndarray, dict[str, int]]:
    """(row, col) centres (N, 2) int of the beads of a stack of counts (Z, H, W) that stand alone:
    the peaks of the smoothed maximum projection (at least ``window`` / 2 px apart) that rise above
    ``threshold`` noise std (median absolute deviation) over at least 4 px, whose ``window`` px
    window lies inside the image and holds no other maximum within ``window`` px (a maximum: one
    that rises CROWD_PROMINENCE of the median peak's height above the light around it, however close:
    a neighbour 12 px from a bead is no peak ``window`` / 2 px apart); and counts of those left out:
    {'border', 'crowded', 'saturated'} (``saturated`` (Z, H, W) bool: a bead with a saturated pixel
    in its window)."""
    from scipy import ndimage
    from skimage import feature, measure, morphology

    top = ndimage.gaussian_filter(counts.max(0), 1.0)
    floor = np.median(top)
    noise = 1.4826 * np.median(np.abs(top - floor)) + 1e-9
    labels = measure.label(top > floor + threshold * noise)
    labels[np.isin(labels, [r.label for r in measure.regionprops(labels) if r.area < 4])] = 0
    peaks = feature.peak_local_max(top, min_distance=max(1, window // 2), labels=labels, exclude_border=False)
    height = float(np.median(top[tuple(peaks.T)])) - floor if len(peaks) else 0.0
    maxima = morphology.h_maxima(top, max(CROWD_PROMINENCE * height, threshold * noise)) & (labels > 0)
    marks = measure.label(maxima)
    every = np.array([r.centroid for r in measure.regionprops(marks)]).reshape(-1, 2)
    half = window // 2
    h, w = top.shape
    hit = saturated.any(0)
    left = {"border": 0, "crowded": 0, "saturated": 0}
    keep = []
    for cy, cx in peaks:
        near = (np.abs(every - (cy, cx)).max(1) < window) & (np.hypot(*(every - (cy, cx)).T) > 2)  # other maxima (not the peak's own)
        if cy - half < 0 or cx - half < 0 or cy + half > h or cx + half > w:
            left["border"] += 1
        elif near.any() or (np.abs(peaks - (cy, cx)).max(1) < window).sum() > 1:
            left["crowded"] += 1
        elif hit[cy - half : cy + half, cx - half : cx + half].any():
            left["saturated"] += 1
        else:
            keep.append((cy, cx))
    return np.array(keep, np.int64).reshape(-1, 2), left


def _enough(centres: np.ndarray, left: dict[str, int]) -> None:
    """CalibrationError naming what was found and left out, unless there are MIN_BEADS beads."""
    if len(centres) < MIN_BEADS:
        found = "no isolated bead" if not len(centres) else f"{len(centres)} isolated bead{'s' * (len(centres) > 1)}"
        why = ", ".join(f"{n} {k}" for k, n in left.items() if n) or "none"
        raise CalibrationError(f"{found} in the stack (left out: {why}); a PSF model needs >= {MIN_BEADS}")


def _planes(counts: np.ndarray, centres: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(each bead's windows (B, Z, w, w) less the background, over the bead's photons: the share
    of its light in each pixel; each bead's photons (B,)). The background of a plane is the mean of
    its pixels outside every bead's window below their 95th percentile (a window's rim still holds
    PSF tails; other beads' light is clipped; a median would be biased on integer counts). A bead's
    photons are the largest sum of its window over three consecutive planes' mean (near focus,
    where its light stays in the window; bleaching over the stack is not corrected)."""
    half = window // 2
    cut = np.stack([counts[:, y - half : y + half, x - half : x + half] for y, x in centres]).astype(np.float64)
    outside = np.ones(counts.shape[1:], bool)
    for y, x in centres:
        outside[y - half : y + half, x - half : x + half] = False
    pixels = counts[:, outside] if outside.sum() > 100 else counts.reshape(len(counts), -1)
    clip = np.percentile(pixels, 95, axis=1, keepdims=True)
    background = np.where(pixels <= clip, pixels, 0).sum(1) / np.maximum((pixels <= clip).sum(1), 1)
    cut -= background[None, :, None, None]
    sums = cut.sum((-2, -1))
    photons = np.max(np.stack([sums[:, :-2], sums[:, 1:-1], sums[:, 2:]]).mean(0), 1)
    return cut / np.maximum(photons, 1e-9)[:, None, None, None], photons


def sharpest_plane(planes: np.ndarray) -> np.ndarray:
    """The plane of sharpest image of each stack (...,) of ``planes`` (..., Z, w, w), fractional:
    the peak of the sum of squared intensities (a parabola through the highest plane and its
    neighbours)."""
    sharp = (planes**2).sum((-2, -1))
    k = sharp.argmax(-1).clip(1, sharp.shape[-1] - 2)[..., None]
    a, b, c = (np.take_along_axis(sharp, k + d, -1)[..., 0] for d in (-1, 0, 1))
    curv = a - 2 * b + c
    return k[..., 0] + np.where(curv < 0, 0.5 * (a - c) / np.where(curv < 0, curv, -1), 0.0).clip(-1, 1)


def _shift_depth(planes: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each bead's planes (B, Z, w, w) read ``shift`` (B,) planes further (cubic spline in depth),
    and (B, Z) bool: where that stays inside its stack."""
    from scipy.interpolate import make_interp_spline

    z = np.arange(planes.shape[1], dtype=np.float64)
    out = np.empty_like(planes)
    for b, d in enumerate(shift):  # one spline per bead: beads are few
        out[b] = make_interp_spline(z, planes[b], k=3, axis=0)(np.clip(z + d, 0, z[-1]))
    return out, (z + shift[:, None] >= -1e-6) & (z + shift[:, None] <= z[-1] + 1e-6)


def _aligned(planes: np.ndarray, depth: np.ndarray, scale: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The beads' planes (B, Z, w, w) read ``depth`` (B,) planes further (:func:`_shift_depth`) as
    spectra (B, Z, w*w) with their origin at w // 2, their weights (B, Z): ``scale`` (B,) where a
    bead's shifted plane lies inside its stack, else 0, and that (B, Z) bool."""
    shifted, inside = _shift_depth(planes, depth)
    spectra = torch.fft.fft2(torch.fft.ifftshift(torch.from_numpy(shifted), dim=(-2, -1))).flatten(2)
    return spectra, torch.from_numpy(inside * scale[:, None]), torch.from_numpy(inside)


class _Grid:
    """The coarse (camera, w x w) and fine (w * os) frequency grids of the least squares: for each
    coarse frequency, the os^2 fine frequencies that fold onto it, in cycles per camera px."""

    def __init__(self, window: int, oversample: int):
        self.w, self.os = window, oversample
        m = window * oversample
        f = torch.fft.fftfreq(m, d=1.0 / oversample, dtype=torch.float64)  # cycles per camera px
        k = torch.arange(window)
        alias = (k[:, None] + window * torch.arange(oversample)[None]) % m  # (w, os): fine indices folding onto k
        shape = (window, window, oversample, oversample)  # (coarse row, coarse col, alias row, alias col)
        rows, cols = alias[:, None, :, None].expand(shape), alias[None, :, None, :].expand(shape)
        self.index = (rows * m + cols).reshape(window**2, oversample**2)  # into the flattened fine grid
        self.fy, self.fx = f[rows].reshape(window**2, -1), f[cols].reshape(window**2, -1)

    def phases(self, shift: torch.Tensor) -> torch.Tensor:
        """(B, w*w, os^2) complex: exp(-2 pi i f . s) of each fine frequency for each bead's (x, y) ``shift`` (B, 2) px."""
        return torch.polar(torch.ones(1, dtype=torch.float64), -2 * math.pi * (shift[:, None, None, 0] * self.fx + shift[:, None, None, 1] * self.fy))


def _solve(spectra: torch.Tensor, weight: torch.Tensor, phase: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """The fine-grid OTF (Z, m*m) that best explains the beads' coarse spectra (B, Z, w*w) at their
    phases (B, w*w, os^2), weighted (B, Z), by ridge least squares per coarse frequency."""
    e = phase[:, None]  # (B, 1, K, A)
    wt = weight[:, :, None, None].to(torch.complex128)
    normal = torch.einsum("bzka,bzkc->zkac", (wt * e).conj(), e)  # E^H W E, (Z, K, A, A)
    rhs = torch.einsum("bzka,bzk->zka", (wt * e).conj(), spectra)
    ridge = RIDGE * weight.sum(0)[:, None, None, None] * torch.eye(grid.os**2, dtype=torch.float64)
    solved = torch.linalg.solve(normal + ridge, rhs[..., None])[..., 0]  # (Z, K, A)
    fine = torch.zeros(spectra.shape[1], (grid.w * grid.os) ** 2, dtype=torch.complex128)
    fine[:, grid.index.reshape(-1)] = solved.reshape(spectra.shape[1], -1)
    return fine


def _render(fine: torch.Tensor, phase: torch.Tensor, grid: _Grid, derivative: bool = False) -> torch.Tensor:
    """The beads' coarse spectra (B, Z, w*w) of the fine OTF (Z, m*m) at their phases; with
    ``derivative`` (B, 2, Z, w*w): their derivatives by the x and y shifts."""
    taken = fine[:, grid.index]  # (Z, K, A)
    if not derivative:
        return torch.einsum("zka,bka->bzk", taken, phase)
    return torch.stack([torch.einsum("zka,bka->bzk", taken, phase * (-2j * math.pi * f)) for f in (grid.fx, grid.fy)], 1)


def calibrate(
    stack: np.ndarray, z_step_um: float, optics: Optics, offset: float = 0.0, gain: float = 1.0, window: int | None = None,
    oversample: int | None = None, saturation: float | None = None, rounds: int = 3, use: np.ndarray | None = None, snr_min: float = SNR_MIN,
    check_sign: bool = True,
) -> PSFModel:  # fmt: skip
    """PSF model from a z-stack of static beads ``stack`` (Z, H, W) in camera units (planes every
    ``z_step_um`` um; repeated planes averaged by the caller), ``offset`` and ``gain`` as in
    blurflow particles. ``window`` px (default :func:`auto_window` for half the stack's depth),
    ``oversample`` the table's samples per camera px (default the optics' smallest unaliased one,
    blurflow.optics.Optics.min_oversample, as far as the beads allow: BEADS_PER_UNKNOWN beads for
    each of its oversample^2 unknowns per camera frequency), ``saturation`` the camera's top value (default the
    largest value of an integer dtype): beads with a pixel at or above it are left out. ``use``
    (N,) bool: which of the beads found (:func:`find_beads`, in its order) to average (default
    all; to keep some for testing the model). ``snr_min``: the planes kept about focus are those
    where the mean bead's peak stands ``snr_min`` standard errors above its noise. With
    ``check_sign``, a model asymmetric in depth gets its ``sign_gap`` from its own beads
    (:func:`_sign_check`). Raises CalibrationError (one line) where the stack gives no model."""
    raw = np.asarray(stack)
    if raw.ndim != 3 or raw.shape[0] < 4:
        raise CalibrationError(f"a z-stack needs >= 4 planes of 2D images, got shape {raw.shape}")
    if not (np.isfinite(z_step_um) and z_step_um > 0):
        raise CalibrationError(f"the z step must be a positive number of um, got {z_step_um:g}")
    if saturation is None and np.issubdtype(raw.dtype, np.integer):
        saturation = float(np.iinfo(raw.dtype).max)
    saturated = raw >= saturation if saturation is not None else np.zeros(raw.shape, bool)
    counts = (raw.astype(np.float64) - offset) * gain
    if not np.isfinite(counts).all():
        raise CalibrationError("the stack holds NaN or Inf pixels")
    window = window or auto_window(optics, (raw.shape[0] - 1) * z_step_um / 2)
    options = {"offset": offset, "gain": gain, "window": window, "oversample": oversample, "saturation": saturation, "rounds": rounds, "snr_min": snr_min}
    centres, left = find_beads(counts, window, saturated)
    chosen = np.arange(len(centres)) if use is None else np.flatnonzero(use)  # the beads averaged, in find_beads' order
    found, centres = len(centres), centres[chosen]
    _enough(centres, left)
    planes, photons = _planes(counts, centres, window)
    faint = photons < FAINT * np.median(photons)  # noise or debris, not a bead
    if faint.any():
        left["faint"] = int(faint.sum())
        centres, planes, photons, chosen = centres[~faint], planes[~faint], photons[~faint], chosen[~faint]
        _enough(centres, left)
    # each camera frequency takes oversample^2 unknowns from the beads' offsets: at least BEADS_PER_UNKNOWN beads for each
    oversample = oversample or max(1, min(optics.min_oversample, math.isqrt(len(centres) // BEADS_PER_UNKNOWN)))
    if oversample**2 * BEADS_PER_UNKNOWN > len(centres) and oversample > 1:
        need = oversample**2 * BEADS_PER_UNKNOWN
        raise CalibrationError(f"{oversample} samples per px need >= {need} beads, the stack has {len(centres)} (use a lower --oversample)")
    focus = sharpest_plane(planes)
    depth = focus - np.median(focus)  # each bead's planes read this many planes further: the beads' foci aligned
    grid = _Grid(window, oversample)
    scale = photons / photons.mean()
    shift = centroid(torch.from_numpy(planes.sum(1).clip(min=0)))  # each bead's (x, y) from its window's centre, px
    for _ in range(rounds):  # the table at the beads' positions, then their positions (x, y and depth) against the table
        spectra, weight, seen = _aligned(planes, depth, scale)
        phase = grid.phases(shift)
        fine = _solve(spectra, weight, phase, grid)
        model, slope = _render(fine, phase, grid), _render(fine, phase, grid, derivative=True)
        residual = (spectra - model) * seen[:, :, None]
        jac = torch.einsum("bpzk,bqzk->bpq", slope.conj(), slope * seen[:, None, :, None]).real
        step = torch.linalg.solve(jac + 1e-12 * torch.eye(2), torch.einsum("bpzk,bzk->bp", slope.conj(), residual).real[..., None])[..., 0]
        shift = shift + step.clamp(-1, 1)
        shift -= (shift * weight.sum(1, keepdim=True)).sum(0) / weight.sum()  # the table's origin: the beads' weighted mean position
        along = torch.zeros_like(model)  # d model / d plane (central differences), where both neighbours exist
        along[:, 1:-1] = (model[:, 2:] - model[:, :-2]) / 2
        interior = seen.clone()
        interior[:, [0, -1]] = False
        num = (along.conj() * residual * interior[:, :, None]).real.sum((1, 2))
        den = (along.abs() ** 2 * interior[:, :, None]).sum((1, 2)).clamp(min=1e-30)
        depth = depth - (num / den).clamp(-1, 1).numpy()  # the aligned planes read a further eps where residual + eps * slope = 0
        depth -= np.average(depth, weights=scale)
    spectra, weight, seen = _aligned(planes, depth, scale)
    inside = seen.numpy()
    m = window * oversample
    for _ in range(2):  # the table's origin: the centroid of its sharpest plane
        phase = grid.phases(shift)
        fine = _solve(spectra, weight, phase, grid)
        table = torch.fft.fftshift(torch.fft.ifft2(fine.reshape(-1, m, m)).real, dim=(-2, -1)).numpy()
        sharpest = table[(table**2).sum((1, 2)).argmax()].clip(min=0)
        shift += centroid(torch.from_numpy(sharpest[None]), pitch=1 / oversample)[0]  # camera px
    misfit = torch.fft.ifft2((spectra - _render(fine, phase, grid)).reshape(*spectra.shape[:2], window, window)).real.numpy()
    rms = np.sqrt((misfit**2 * inside[..., None, None]).sum(0) / np.maximum(inside.sum(0), 1)[:, None, None])
    residual = np.fft.fftshift(rms, axes=(-2, -1)).repeat(oversample, 1).repeat(oversample, 2) / oversample**2  # per fine sample
    table = _smooth_depth(table, z_step_um, optics)
    k = float(sharpest_plane(table))
    z = (np.arange(len(table)) - k) * z_step_um
    snr = table.max((1, 2)) / (np.median(residual, (1, 2)) / math.sqrt(len(centres)) + 1e-12)  # the mean bead's peak over its standard error
    lo, hi = _run(snr >= snr_min, round(k))
    table, residual, z = table[lo:hi], residual[lo:hi], z[lo:hi]
    model = PSFModel(
        table, z, optics, oversample, beads=len(centres), source="bead z-stack (blurflow calibrate)", stack_sha256=stack_hash(raw), residual=residual,
        extra={
            "left_out": left, "window_px": window, "offset": offset, "gain": gain, "saturation": saturation,
            "bead_rows": centres[:, 0].tolist(), "bead_cols": centres[:, 1].tolist(), "bead_photons": photons.tolist(),
            "bead_focus_um": ((depth + np.median(focus) - k) * z_step_um).tolist(), "bead_shift_px": shift.numpy().tolist(),
            "relative_residual": float(np.linalg.norm(residual) / np.linalg.norm(table)), "stack_planes_kept": [lo, hi],
        },
    )  # fmt: skip
    if not check_sign or model.symmetric:
        return model
    halves = [np.isin(np.arange(found), chosen[part::2]) for part in (0, 1)]
    gap, check = _sign_check(raw, counts, z_step_um, optics, options, halves, centres, depth + np.median(focus))
    return replace(model, sign_gap=gap, extra={**model.extra, "sign_check": check})


SIGN_RIGHT = 0.95  # share of the calibration beads' signs that must come out right above a model's sign_gap
SIGN_FITS = 10  # fits above the sign_gap, at least, for the share to count


def _sign_check(
    raw: np.ndarray, counts: np.ndarray, z_step_um: float, optics: Optics, options: dict, halves: list[np.ndarray], centres: np.ndarray,
    focus: np.ndarray,
) -> tuple[float | None, dict]:  # fmt: skip
    """The gap (log-likelihood per unit of dispersion) by which a fit's mirror image in depth must
    lose for its sign to be right: each half of the beads (``halves``: (N,) bool over find_beads'
    beads; ``centres`` (B, 2) the beads averaged, alternately in either half, at their ``focus``
    planes (B,)) is calibrated on its own, the other half's planes fitted as static beads with it,
    and the gap taken where the fits whose mirror loses by more hold SIGN_RIGHT right signs (at
    least SIGN_FITS of them; SIGN_GAP where all do; inf where no gap does: each bead's own texture can outweigh the PSF's
    asymmetry); planes within two steps or the axial Nyquist pitch of a bead's focus are not
    scored. Returns (the gap, or None where a half holds fewer than MIN_BEADS beads; a record)."""
    from blurflow.optics import MotionScales

    if min(h.sum() for h in halves) < MIN_BEADS:
        return None, {"checked": False, "why": f"{len(centres)} beads: each half needs >= {MIN_BEADS}"}
    window, half = options["window"], options["window"] // 2
    planes = np.arange(len(counts)) * z_step_um
    clear = max(2 * z_step_um, optics.axial_nyquist_um)
    gaps, right, signed = [], [], []
    for part, use in enumerate(halves):
        model = calibrate(raw, z_step_um, optics, use=use, check_sign=False, **options)
        test = centres[1 - part :: 2]
        truth = planes[None, :] - focus[1 - part :: 2, None] * z_step_um  # (B, Z) each bead's depth at each plane
        lo, hi = model.z_range_um
        scored = (np.abs(truth) > clear) & (truth > lo) & (truth < hi)
        signed.append(not model.symmetric)
        if model.symmetric:  # this half sees no asymmetry: its fits measure no sign
            continue
        fitter = BeadFitter(optics, MotionScales(1.0, 1.0), window, psf=model, static=True)
        windows = np.stack([counts[:, y - half : y + half, x - half : x + half] for y, x in test]).astype(np.float32)
        fit = fitter.fit(torch.from_numpy(windows.reshape(-1, window, window)))
        gaps.append(fit.sign_gap.reshape(truth.shape)[scored])
        right.append((np.sign(fit.params[:, 5].reshape(truth.shape)) == np.sign(truth))[scored])
    if not all(signed):
        return math.inf, {"checked": True, "halves_signed": signed}
    gap, right = np.concatenate(gaps), np.concatenate(right)
    order = np.argsort(-gap)
    share = np.cumsum(right[order]) / np.arange(1, len(gap) + 1)  # right signs among the fits whose gap is at least each one's
    good = np.flatnonzero((share >= SIGN_RIGHT) & (np.arange(1, len(gap) + 1) >= SIGN_FITS) & np.isfinite(gap[order]))
    if not len(good):
        threshold = math.inf
    else:  # above the first gap left out (none: the fits' signs were right down to the least gap)
        threshold = max(SIGN_GAP, float(gap[order][good[-1] + 1]) if good[-1] + 1 < len(gap) else SIGN_GAP)
    kept = gap > threshold
    record = {
        "checked": True, "halves_signed": signed, "planes": len(gap), "right": round(float(right.mean()), 4) if len(gap) else None,
        "resolved": round(float(kept.mean()), 4) if len(gap) else None, "right_resolved": round(float(right[kept].mean()), 4) if kept.any() else None,
    }  # fmt: skip
    return threshold, record


def _run(good: np.ndarray, at: int, least: int = 5) -> tuple[int, int]:
    """(lo, hi): the run of ``good`` planes about plane ``at``, widened to ``least`` planes."""
    lo = hi = min(max(at, 0), len(good) - 1)
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(good) - 1 and good[hi + 1]:
        hi += 1
    while hi - lo + 1 < min(least, len(good)):
        lo, hi = (lo - 1, hi) if lo > 0 else (lo, hi + 1)
    return lo, hi + 1


def _smooth_depth(table: np.ndarray, z_step_um: float, optics: Optics) -> np.ndarray:
    """The table smoothed along depth by a cubic smoothing spline whose half-power cut-off is twice
    the optics' axial band limit (1 / (2 axial Nyquist pitch)): noise between planes goes, the PSF
    stays (at the band limit itself the model lost 2 % more against the true PSF, in a simulation)."""
    from scipy.interpolate import make_smoothing_spline

    if len(table) < 5:
        return table
    z = np.arange(len(table)) * z_step_um
    lam = (optics.axial_nyquist_um / (2 * math.pi)) ** 4 / z_step_um
    return make_smoothing_spline(z, table.reshape(len(table), -1), lam=lam)(z).reshape(table.shape)


def bead_stack(
    optics: Optics | PSFSource, z_um: np.ndarray, shape: tuple[int, int] = (256, 256), beads: int = 16, photons: float = 2e5, background: float = 10.0,
    focus_spread_um: float = 0.0, seed: int = 0, spacing_px: int = 40, size_px: int | None = None,
) -> tuple[np.ndarray, dict]:  # fmt: skip
    """A simulated z-stack (Z, H, W) float32 of Poisson counts: ``beads`` point beads of ``photons``
    each at random sub-pixel positions on a jittered grid ``spacing_px`` apart, imaged at the
    planes ``z_um`` (Z,) by the PSF of ``optics`` (its aberrations included; or any PSF source,
    such as blurflow.optics.SpherePSF for beads that are not points) plus ``background``
    per pixel; each bead's focus offset drawn in +-``focus_spread_um`` (a tilted or curved
    sample). Each bead's light is computed over ``size_px`` (default twice the spacing: its tails
    reach the neighbours). Returns the stack and the truth {'rows', 'cols', 'focus_um'}."""
    from blurflow.optics import MotionPSF, MotionScales

    rng = np.random.default_rng(seed)
    h, w = shape
    size = size_px or 2 * (spacing_px + spacing_px % 2)  # (the kernel's grid is periodic: its tails must not wrap)
    size += size % 2
    cells = [(r, c) for r in range(spacing_px, h - spacing_px + 1, spacing_px) for c in range(spacing_px, w - spacing_px + 1, spacing_px)]
    if len(cells) < beads:
        raise ValueError(f"{beads} beads do not fit {spacing_px} px apart in {h} x {w} px")
    chosen = rng.choice(len(cells), beads, replace=False)
    centre = np.array([cells[i] for i in chosen], np.float64) + rng.uniform(-2, 2, (beads, 2))
    focus = rng.uniform(-focus_spread_um, focus_spread_um, beads)
    whole, frac = np.round(centre).astype(int), centre - np.round(centre)
    scales = MotionScales(1.0, 1.0)
    z = np.asarray(z_um, np.float64)
    depth = z[:, None] - focus[None]  # (Z, B)
    reach = float(np.abs(depth).max()) + 1
    psf = MotionPSF(optics, scales, size, z_range_um=(-reach, reach))
    params = torch.zeros(depth.size, 4, dtype=torch.float32)
    params[:, 3] = torch.from_numpy(depth.reshape(-1))
    offset = torch.from_numpy(np.tile(frac[:, ::-1], (len(z), 1)).astype(np.float32))  # (x, y) px
    kernels = psf(params, offset_px=offset, chunk=64).numpy().reshape(len(z), beads, size, size)
    half = size // 2
    image = np.full((len(z), h + size, w + size), background, np.float64)  # margins of half a kernel, cut below
    for b, (y, x) in enumerate(whole):
        image[:, y : y + size, x : x + size] += photons * np.clip(kernels[:, b], 0, None)
    return rng.poisson(image[:, half : half + h, half : half + w]).astype(np.float32), {"rows": centre[:, 0], "cols": centre[:, 1], "focus_um": focus}
