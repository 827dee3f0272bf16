"""Particle mode, the fit: the 3D motion of an isolated tracer particle (a bead) from one exposure, by a
maximum-likelihood fit of the motion PSF (blurflow.optics.MotionPSF) to its streak.

For a bead smaller than the resolution the blurred image *is* the motion PSF: expected counts
``mu = b + A * K(x - x0, y - y0; v1, v2, v3, z0)`` in a window of ``window`` px, with ``A`` the
bead's photons, ``b`` the background per pixel and ``(x0, y0)`` the midpoint of its path (px
from the window centre, index ``window // 2``). Counts are Poisson. Units: v1, v2 in L px per
exposure, v3 and z0 in A um (blurflow.optics.MotionScales), as everywhere in blurflow.

Two paths give the same image: the depth sign (a scalar pupil without aberrations images +z and -z
alike) and time (running the path backwards). So (v1, v2, v3, z0) and (-v1, -v2, v3, -z0 - v3) are
one image; the fit reports the one whose mean depth z0 + v3 / 2 is >= 0, with v3 >= 0: the particle
moves away from focus, and its sharper end is the start, so (v1, v2) is a direction, not only an
orientation, when the ends differ in sharpness (``direction_resolved``).

Method: a coarse search over a bank of kernels (weighted least squares against the centred window),
two starts from it (the best match and the best match of the other v3 class), each refined by
Fisher scoring with Levenberg-Marquardt damping on the Poisson likelihood (analytic Jacobian,
blurflow.optics.MotionPSF with ``gradient``; all particles and starts in one batch), the start of
highest likelihood kept; a fit that ends without axial motion is tried again from axial motion in
both directions. Uncertainty: the Cramér-Rao standard deviations (inverse Poisson Fisher
information at the estimate), the deviance as goodness of fit, and flags for estimates at a bound
or not converged. Particles whose light touches are fitted together (blurflow.particles.frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from blurflow.optics import MotionPSF, MotionScales, Optics
from blurflow.psfmodel import PSFModel

PARAMS = ("x_px", "y_px", "v1", "v2", "v3", "z0", "photons", "background")
MOTION = slice(2, 6)
CHUNK_SAMPLES = 64 * 2525  # kernels x OTF samples computed at once: 64 kernels of a 64 px window at NA 0.3, whose sums stay in the
# processor's cache (1.5x faster than all at once on 2 cores); smaller windows take more kernels a chunk (the loop's overhead)
NEAR = 0.05  # log-likelihood gain a step must promise to be tried (less: taken untried, the fit ends; BeadFitter.refine)
AXIAL_V3, LATERAL_V = 0.6, 0.1  # fits moving more in depth and less laterally are tried again from a lateral start (BeadFitter._lateral_probe)
STILL_V3, PROBE_V3 = 0.05, 0.4  # fits with less axial motion than STILL_V3 are tried again from PROBE_V3 (BeadFitter._probe)
SIGN_GAP = 2.0  # log-likelihood (per unit of dispersion) by which the mirror image in depth must lose for the sign to be resolved
SCREEN_STATIC = 3  # iterations from each start of a still bead before the likeliest is kept (BeadFitter.fit)
MIRROR_STATIC = 4  # iterations of a still bead's refinement from its mirror image in depth (what tells its gap)
BANK_BIN = 2  # px a side of the bins on which the coarse search compares moving beads' windows without left-out pixels (2.4x faster;
# windows with pixels left out, as among neighbours, are compared pixel by pixel: binned, the dense set lost 1.5 % of its fits)
STRAY_PX = 0.5  # px a bank kernel's light may stray from its origin before the bank is centred on the light (BeadFitter.bank)
# time steps of the fitter's kernels: within a step the lateral motion is integrated exactly and the OTF linearly in
# depth; against steps of 0.5 px and 1/32 of the axial Nyquist pitch the kernels differ by < 0.2 of the Poisson noise at
# 20,000 photons (max over 300 random beads, median 0.05; chi-square max 0.24), less than the light the window cuts
LATERAL_STEP_PX, AXIAL_STEPS = 8.0, 4.0  # px; steps per axial Nyquist pitch
REACH, REACH_DEPTHS = 0.01, 65  # share of a still kernel's peak whose farthest pixel is its light's reach; depths where it is measured
KERNEL_MARGIN_PX, SIZE_STEP_PX, MIN_KERNEL_PX = 3.0, 16, 16  # beyond the reach, each side; kernel sizes a multiple of it; the smallest
POOR_FIT = 2.0  # deviance per counted window pixel above which a fit does not explain its window (about 1 for a right model)


@dataclass
class FitResult:
    """Per particle (arrays of length B): ``params`` (B, 8) in PARAMS order, ``std`` (B, 8)
    Cramér-Rao standard deviations times the square root of ``dispersion`` (the quasi-Poisson
    std: a camera whose noise exceeds Poisson's widens it by as much), ``deviance`` (over the ``pixels`` of the window that count),
    ``log_likelihood``, ``direction_resolved``, ``at_bound``, ``converged``, ``crosses_focus``
    (the path passes through the focal plane), ``dispersion``: variance over mean of the counts
    about the fit where the particle adds less than 1 % of its peak (1 for Poisson counts; a
    camera's read noise or offset adds to it, and the deviance grows by as much),
    ``sign_gap``: with a PSF asymmetric in depth, the log-likelihood by which the path at -z
    (refined) is less likely than the fit, per unit of dispersion (inf where it lies beyond the
    model's depths; 0 with a symmetric PSF), ``depth_sign_resolved``: ``sign_gap`` exceeds the
    PSF model's (PSFModel.sign_gap: found on its calibration beads; at least SIGN_GAP; always
    False with a symmetric PSF: the sign is not measured)."""

    params: np.ndarray
    std: np.ndarray
    deviance: np.ndarray
    log_likelihood: np.ndarray
    direction_resolved: np.ndarray
    at_bound: np.ndarray
    converged: np.ndarray
    crosses_focus: np.ndarray
    pixels: np.ndarray
    dispersion: np.ndarray
    sign_gap: np.ndarray
    depth_sign_resolved: np.ndarray

    def take(self, index: np.ndarray) -> FitResult:
        """The fits ``index`` (a copy)."""
        return FitResult(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def update(self, index: np.ndarray, other: FitResult) -> None:
        """Replace the fits ``index`` by ``other``'s (in order)."""
        for f in fields(self):
            getattr(self, f.name)[index] = getattr(other, f.name)

    def poor_fit(self) -> np.ndarray:
        """(B,) whether the deviance exceeds POOR_FIT times what the window's noise explains
        (``dispersion`` per counted pixel): the motion PSF of one particle does not explain the
        window (crossing or unusual particles)."""
        return self.deviance > POOR_FIT * self.dispersion * np.maximum(self.pixels, 1)


class BeadFitter:
    """Maximum-likelihood fits of windows (B, window, window) of camera counts, one bead each.

    Fit ranges follow the optics and the window: depths up to where the defocus blur is a quarter
    of the window (``z_max``, A um), lateral speeds whose streak fits in three quarters of it.
    With ``psf`` (a PSF model, blurflow.psfmodel: a measured microscope) the motion PSF is built
    from its table and the depths fitted are those it covers; where it is asymmetric in depth the sign
    of the depth is fitted (``signed``: z0 over the table's range, the report not folded to
    z0 + v3 / 2 >= 0). ``static``: the beads do not move during the exposure (v1 = v2 = v3 = 0
    held; position, depth, photons and background fitted).
    """

    def __init__(
        self, optics: Optics, scales: MotionScales, window: int = 64, device: torch.device | str = "cpu", psf: PSFModel | None = None,
        static: bool = False,
    ):  # fmt: skip
        self.optics, self.scales, self.window, self.static = optics, scales, window, static
        self.device = torch.device(device)
        blur_px_per_um = optics.na / math.sqrt(optics.n**2 - optics.na**2) / optics.pixel_um
        self.z_max = window / 4 / blur_px_per_um / scales.axial_scale_um
        self.signed = psf is not None and not psf.symmetric
        gap = getattr(psf, "sign_gap", None)  # a PSF model's (found on its calibration beads); any other source: SIGN_GAP
        self.sign_gap = SIGN_GAP if gap is None else max(SIGN_GAP, gap)
        self.z_lo, self.z_hi = -self.z_max, self.z_max  # the depths fitted (A um)
        if psf is not None:  # the depths it covers (a measured PSF may hold light far beyond the geometric blur)
            self.z_lo, self.z_hi = (z / scales.axial_scale_um for z in psf.z_range_um)
        self.v_max = 0.75 * window / scales.lateral_scale_px
        margin = 0.5 * scales.axial_scale_um
        self._source = optics if psf is None else psf
        self._z_range_um = (self.z_lo * scales.axial_scale_um - margin, self.z_hi * scales.axial_scale_um + margin)
        self._operators: dict[int, MotionPSF] = {}
        self.psf = self.operator(window)
        self._reach = self._reach_table()
        self._bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._bank_bins: torch.Tensor | None = None  # the bank's kernels binned by BANK_BIN (N, (window / BANK_BIN)**2)
        on = {"device": self.device}
        self.lower = torch.tensor([-window / 4, -window / 4, -self.v_max, -self.v_max, 0.0, self.z_lo, 1.0, 1e-3], **on)
        self.upper = torch.tensor([window / 4, window / 4, self.v_max, self.v_max, self.z_hi - self.z_lo, self.z_hi, math.inf, math.inf], **on)
        self.held = torch.zeros(8, dtype=torch.bool, **on)  # parameters not fitted
        if static:
            self.held[2:5] = True
            self.lower[2:5] = self.upper[2:5] = 0.0

    # --- the forward model -----------------------------------------------------------------

    def _on(self, x: torch.Tensor | np.ndarray | float) -> torch.Tensor:
        """``x`` as float32 on the fitter's device."""
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)

    def operator(self, size: int) -> MotionPSF:
        """The motion PSF of kernels ``size`` px wide (built once, when first asked for)."""
        if size not in self._operators:
            self._operators[size] = MotionPSF(
                self._source, self.scales, size, z_range_um=self._z_range_um, lateral_step_px=LATERAL_STEP_PX, axial_steps_per_nyquist=AXIAL_STEPS,
                device=self.device,
            )  # fmt: skip
        return self._operators[size]

    def _reach_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the reach (R,) px of a still kernel at each depth of a grid of R = REACH_DEPTHS over the
        fitted range: the largest distance from the origin of a pixel holding REACH of its peak;
        (R, R) its largest value over the depths i..j, i <= j): blur, rings and coma of the PSF
        as it is, measured or ideal."""
        z = torch.linspace(self.z_lo, self.z_hi, REACH_DEPTHS, device=self.device)
        light = self.psf(torch.stack([torch.zeros_like(z), torch.zeros_like(z), torch.zeros_like(z), z], 1)).clamp(min=0)
        grid = torch.arange(self.window, dtype=torch.float32, device=self.device) - self.window // 2
        dist = torch.hypot(grid[None, :], grid[:, None])
        reach = torch.where(light >= REACH * light.amax((1, 2), keepdim=True), dist, 0).amax((1, 2))
        spans = torch.zeros(REACH_DEPTHS, REACH_DEPTHS, device=self.device)
        for i in range(REACH_DEPTHS):
            spans[i, i:] = torch.cummax(reach[i:], 0).values
        return reach, spans

    def kernel_sizes(self, theta: torch.Tensor) -> torch.Tensor:
        """(B,) int: the kernel each path of ``theta`` (B, 8) needs, px: its streak, the reach of
        its light over the depths it passes (linear between the grid's depths) either side, and
        KERNEL_MARGIN_PX, rounded up to a multiple of SIZE_STEP_PX and at most the window."""
        reach, spans = self._reach
        streak = torch.hypot(theta[:, 2], theta[:, 3]) * self.scales.lateral_scale_px
        pitch = (self.z_hi - self.z_lo) / (REACH_DEPTHS - 1)
        ends = ((torch.stack([theta[:, 5], theta[:, 5] + theta[:, 4]], 1) - self.z_lo) / pitch).clamp(0, REACH_DEPTHS - 1)
        below = ends.floor().long().clamp(max=REACH_DEPTHS - 2)
        at_ends = torch.lerp(reach[below], reach[below + 1], ends - below).amax(1)
        first, last = ends.amin(1).ceil().long(), ends.amax(1).floor().long()  # the grid's depths within the path
        within = torch.where(first <= last, spans[first, last.clamp(min=0)], 0)
        need = streak + 2 * (torch.maximum(at_ends, within) + KERNEL_MARGIN_PX)
        size = (torch.ceil(need / SIZE_STEP_PX) * SIZE_STEP_PX).long()
        return size.clamp(min=min(MIN_KERNEL_PX, self.window), max=self.window)

    def _kernels(self, theta: torch.Tensor) -> torch.Tensor:
        """Kernels (B, window**2) (blurflow.optics.MotionPSF), each computed in a box of
        :meth:`kernel_sizes` about the nearest pixel to its path's midpoint, the rest of the window
        0; a box of the window's size is the window, periodic (as a PSF model's table is:
        calibration fits its beads' offsets as phases)."""
        b, w = theta.shape[0], self.window
        out = theta.new_empty(b, w * w)
        sizes = self.kernel_sizes(theta)
        for size in sizes.unique().tolist():
            idx = (sizes == size).nonzero()[:, 0]
            op, part = self.operator(size), theta[idx]
            whole = _whole(part, size, w)
            k = op(part[:, MOTION], offset_px=part[:, :2] - whole, chunk=_chunk(op)).reshape(len(idx), 1, -1)
            out[idx] = (_place(k, whole, size, w) if size < w else k)[:, 0]
        return out

    def expected(self, theta: torch.Tensor) -> torch.Tensor:
        """Expected counts (B, window, window) for parameters (B, 8) in PARAMS order."""
        theta = self._on(theta)
        kernels = self._kernels(theta).reshape(-1, self.window, self.window)
        return theta[:, 7, None, None] + theta[:, 6, None, None] * kernels.clamp(min=0)

    def light(self, theta: torch.Tensor) -> torch.Tensor:
        """Each particle's own expected counts (B, window, window): :meth:`expected` less the background."""
        return self.expected(theta) - self._on(theta)[:, 7, None, None]

    def simulate(self, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Poisson camera counts (B, window, window) float32 for parameters (B, 8): the light of the
        whole window (the fits' boxes leave out the farthest of it)."""
        theta = self._on(theta)
        kernels = self.psf(theta[:, MOTION], offset_px=theta[:, :2], chunk=_chunk(self.psf))
        return torch.poisson(theta[:, 7, None, None] + theta[:, 6, None, None] * kernels.clamp(min=0), generator=generator)

    # --- the coarse search -----------------------------------------------------------------

    def bank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(motion parameters (N, 4), kernels (N, window**2), their light's centroids (N, 2) (x, y)
        px from the origin) of the coarse grid, built once; where a centroid strays from the origin
        by more than STRAY_PX (a measured PSF's coma or tilt) the kernels are centred on their light
        (as the windows are) and the centroids kept, else they are taken as 0."""
        if self._bank is None:
            speeds = torch.linspace(0, min(self.v_max, 1.6), 9)
            angles = torch.arange(16) * (2 * math.pi / 16)
            v3s = torch.tensor([0.0, 0.2, 0.45, 0.75, 1.1, 1.5])
            z0s = torch.tensor([0.0, 0.2, 0.45, 0.75, 1.1, 1.5, 2.0])
            if self.static:  # still beads: depth alone, finer
                speeds, v3s, z0s = speeds[:1], v3s[:1], torch.linspace(0, max(self.z_hi, -self.z_lo), 41)
            if self.signed:  # either side of focus
                z0s = torch.cat([-z0s.flip(0)[:-1], z0s])
            rows = [
                (float(s * torch.cos(a)), float(s * torch.sin(a)), float(v3), float(z0))
                for s in speeds for a in (angles if s > 0 else angles[:1]) for v3 in v3s for z0 in z0s
                if self.z_lo <= z0 and z0 + v3 <= self.z_hi
            ]  # fmt: skip
            params = torch.tensor(rows, device=self.device)
            light = self.psf(params, chunk=_chunk(self.psf)).clamp(min=0)  # in chunks: all kernels' OTF samples at once took 0.8 GB
            stray = centroid(light)
            if stray.abs().max() > STRAY_PX:  # a PSF whose light leaves its origin with depth (coma, tilt): each kernel centred on its light
                light = self.psf(params, offset_px=-stray, chunk=_chunk(self.psf))
            else:  # (the ideal PSF's stray by < 0.15 px, where the window cuts their tails)
                stray = torch.zeros_like(stray)
            self._bank = (params, light.reshape(len(rows), -1), stray)
            if not self.static and self.window % BANK_BIN == 0:  # moving beads' windows whose every pixel counts are compared on bins
                self._bank_bins = _binned(light, BANK_BIN).flatten(1)
        return self._bank

    def _starts(self, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Start parameters (B, 2, 8): for each window (counts less any known light), the best
        bank match and the best match of the other v3 class (< or >= 0.3); pixels of weight 0
        do not count. (A start in the wrong direction ends at v3 = 0, where
        :meth:`_probe` tries both.)"""
        counts, weight = self._on(counts), self._on(weight)
        b, w = counts.shape[0], self.window
        flat = counts.reshape(b, -1)
        background = torch.where(weight.reshape(b, -1) > 0, flat, torch.nan).nanquantile(0.2, dim=1).nan_to_num(1e-3).clamp(min=1e-3)
        signal = (flat - background[:, None]).clamp(min=0) * weight.reshape(b, -1)
        cx, cy = centroid(signal.reshape(b, w, w), floor=1.0).unbind(1)
        shift = -torch.stack([cx, cy], 1).round()  # each window centred on its light (as the bank's kernels are)
        centred, mask = _place(torch.stack([counts, weight], 1).reshape(b, 2, -1), shift, w, w, periodic=True).unbind(1)
        params, kernels, own = self.bank()
        cost, amp, bg = (counts.new_empty(b, len(params)) for _ in range(3))
        whole = (mask == 1).all(1)  # windows all of whose pixels count: compared without a mask (moving beads': on bins)
        if whole.any() and self._bank_bins is not None:
            c, a, g = _bank_match(_binned(centred[whole].reshape(-1, w, w), BANK_BIN).flatten(1), self._bank_bins, pearson=False)
            cost[whole], amp[whole], bg[whole] = c, a, g / BANK_BIN**2
        elif whole.any():
            cost[whole], amp[whole], bg[whole] = _bank_match(centred[whole], kernels)
        rest = ~whole
        if rest.any():
            cost[rest], amp[rest], bg[rest] = _bank_match(centred[rest], kernels, mask[rest])
        small_v3 = params[:, 2] < 0.3
        best = cost.argmin(1)
        other = torch.where(small_v3[best][:, None], cost.masked_fill(small_v3[None], math.inf), cost.masked_fill(~small_v3[None], math.inf)).argmin(1)
        picks = (best, other)
        if self.static:  # depth alone (the bank in depth order): its three deepest local minima, defocus being the likeliest to deceive
            inner = torch.ones_like(cost, dtype=torch.bool)
            inner[:, 1:] &= cost[:, 1:] <= cost[:, :-1]
            inner[:, :-1] &= cost[:, :-1] <= cost[:, 1:]
            picks = tuple(cost.masked_fill(~inner, math.inf).topk(min(3, cost.shape[1]), 1, largest=False).indices.unbind(1))
        offsets = torch.stack([cx, cy], 1)
        starts = []
        for idx in picks:
            motion = params[idx]
            a, g = amp.gather(1, idx[:, None])[:, 0], bg.gather(1, idx[:, None])[:, 0]
            starts.append(torch.cat([offsets - own[idx], motion, a[:, None], g[:, None]], 1))  # the kernel's origin where its centroid meets the light's
        return torch.stack(starts, 1)

    # --- refinement ------------------------------------------------------------------------

    def _clamp(self, theta: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """``theta`` (B, 8) within the bounds (8,) or (B, 8), the path's end z0 + v3 within the upper depth."""
        theta = torch.maximum(torch.minimum(theta, upper), lower)
        depth_end = theta[:, 4] + theta[:, 5]
        z_hi = upper[..., 5].expand(len(theta))
        theta[:, 4] = torch.where(depth_end > z_hi, z_hi - theta[:, 5], theta[:, 4]).clamp(min=0)
        return theta

    def _box_jacobian(self, theta: torch.Tensor, whole: torch.Tensor, size: int) -> torch.Tensor:
        """d mu / d theta (B, 8, size**2) in each bead's box of ``size`` px about the pixel ``whole``
        (B, 2) (x, y) from the window's centre (the window itself, periodic, where ``size`` is the
        window's), analytic (blurflow.optics.MotionPSF with ``gradient``; still beads': by x, y and
        z0 alone); row 6, by the photons, is the kernel (clamped at 0, where the kernel's rows are
        the position's and motion's alone)."""
        op = self.operator(size)
        k = op(
            theta[:, MOTION], offset_px=theta[:, :2] - whole, gradient=True, chunk=_chunk(op), motion=not self.static
        ).flatten(2)  # fmt: skip
        photons = theta[:, 6, None, None]
        jac = k.new_empty(len(theta), 8, k.shape[2])
        if self.static:  # (kernel, d/dx, d/dy, d/dz0): the motion's rows held at 0
            torch.mul(photons, k[:, 1:3], out=jac[:, :2])
            torch.mul(photons, k[:, 3:], out=jac[:, 5:6])
            jac[:, 2:5] = 0.0
        else:
            torch.mul(photons, k[:, 1:], out=jac[:, :6])
        torch.clamp(k[:, 0], min=0, out=jac[:, 6])
        jac[:, 7] = 1.0
        jac[:, self.held] = 0.0  # held parameters: no row in the Fisher information (their std 0)
        return jac

    def _jacobian(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected counts (B, window**2), d mu / d theta (B, 8, window**2)): :meth:`_box_jacobian`
        placed in the window."""
        theta = self._on(theta)
        b, w = theta.shape[0], self.window
        jac = theta.new_empty(b, 8, w * w)
        sizes = self.kernel_sizes(theta)
        for size in sizes.unique().tolist():
            idx = (sizes == size).nonzero()[:, 0]
            whole = _whole(theta[idx], size, w)
            box = self._box_jacobian(theta[idx], whole, size)
            jac[idx] = _place(box, whole, size, w) if size < w else box
        jac[:, 7] = 1.0  # the background's, beyond the boxes too
        return theta[:, 7, None] + theta[:, 6, None] * jac[:, 6], jac

    def cramer_rao(self, theta: torch.Tensor, known: torch.Tensor | float = 0.0, weight: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected counts (B, window**2), Cramér-Rao standard deviations (B, 8)): the square roots
        of the diagonal of the inverse Poisson Fisher information at ``theta`` (B, 8), with
        ``known`` light (B, window**2) in the windows and pixel ``weight`` (0: not counted)."""
        mu, jac = self._jacobian(theta)
        mu = mu + self._on(known)
        return mu, self._std(torch.einsum("bpn,bqn->bpq", jac * (self._on(weight) / mu)[:, None], jac))

    def _std(self, fisher: torch.Tensor) -> torch.Tensor:
        """Cramér-Rao standard deviations (B, 8) from the Fisher information (B, 8, 8); 0 for held parameters."""
        cov = torch.linalg.pinv(fisher.double()).float()
        std = torch.diagonal(cov, dim1=1, dim2=2).clamp(min=0).sqrt()
        std[:, self.held] = 0.0  # held, not measured
        return std

    @staticmethod
    def log_likelihood(counts: torch.Tensor, mu: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Poisson log-likelihood (B,) of counts and expected counts (B, window**2) without the
        counts-only term, pixels weighted by ``weight``."""
        return (weight * (counts * mu.clamp(min=1e-9).log() - mu)).sum(1)

    def _scored(
        self, counts: torch.Tensor, theta: torch.Tensor, known: torch.Tensor, weight: torch.Tensor, information: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """(log-likelihood (B,), Fisher information (B, 8, 8), score (B, 8)) at ``theta`` (B, 8), on
        counts (B, window**2) with ``known`` light and pixel ``weight``: one evaluation of the
        kernels and their derivatives serves the step's test and, where it is taken, the next step
        (without ``information``, the likelihood alone: (ll, None, None))."""
        if not information:
            return self.log_likelihood(counts, self.expected(theta).flatten(1) + known, weight), None, None
        b, w = theta.shape[0], self.window
        rest = theta[:, 7, None] + known  # the window's expected counts without the particle
        # beyond the particle's box only the background's row of the Jacobian (1) is not 0: the likelihood and the
        # background's terms there are the window's less the box's
        outside = counts.new_empty(3, *counts.shape)  # (3, B, P), in place: the window is large
        torch.div(weight, rest, out=outside[1])
        torch.sub(counts, rest, out=outside[2]).mul_(outside[1])
        torch.log(rest.clamp(min=1e-9), out=outside[0]).mul_(counts).sub_(rest).mul_(weight)
        totals = outside.sum(2).T  # (B, 3)
        ll, fish, score = theta.new_empty(b), theta.new_empty(b, 8, 8), theta.new_empty(b, 8)
        sizes = self.kernel_sizes(theta)
        for size in sizes.unique().tolist():
            idx = (sizes == size).nonzero()[:, 0]
            part = theta[idx]
            whole = _whole(part, size, w)
            jac = self._box_jacobian(part, whole, size)
            if size < w:  # the box's pixels of the window (those beyond it: weight 0)
                at, inside = _box_index(whole, size, w)
                at += idx[:, None] * (w * w)
                c, k, wt = counts.take(at), known.take(at), weight.take(at) * inside
                beyond = totals[idx] - (outside.take(at[:, None] + (torch.arange(3, device=at.device) * (b * w * w))[:, None]) * inside[:, None]).sum(2)
            else:
                c, k, wt, beyond = counts[idx], known[idx], weight[idx], torch.zeros_like(totals[idx])
            mu = part[:, 7, None] + part[:, 6, None] * jac[:, 6] + k
            scaled = jac * (wt / mu)[:, None]
            ll[idx] = (wt * (c * mu.clamp(min=1e-9).log() - mu)).sum(1) + beyond[:, 0]
            fish[idx] = torch.einsum("bpn,bqn->bpq", scaled, jac)
            fish[idx, 7, 7] += beyond[:, 1]
            score[idx] = torch.einsum("bpn,bn->bp", scaled, c - mu)
            score[idx, 7] += beyond[:, 2]
        return ll, fish, score

    def refine(
        self, counts: torch.Tensor, theta: torch.Tensor, iterations: int = 30, tol: float = 1e-2, known: torch.Tensor | None = None,
        weight: torch.Tensor | None = None, bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Levenberg-Marquardt Fisher scoring from ``theta`` (B, 8) on counts (B, window**2) with
        ``known`` light (B, window**2, default none) and pixel ``weight`` (B, window**2, default 1)
        within ``bounds`` (lower, upper), (B, 8) each (default the fit ranges); returns (theta,
        log-likelihood, converged (B,) bool, the Fisher information (B, 8, 8) at the last point
        evaluated). A window has converged when a step achieves less than ``tol`` in log-likelihood
        (the std of a parameter is where it falls by 0.5) or promises less than NEAR: that step is
        taken untried, as Newton's last, its gain as predicted (the optimum within about 0.3 std:
        on the isolated benchmark 8 % fewer evaluations, no R² changed by 0.001). A rejected step is
        retried with more damping on the Fisher information already computed; a rejected step that
        promised less than NEAR ends the fit too (where the kernel's time steps change their number
        and the likelihood its value by about as much)."""
        counts, theta = self._on(counts), self._on(theta)
        known = torch.zeros_like(counts) if known is None else self._on(known)
        weight = torch.ones_like(counts) if weight is None else self._on(weight)
        b = theta.shape[0]
        lower, upper = (self._on(x) for x in bounds) if bounds else (self.lower.expand(b, 8), self.upper.expand(b, 8))
        theta = self._clamp(theta.clone(), lower, upper)
        ll, fish, grad = self._scored(counts, theta, known, weight)
        damping = theta.new_full((b,), 1e-2)
        converged, stale = theta.new_zeros(b, dtype=torch.bool), theta.new_zeros(b, dtype=torch.bool)
        for iteration in range(iterations):
            active = (~converged).nonzero()[:, 0]
            if not len(active):
                break
            f, g = fish[active], grad[active]
            scale = torch.diagonal(f, dim1=1, dim2=2).clamp(min=1e-12)
            system = f + damping[active, None, None] * torch.diag_embed(scale)
            step = torch.linalg.solve(system, g[..., None])[..., 0]
            # a parameter at a bound that the step would push beyond is held (its row and column out), and the rest solved again
            th = theta[active]
            free = ~(((th <= lower[active] + 1e-6) & (step < 0)) | ((th >= upper[active] - 1e-6) & (step > 0)) | self.held)
            g = g * free
            system = system * (free[:, :, None] & free[:, None, :]) + torch.diag_embed(scale * ~free)
            step = torch.linalg.solve(system, g[..., None])[..., 0]
            gain = (step * g).sum(1)  # about twice the predicted gain
            small = gain < 2 * NEAR  # near the optimum: the step is taken untried (Newton's last step), its gain as predicted
            final = active[small]
            theta[final] = self._clamp(theta[final] + step[small], lower[final], upper[final])
            ll[final] += 0.5 * gain[small]
            go = active[~small]
            if not len(go):
                converged[active] = True
                break
            trial = self._clamp(theta[go] + step[~small], lower[go], upper[go])
            last = iteration == iterations - 1  # no step follows: the likelihood alone
            trial_ll, trial_fish, trial_grad = self._scored(counts[go], trial, known[go], weight[go], information=not last)
            ll_before = ll[go]
            better = trial_ll > ll_before
            done = better & (trial_ll - ll_before < tol)
            keep = go[better]
            theta[keep], ll[keep] = trial[better], trial_ll[better]
            if last:
                stale[keep] = True
            else:
                fish[keep], grad[keep] = trial_fish[better], trial_grad[better]
            ratio = (trial_ll - ll_before) / (0.5 * gain[~small])  # achieved over predicted gain
            damping[go] = torch.where(better, damping[go] * torch.where(ratio > 0.75, 1 / 3, torch.where(ratio < 0.25, 2.0, 1.0)), damping[go] * 10).clamp(
                1e-6, 1e8
            )
            converged[active[small]] = True
            converged[go] = done | (damping[go] >= 1e8) | (~better & (gain[~small] < 2 * NEAR))
        if stale.any():  # moved in the last iteration, whose trials were scored without it
            fish[stale] = self._scored(counts[stale], theta[stale], known[stale], weight[stale])[1]
        return theta, ll, converged, fish

    def _likeliest(self, counts: torch.Tensor, known: torch.Tensor, weight: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, 8): of ``candidates`` (B, K, 8) on counts (B, window**2) with ``known`` light and pixel
        ``weight``, each window's likeliest (clamped to the fit ranges)."""
        b, k = candidates.shape[:2]
        theta = self._clamp(candidates.reshape(b * k, 8), self.lower, self.upper)
        c, light, wt = (x.repeat_interleave(k, 0) for x in (counts, known, weight))
        ll = self.log_likelihood(c, self.expected(theta).flatten(1) + light, wt).reshape(b, k)
        return theta.reshape(b, k, 8)[torch.arange(b, device=theta.device), ll.argmax(1)]

    def _probe(
        self, counts: torch.Tensor, fit: tuple[torch.Tensor, ...], known: torch.Tensor, weight: torch.Tensor, iterations: int,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Of ``fit``, :meth:`refine`'s (theta, log-likelihood, converged, Fisher information) (changed
        in place and returned), fits that end where Fisher scoring cannot leave a wrong answer are
        refined again from another start, kept where more likely: of the two lateral directions,
        the one likelier at the start (on the isolated benchmark the choice that refining both
        makes for 97 % of probes, at most 0.01 less log-likelihood for the rest). Without axial motion
        (v3 < STILL_V3): from v3 = PROBE_V3 about the same mean depth (at v3 = 0 the derivative by
        v3 is half that by z0, so a fit that started in the wrong direction ends there). Through
        focus (z0 < 0 < z0 + v3): from v3 = STILL_V3 at the path's root-mean-square depth (a path
        through focus blurs about as one that stays at that depth, two optima apart)."""
        theta, ll = fit[:2]
        z0, v3 = theta[:, 5], theta[:, 4]
        still, through = (v3 < STILL_V3).nonzero()[:, 0], ((z0 < 0) & (z0 + v3 > 0)).nonzero()[:, 0]
        which = torch.cat([still, through])
        if not len(which) or self.static:
            return fit
        turned = theta[through, None].repeat(1, 2, 1)
        turned[:, 1, 2:4] *= -1
        turned[:, :, 4] = STILL_V3
        turned[:, :, 5] = ((z0[through] ** 2 + z0[through] * v3[through] + v3[through] ** 2 / 3).sqrt() - STILL_V3 / 2)[:, None]
        probes = torch.cat([_turned(theta[still]), turned])
        c, light, wt = counts[which], known[which], weight[which]
        tried = self.refine(c, self._likeliest(c, light, wt, probes), iterations, known=light, weight=wt)
        _keep(fit, which, tried, tried[1] > ll[which])
        return fit

    def _lateral_probe(
        self, counts: torch.Tensor, fit: tuple[torch.Tensor, ...], known: torch.Tensor, weight: torch.Tensor, other: torch.Tensor, iterations: int,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Of ``fit`` (as :meth:`_probe`'s, changed in place and returned), fits that end moving in
        depth (v3 > AXIAL_V3) with little lateral motion (< LATERAL_V of L) are refined again from
        ``other`` (B, 8), the coarse search's best start of the other v3 class, kept where more
        likely: a deep bead moving laterally can end in that basin (in the tracking benchmark, 20 %
        of the beads 24-27 um deep at NA 0.3: v1 0 and v3 1.0-1.3 for a true 0.25 and 0, 12-160
        less likely than the truth's optimum)."""
        theta, ll = fit[:2]
        which = ((theta[:, 4] > AXIAL_V3) & (theta[:, 2:4].norm(dim=1) < LATERAL_V)).nonzero()[:, 0]
        if not len(which):
            return fit
        c, light, wt = counts[which], known[which], weight[which]
        tried = self.refine(c, other[which], iterations, known=light, weight=wt)
        _keep(fit, which, tried, tried[1] > ll[which])
        return fit

    def _mirror(
        self, counts: torch.Tensor, fit: tuple[torch.Tensor, ...], known: torch.Tensor, weight: torch.Tensor, iterations: int, replace: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """With a PSF asymmetric in depth, every fit (``fit`` as :meth:`_probe`'s, changed in place) is refined again from its mirror image in depth
        (the path at -z, (-v1, -v2, v3, -z0 - v3) with v3 >= 0), held on that side of focus: where
        the asymmetry is weak the two are nearby optima, and the search may have settled in the
        wrong one. The more likely kept (with ``replace``). Returns the gap (B,) in
        log-likelihood by which the fit kept beats the best path on the other side of focus
        (negative where that is better and not taken; inf where the mirror lies beyond the model's
        depths)."""
        theta, ll = fit[:2]
        mirror = mirror_in_depth(theta)
        inside = (mirror[:, 5] >= self.z_lo) & (mirror[:, 5] + mirror[:, 4] <= self.z_hi)
        which = inside.nonzero()[:, 0]
        gap = torch.full_like(ll, math.inf)
        if not len(which):
            return gap
        lower, upper = self.lower.repeat(len(which), 1), self.upper.repeat(len(which), 1)
        deep = theta[which, 5] + theta[which, 4] / 2 >= 0  # the fit's side: the mirror is held on the other
        upper[deep, 5] = 0.0  # the whole path at z <= 0
        lower[~deep, 5] = 0.0  # at z >= 0 (v3 >= 0)
        tried = self.refine(counts[which], mirror[which], iterations, known=known[which], weight=weight[which], bounds=(lower, upper))
        better = (tried[1] > ll[which]) & replace
        gap[which] = torch.where(better, tried[1] - ll[which], ll[which] - tried[1])
        _keep(fit, which, tried, better)
        return gap

    # --- the whole fit ---------------------------------------------------------------------

    @torch.no_grad()
    def fit(
        self, counts: torch.Tensor, screen: int | None = None, iterations: int = 25, known: torch.Tensor | None = None, weight: torch.Tensor | None = None,
        start: torch.Tensor | None = None, also: bool = False,
    ) -> FitResult:  # fmt: skip
        """Fit every window of ``counts`` (B, window, window), camera counts (photo-electrons), with
        ``known`` light (B, window, window: the neighbours' streaks, default none) added to the
        model and pixel ``weight`` (B, window, window; 0: the pixel does not count, default 1).
        Without ``start`` (B, 8) every start of the coarse search is refined for ``screen``
        iterations (0: taken as it is; default SCREEN_STATIC for still beads, whose starts are
        depths far apart, else 0: screening moving beads' starts changed no R² of the isolated
        benchmark by more than 0.001 at 1.5x the cost), the most likely one per window for up to
        ``iterations`` more (unscreened, the likelier of the two by their likelihood where the
        depth is signed: on the aberrated benchmark the bank's best match alone took v3's R² from
        0.990 to 0.877; else the best match: choosing changed no R² of the isolated or the dense
        benchmark by more than 0.001); with it, only the refinement from it, or with ``also`` it is
        one more start of the search, the likeliest taken."""
        w = self.window
        counts = self._on(counts).reshape(-1, w * w)
        b = counts.shape[0]
        if b == 0:
            empty, flags = np.zeros((0, len(PARAMS)), np.float32), np.zeros(0, bool)
            nothing = np.zeros(0, np.float32)
            return FitResult(empty, empty.copy(), nothing, nothing, flags, flags, flags, flags, nothing, nothing, nothing, flags)
        known = torch.zeros_like(counts) if known is None else self._on(known).reshape(b, -1)
        weight = torch.ones_like(counts) if weight is None else self._on(weight).reshape(b, -1)
        if screen is None:
            screen = SCREEN_STATIC if self.static else 0
        starts = None
        if start is None or also:
            starts = self._starts((counts - known).clamp(min=0).reshape(b, w, w), weight.reshape(b, w, w))
            if start is not None:
                starts = torch.cat([starts, self._on(start)[:, None]], 1)
            s = starts.shape[1]
            if screen:
                c, light, wt = (x.repeat_interleave(s, 0) for x in (counts, known, weight))
                theta, ll, *_ = self.refine(c, starts.reshape(b * s, 8), screen, known=light, weight=wt)
                start = theta[ll.reshape(b, s).argmax(1) + torch.arange(b, device=self.device) * s]
            else:
                start = self._likeliest(counts, known, weight, starts) if also or self.signed else starts[:, 0]
            still = (start[:, 4] < STILL_V3).nonzero()[:, 0] if not self.static else torch.zeros(0, dtype=torch.long, device=self.device)
            if len(still):  # a start without axial motion is also tried either way from PROBE_V3 (as _probe does a fit)
                start[still] = self._likeliest(counts[still], known[still], weight[still], torch.cat([start[still, None], _turned(start[still])], 1))
        found = self.refine(counts, self._on(start), iterations, known=known, weight=weight)
        found = self._probe(counts, found, known, weight, iterations)
        if starts is not None and not self.static:
            found = self._lateral_probe(counts, found, known, weight, starts[:, 1], iterations)
        gap = counts.new_zeros(b)
        if self.signed:  # static fits start from minima at either sign already: a short refinement tells the gap, and the fit stays
            gap = self._mirror(counts, found, known, weight, MIRROR_STATIC if self.static else iterations, replace=not self.static)
        theta, ll, converged, fisher = found
        m, std = self.expected(theta).flatten(1) + known, self._std(fisher)
        at_bound = ((theta - self.lower).abs() < 1e-6) | ((self.upper - theta).abs() < 1e-6)
        at_bound[:, 4] &= theta[:, 4] > 1e-6  # v3 = 0 is a value, not a bound hit
        at_bound[:, self.held] = False
        theta = toward_focus(theta) if self.signed else canonical(theta)
        crosses = theta[:, 5] * (theta[:, 5] + theta[:, 4]) < 0  # the path passes through focus
        deviance = 2 * (weight * (torch.where(counts > 0, counts * (counts / m).log(), torch.zeros_like(counts)) - (counts - m))).sum(1)
        signal = m - known - theta[:, 7, None]
        quiet = (weight * (signal < 0.01 * signal.amax(1, keepdim=True))).clamp(max=1)
        dispersion = ((quiet * (counts - m) ** 2).sum(1) / (quiet * m).sum(1).clamp(min=1e-6)).clamp(min=1)
        std = std * dispersion.sqrt()[:, None]  # quasi-Poisson: noise beyond Poisson widens the bound by as much
        out = {
            "params": theta, "std": std, "deviance": deviance, "log_likelihood": ll, "direction_resolved": resolved(theta, std), "at_bound": at_bound.any(1),
            "converged": converged, "crosses_focus": crosses, "pixels": weight.sum(1), "dispersion": dispersion, "sign_gap": gap / dispersion,
            "depth_sign_resolved": self.signed & (gap > self.sign_gap * dispersion),
        }  # fmt: skip
        return FitResult(**{k: v.cpu().numpy() for k, v in out.items()})  # fmt: skip


def _keep(fit: tuple[torch.Tensor, ...], which: torch.Tensor, tried: tuple[torch.Tensor, ...], better: torch.Tensor) -> None:
    """Replace, in :meth:`BeadFitter.refine`'s ``fit`` (theta, log-likelihood, converged, Fisher
    information), the rows ``which`` by ``tried``'s (of those rows) where ``better``. In place."""
    for mine, theirs in zip(fit, tried):
        mine[which[better]] = theirs[better]


def resolved(theta: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Whether the direction of each path (B,) is resolved by the fit (canonical ``theta`` and
    its ``std``, (B, 8)): its ends differ in sharpness by more than 2 std of v3, and it moves
    laterally by more than 2 std."""
    z_start, z_end = theta[:, 5], theta[:, 5] + theta[:, 4]
    return (z_end.abs() - z_start.abs() > 2 * std[:, 4]) & (torch.hypot(theta[:, 2], theta[:, 3]) > 2 * std[:, 2:4].norm(dim=1))


def toward_focus(theta: torch.Tensor) -> torch.Tensor:
    """The representative of (x, y, v1, v2, v3, z0, A, b) whose start is the end nearer focus
    (|z0| <= |z0 + v3|), depth signed: (v1, v2, v3, z0) and (-v1, -v2, -v3, z0 + v3) are the same
    image (time reversal), and a PSF asymmetric in depth tells z from -z."""
    out = theta.clone()
    flip = (theta[:, 5] + theta[:, 4]).abs() < theta[:, 5].abs()
    out[flip, 2:5] = -theta[flip, 2:5]
    out[flip, 5] = theta[flip, 5] + theta[flip, 4]
    return out


def mirror_in_depth(theta: torch.Tensor) -> torch.Tensor:
    """(x, y, v1, v2, v3, z0, A, b) -> (x, y, -v1, -v2, v3, -z0 - v3, A, b): the path at -z, run
    backwards in time so that v3 keeps its sign (a symmetric PSF images both alike)."""
    out = theta.clone()
    out[:, 2:4] = -theta[:, 2:4]
    out[:, 5] = -theta[:, 5] - theta[:, 4]
    return out


def canonical(theta: torch.Tensor) -> torch.Tensor:
    """The representative of (x, y, v1, v2, v3, z0, A, b) whose mean depth z0 + v3 / 2 is >= 0:
    it and its :func:`mirror_in_depth` are the same image (depth sign and time reversal)."""
    flip = theta[:, 5] + theta[:, 4] / 2 < 0
    return torch.where(flip[:, None], mirror_in_depth(theta), theta)


def _bank_match(
    counts: torch.Tensor, kernels: torch.Tensor, mask: torch.Tensor | None = None, pearson: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cost, photons, background) (B, N) of counts (B, P) ~ background + photons x kernel for every
    kernel (N, P), by least squares, weighted by 1 / (counts + 1) (Pearson) or with ``pearson``
    False unweighted (one product with the kernels instead of three); pixels of ``mask`` (B, P) 0
    do not count: the coarse search's comparison."""
    if not pearson and mask is None:
        sw = counts.new_full((len(counts), 1), counts.shape[1])
        swk, swkk = kernels.sum(1)[None], (kernels**2).sum(1)[None]
        swn, swnn, swnk = counts.sum(1, keepdim=True), (counts**2).sum(1, keepdim=True), counts @ kernels.T
    else:
        wt = (1.0 if mask is None else mask) / (counts + 1 if pearson else 1)
        sw, swk, swkk = wt.sum(1, keepdim=True), wt @ kernels.T, wt @ (kernels**2).T
        swn, swnn, swnk = (wt * counts).sum(1, keepdim=True), (wt * counts**2).sum(1, keepdim=True), (wt * counts) @ kernels.T
    det = (sw * swkk - swk**2).clamp(min=1e-12)
    amp = torch.mul(swnk, sw).addcmul_(swk, swn, value=-1).div_(det).clamp_(min=1)
    bg = torch.addcmul(swn, amp, swk, value=-1).div_(sw).clamp_(min=1e-3)
    # the squared residual, swnn + amp (amp swkk - 2 swnk + 2 bg swk) + bg (bg sw - 2 swn), in place: (B, N) is large
    cost = torch.mul(amp, swkk).sub_(swnk, alpha=2).addcmul_(bg, swk, value=2).mul_(amp)
    return cost.addcmul_(bg, torch.mul(bg, sw).sub_(swn, alpha=2)).add_(swnn), amp, bg


def _binned(images: torch.Tensor, side: int) -> torch.Tensor:
    """(B, w / side, w / side): ``images`` (B, w, w) summed over bins of ``side`` x ``side`` px."""
    b, w = images.shape[0], images.shape[-1] // side
    return images.reshape(b, w, side, w, side).sum((2, 4))


def _turned(theta: torch.Tensor) -> torch.Tensor:
    """(B, 2, 8): paths (B, 8) given axial motion PROBE_V3 about the same mean depth, in either
    lateral direction (at v3 = 0 the two are one image)."""
    out = theta[:, None].repeat(1, 2, 1)
    out[:, 1, 2:4] *= -1
    out[:, :, 5] += ((theta[:, 4] - PROBE_V3) / 2)[:, None]
    out[:, :, 4] = PROBE_V3
    return out


def _chunk(psf: MotionPSF) -> int:
    """Kernels of ``psf`` computed at once: CHUNK_SAMPLES OTF samples' worth, at least 64."""
    return max(64, CHUNK_SAMPLES // psf._fx.numel())


def _whole(theta: torch.Tensor, size: int, window: int) -> torch.Tensor:
    """(B, 2) the pixel (x, y from the window's centre) about which each path's box of ``size`` px
    lies: the nearest to its midpoint, or the centre for a box of the window's size (periodic)."""
    return theta[:, :2].round() if size < window else torch.zeros_like(theta[:, :2])


def _box_index(whole: torch.Tensor, size: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the window pixel (row-major index) (B, size**2) of each pixel of boxes of ``size`` px
    whose origins (index size // 2) lie at ``whole`` (B, 2) (x, y) px from the window's centre,
    the nearest window pixel for those beyond it; whether within the window (B, size**2), 1 or 0)."""
    grid = torch.arange(size, device=whole.device) - size // 2 + window // 2
    rows, cols = grid[None] + whole[:, 1:2].long(), grid[None] + whole[:, 0:1].long()
    inside = ((rows >= 0) & (rows < window))[:, :, None] & ((cols >= 0) & (cols < window))[:, None, :]
    index = rows.clamp(0, window - 1)[:, :, None] * window + cols.clamp(0, window - 1)[:, None, :]
    return index.flatten(1), inside.flatten(1).to(whole.dtype)


def _place(kernels: torch.Tensor, whole: torch.Tensor, size: int, window: int, periodic: bool = False) -> torch.Tensor:
    """(B, C, window**2): kernels (B, C, size**2), origins at index size // 2, placed with their
    origins at ``whole`` (B, 2) (x, y) integer px from the window's centre; what leaves the window
    is cut, or with ``periodic`` (size = window) comes back in on the other side."""
    b = kernels.shape[0]
    grid = torch.arange(window, device=kernels.device)
    rows = grid[None] - window // 2 - whole[:, 1:2].long() + size // 2  # (B, window): each window row's kernel row
    cols = grid[None] - window // 2 - whole[:, 0:1].long() + size // 2
    if periodic:
        rows, cols = rows % size, cols % size
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    index = torch.where(inside, rows[:, :, None] * size + cols[:, None, :], size * size).reshape(b, 1, -1)
    padded = torch.cat([kernels, kernels.new_zeros(b, kernels.shape[1], 1)], 2)
    return padded.gather(2, index.expand(b, kernels.shape[1], -1))


def centroid(light: torch.Tensor, floor: float = 1e-12, pitch: float = 1.0) -> torch.Tensor:
    """(B, 2) (x, y) centroids of ``light`` (B, w, w) from index w // 2, in units of ``pitch``
    (its total held at ``floor`` or above)."""
    w = light.shape[-1]
    grid = (torch.arange(w, dtype=light.dtype, device=light.device) - w // 2) * pitch
    mass = light.sum((1, 2)).clamp(min=floor)
    return torch.stack([(light.sum(1) * grid).sum(1), (light.sum(2) * grid).sum(1)], 1) / mass[:, None]
