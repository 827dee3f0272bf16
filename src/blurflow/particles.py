"""Particle mode: the 3D motion of an isolated tracer particle (a bead) from one exposure, by a
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
a few starts from it (the best match, the best match of the other v3 class, and the best's reversed
direction), each refined by Fisher scoring with Levenberg-Marquardt damping on the Poisson
likelihood (Jacobian of the motion parameters by finite differences, all particles and starts in one
batch), the start of highest likelihood kept. Uncertainty: the Cramér-Rao standard deviations
(inverse Poisson Fisher information at the estimate), the deviance as goodness of fit, and flags
for estimates at a bound or not converged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from blurflow.optics import COMPONENTS, MotionPSF, MotionScales, Optics

PARAMS = ("x_px", "y_px", "v1", "v2", "v3", "z0", "photons", "background")
MOTION = slice(2, 6)
FD_STEP = torch.tensor([2e-3, 2e-3, 2e-3, 2e-3])  # finite-difference steps of v1, v2, v3, z0


@dataclass
class FitResult:
    """Per particle (arrays of length B): ``params`` (B, 8) in PARAMS order, ``std`` (B, 8)
    Cramér-Rao standard deviations, ``deviance`` (over the ``pixels`` of the window that count),
    ``log_likelihood``, ``direction_resolved``, ``at_bound``, ``converged``, ``crosses_focus``
    (the path passes through the focal plane)."""

    params: np.ndarray
    std: np.ndarray
    deviance: np.ndarray
    log_likelihood: np.ndarray
    direction_resolved: np.ndarray
    at_bound: np.ndarray
    converged: np.ndarray
    crosses_focus: np.ndarray
    pixels: np.ndarray

    def poor_fit(self) -> np.ndarray:
        """(B,) whether the deviance exceeds POOR_FIT per counted pixel: the motion PSF of one
        particle does not explain the window (crossing or unusual particles)."""
        return self.deviance > POOR_FIT * np.maximum(self.pixels, 1)


class BeadFitter:
    """Maximum-likelihood fits of windows (B, window, window) of camera counts, one bead each.

    Fit ranges follow the optics and the window: depths up to where the defocus blur is a quarter
    of the window (``z_max``, A um), lateral speeds whose streak fits in three quarters of it.
    """

    def __init__(self, optics: Optics, scales: MotionScales, window: int = 64, device: torch.device | str = "cpu"):
        self.optics, self.scales, self.window = optics, scales, window
        self.device = torch.device(device)
        blur_px_per_um = optics.na / math.sqrt(optics.n**2 - optics.na**2) / optics.pixel_um
        self.z_max = window / 4 / blur_px_per_um / scales.axial_scale_um
        self.v_max = 0.75 * window / scales.lateral_scale_px
        depth = (self.z_max + 0.5) * scales.axial_scale_um
        # lateral steps of 2 px instead of 0.5: within a step the lateral motion is integrated exactly, and the
        # kernels differ by < 0.01 of the Poisson noise at 20,000 photons, at about 3x the speed
        self.psf = MotionPSF(optics, scales, window, z_range_um=(-depth, depth), lateral_step_px=2.0, device=self.device)
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lower = torch.tensor([-window / 4, -window / 4, -self.v_max, -self.v_max, 0.0, -self.z_max, 1.0, 1e-3])
        self.upper = torch.tensor([window / 4, window / 4, self.v_max, self.v_max, 2 * self.z_max, self.z_max, math.inf, math.inf])

    # --- the forward model -----------------------------------------------------------------

    def expected(self, theta: torch.Tensor, offset_gradient: bool = False) -> torch.Tensor:
        """Expected counts (B, window, window) for parameters (B, 8) in PARAMS order; with
        ``offset_gradient`` (B, 3, window, window): also their derivatives by x and y."""
        kernels = self.psf(theta[:, MOTION], offset_px=theta[:, :2], offset_gradient=offset_gradient)
        amp, bg = theta[:, 6, None, None], theta[:, 7, None, None]
        if offset_gradient:
            return torch.cat([bg[:, None] + amp[:, None] * kernels[:, :1].clamp(min=0), amp[:, None] * kernels[:, 1:]], 1)
        return bg + amp * kernels.clamp(min=0)

    def simulate(self, theta: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Poisson camera counts (B, window, window) float32 for parameters (B, 8)."""
        return torch.poisson(self.expected(theta), generator=generator)

    # --- the coarse search -----------------------------------------------------------------

    def bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(motion parameters (N, 4), kernels (N, window**2)) of the coarse grid, built once."""
        if self._bank is None:
            speeds = torch.linspace(0, min(self.v_max, 1.6), 9)
            angles = torch.arange(16) * (2 * math.pi / 16)
            v3s = torch.tensor([0.0, 0.2, 0.45, 0.75, 1.1, 1.5])
            z0s = torch.tensor([0.0, 0.2, 0.45, 0.75, 1.1, 1.5, 2.0])
            rows = [
                (float(s * torch.cos(a)), float(s * torch.sin(a)), float(v3), float(z0))
                for s in speeds for a in (angles if s > 0 else angles[:1]) for v3 in v3s for z0 in z0s
                if z0 + v3 <= self.z_max
            ]  # fmt: skip
            params = torch.tensor(rows)
            self._bank = (params, self.psf(params).reshape(len(rows), -1))
        return self._bank

    def _starts(self, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Start parameters (B, S, 8): for each window (counts less any known light), the best
        bank match, the best match of the other v3 class (< or >= 0.3), and the best's reversed
        direction; pixels of weight 0 do not count."""
        b, w = counts.shape[0], self.window
        flat = counts.reshape(b, -1)
        background = torch.where(weight.reshape(b, -1) > 0, flat, torch.nan).nanquantile(0.2, dim=1).nan_to_num(1e-3).clamp(min=1e-3)
        signal = (flat - background[:, None]).clamp(min=0) * weight.reshape(b, -1)
        grid = torch.arange(w, dtype=torch.float32) - w // 2
        total = signal.sum(1).clamp(min=1)
        cx = (signal.reshape(b, w, w).sum(1) * grid).sum(1) / total
        cy = (signal.reshape(b, w, w).sum(2) * grid).sum(1) / total
        shift = (-cy.round().long(), -cx.round().long())
        centred = torch.stack([torch.roll(c, (int(sy), int(sx)), (0, 1)) for c, sy, sx in zip(counts, *shift)]).reshape(b, -1)
        mask = torch.stack([torch.roll(c, (int(sy), int(sx)), (0, 1)) for c, sy, sx in zip(weight, *shift)]).reshape(b, -1)
        params, kernels = self.bank()
        # weighted least squares of counts ~ b + A k per bank kernel (weights 1 / (counts + 1), Pearson)
        wt = mask / (centred + 1)
        sw, swn = wt.sum(1, keepdim=True), (wt * centred).sum(1, keepdim=True)
        swk, swkk, swnk = wt @ kernels.T, wt @ (kernels**2).T, (wt * centred) @ kernels.T
        det = (sw * swkk - swk**2).clamp(min=1e-12)
        amp = ((sw * swnk - swk * swn) / det).clamp(min=1)
        bg = ((swn - amp * swk) / sw).clamp(min=1e-3)
        swnn = (wt * centred**2).sum(1, keepdim=True)
        cost = swnn - 2 * amp * swnk - 2 * bg * swn + amp**2 * swkk + 2 * amp * bg * swk + bg**2 * sw
        small_v3 = params[:, 2] < 0.3
        best = cost.argmin(1)
        other = torch.where(small_v3[best][:, None], cost.masked_fill(small_v3[None], math.inf), cost.masked_fill(~small_v3[None], math.inf)).argmin(1)
        offsets = torch.stack([cx, cy], 1)
        starts = []
        for idx, flip in ((best, 1.0), (other, 1.0), (best, -1.0)):
            motion = params[idx].clone()
            motion[:, :2] *= flip
            a, g = amp.gather(1, idx[:, None])[:, 0], bg.gather(1, idx[:, None])[:, 0]
            starts.append(torch.cat([offsets, motion, a[:, None], g[:, None]], 1))
        return torch.stack(starts, 1)

    # --- refinement ------------------------------------------------------------------------

    def _clamp(self, theta: torch.Tensor) -> torch.Tensor:
        theta = torch.maximum(torch.minimum(theta, self.upper), self.lower)
        depth_end = theta[:, 4] + theta[:, 5]  # z0 + v3 within the table
        theta[:, 4] = torch.where(depth_end > self.z_max, self.z_max - theta[:, 5], theta[:, 4]).clamp(min=0)
        return theta

    def _jacobian(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected counts (B, window**2), d mu / d theta (B, 8, window**2)): exact for position,
        photons and background, forward differences for the motion."""
        b = theta.shape[0]
        steps = FD_STEP.to(theta)
        shifted = theta[:, None].repeat(1, 4, 1)
        idx = torch.arange(4)
        shifted[:, idx, idx + 2] += steps
        both = self.expected(torch.cat([theta, shifted.reshape(-1, 8)]), offset_gradient=True)
        at, moved = both[:b], both[b:, 0].reshape(b, 4, -1)
        mu = at[:, 0].reshape(b, -1)
        jac = torch.empty(b, 8, mu.shape[1])
        jac[:, :2] = at[:, 1:].reshape(b, 2, -1)
        jac[:, 2:6] = (moved - mu[:, None]) / steps[None, :, None]
        jac[:, 6] = (mu - theta[:, 7, None]) / theta[:, 6, None]
        jac[:, 7] = 1.0
        return mu, jac

    def cramer_rao(self, theta: torch.Tensor, known: torch.Tensor | float = 0.0, weight: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(expected counts (B, window**2), Cramér-Rao standard deviations (B, 8)): the square roots
        of the diagonal of the inverse Poisson Fisher information at ``theta`` (B, 8), with
        ``known`` light (B, window**2) in the windows and pixel ``weight`` (0: not counted)."""
        mu, jac = self._jacobian(theta)
        mu = mu + known
        fisher = torch.einsum("bpn,bqn->bpq", jac * (weight / mu)[:, None], jac)
        cov = torch.linalg.pinv(fisher.double()).float()
        return mu, torch.diagonal(cov, dim1=1, dim2=2).clamp(min=0).sqrt()

    @staticmethod
    def log_likelihood(counts: torch.Tensor, mu: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Poisson log-likelihood (B,) of counts and expected counts (B, window**2) without the
        counts-only term, pixels weighted by ``weight``."""
        return (weight * (counts * mu.clamp(min=1e-9).log() - mu)).sum(1)

    def refine(
        self, counts: torch.Tensor, theta: torch.Tensor, iterations: int = 30, tol: float = 1e-4, known: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Levenberg-Marquardt Fisher scoring from ``theta`` (B, 8) on counts (B, window**2) with
        ``known`` light (B, window**2, default none) and pixel ``weight`` (B, window**2, default 1);
        returns (theta, log-likelihood, converged (B,) bool)."""
        known = torch.zeros_like(counts) if known is None else known
        weight = torch.ones_like(counts) if weight is None else weight
        theta = self._clamp(theta.clone())
        ll = self.log_likelihood(counts, self.expected(theta).flatten(1) + known, weight)
        damping = torch.full((theta.shape[0],), 1e-2)
        converged = torch.zeros(theta.shape[0], dtype=torch.bool)
        for _ in range(iterations):
            active = (~converged).nonzero()[:, 0]
            if not len(active):
                break
            t, n, wt, extra = theta[active], counts[active], weight[active], known[active]
            m, jac = self._jacobian(t)
            m = m + extra
            fish = torch.einsum("bpn,bqn->bpq", jac * (wt / m)[:, None], jac)
            grad = torch.einsum("bpn,bn->bp", jac, (n - m) * wt / m)
            scale = torch.diagonal(fish, dim1=1, dim2=2).clamp(min=1e-12)
            system = fish + damping[active, None, None] * torch.diag_embed(scale)
            step = torch.linalg.solve(system, grad[..., None])[..., 0]
            trial = self._clamp(t + step)
            trial_ll = self.log_likelihood(n, self.expected(trial).flatten(1) + extra, wt)
            better = trial_ll > ll[active]
            gain = (trial_ll - ll[active]).abs()
            done = better & (gain < tol * (1 + ll[active].abs()) * 1e-3 + tol)
            theta[active] = torch.where(better[:, None], trial, t)
            ll[active] = torch.where(better, trial_ll, ll[active])
            damping[active] = torch.where(better, damping[active] / 3, damping[active] * 10).clamp(1e-6, 1e8)
            converged[active] = done | (damping[active] >= 1e8)
        return theta, ll, converged

    # --- the whole fit ---------------------------------------------------------------------

    @torch.no_grad()
    def fit(
        self, counts: torch.Tensor, screen: int = 3, iterations: int = 30, known: torch.Tensor | None = None, weight: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
    ) -> FitResult:  # fmt: skip
        """Fit every window of ``counts`` (B, window, window), camera counts (photo-electrons), with
        ``known`` light (B, window, window: the neighbours' streaks, default none) added to the
        model and pixel ``weight`` (B, window, window; 0: the pixel does not count, default 1).
        Without ``start`` (B, 8) every start of the coarse search is refined for ``screen``
        iterations, the most likely one per window for up to ``iterations`` more; with it, only
        the refinement from it."""
        w = self.window
        counts = torch.as_tensor(counts, dtype=torch.float32).reshape(-1, w * w)
        b = counts.shape[0]
        if b == 0:
            empty, flags = np.zeros((0, len(PARAMS)), np.float32), np.zeros(0, bool)
            return FitResult(empty, empty.copy(), np.zeros(0, np.float32), np.zeros(0, np.float32), flags, flags, flags, flags, np.zeros(0, np.float32))
        known = torch.zeros_like(counts) if known is None else torch.as_tensor(known, dtype=torch.float32).reshape(b, -1)
        weight = torch.ones_like(counts) if weight is None else torch.as_tensor(weight, dtype=torch.float32).reshape(b, -1)
        if start is None:
            starts = self._starts((counts - known).clamp(min=0).reshape(b, w, w), weight.reshape(b, w, w))
            s = starts.shape[1]

            def repeat(x: torch.Tensor) -> torch.Tensor:
                return x[:, None].expand(b, s, w * w).reshape(b * s, w * w)

            theta, ll, _ = self.refine(repeat(counts), starts.reshape(b * s, 8), screen, known=repeat(known), weight=repeat(weight))
            start = theta[ll.reshape(b, s).argmax(1) + torch.arange(b) * s]
        theta, ll, converged = self.refine(counts, torch.as_tensor(start, dtype=torch.float32), iterations, known=known, weight=weight)
        m, std = self.cramer_rao(theta, known, weight)
        at_bound = ((theta - self.lower).abs() < 1e-6) | ((self.upper - theta).abs() < 1e-6)
        at_bound[:, 4] &= theta[:, 4] > 1e-6  # v3 = 0 is a value, not a bound hit
        theta = canonical(theta)
        deviance = 2 * (weight * (torch.where(counts > 0, counts * (counts / m).log(), torch.zeros_like(counts)) - (counts - m))).sum(1)
        return FitResult(
            params=theta.numpy(), std=std.numpy(), deviance=deviance.numpy(), log_likelihood=ll.numpy(), direction_resolved=resolved(theta, std).numpy(),
            at_bound=at_bound.any(1).numpy(), converged=converged.numpy(), crosses_focus=(theta[:, 5] < 0).numpy(), pixels=weight.sum(1).numpy(),
        )  # fmt: skip


def resolved(theta: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Whether the direction of each path (B,) is resolved by the fit (canonical ``theta`` and
    its ``std``, (B, 8)): its ends differ in sharpness by more than 2 std of v3, and it moves
    laterally by more than 2 std."""
    z_start, z_end = theta[:, 5], theta[:, 5] + theta[:, 4]
    return (z_end.abs() - z_start.abs() > 2 * std[:, 4]) & (torch.hypot(theta[:, 2], theta[:, 3]) > 2 * std[:, 2:4].norm(dim=1))


def canonical(theta: torch.Tensor) -> torch.Tensor:
    """The representative of (x, y, v1, v2, v3, z0, A, b) whose mean depth z0 + v3 / 2 is >= 0:
    (v1, v2, v3, z0) and (-v1, -v2, v3, -z0 - v3) are the same image (depth sign and time reversal)."""
    out = theta.clone()
    flip = theta[:, 5] + theta[:, 4] / 2 < 0
    out[flip, 2:4] = -theta[flip, 2:4]
    out[flip, 5] = -theta[flip, 5] - theta[flip, 4]
    return out


@dataclass
class Detection:
    """The streaks found in an image: ``centres`` (N, 2) integer (row, col) of each fit window's
    centre, ``labels`` (H, W) int32 of the streaks kept (1..N, 0 elsewhere), ``neighbours`` (P, 2)
    pairs (i, j) of kept streaks where j has pixels in i's window (both ways), ``unfitted`` (H, W)
    bool: the pixels of light that no fit explains (streaks at the border, merged blobs), grown by
    MASK_GROWTH_PX; ``rejected`` {reason: count} for streaks left out and ``merged`` (M, 2) float
    (row, col) centroids of blobs wider than the fit window: several particles that no single
    streak explains."""

    centres: np.ndarray
    labels: np.ndarray
    neighbours: np.ndarray
    unfitted: np.ndarray
    rejected: dict[str, int]
    merged: np.ndarray

    def groups(self) -> np.ndarray:
        """(N,) the connected group of each streak under the neighbour relation (0, 1, ...):
        streaks of one group are fitted together."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(self.centres)
        graph = coo_matrix((np.ones(len(self.neighbours)), (self.neighbours[:, 0], self.neighbours[:, 1])), shape=(n, n))
        return connected_components(graph, directed=False)[1] if n else np.zeros(0, np.int64)


MASK_GROWTH_PX = 3  # px around a streak's detected pixels that its light still reaches (PSF tails)
POOR_FIT = 2.0  # deviance per counted window pixel above which a fit does not explain its window (about 1 for a right model)


def detect(image: np.ndarray, window: int = 64, sigma_px: float = 1.5, threshold: float = 5.0, min_area_px: int = 6) -> Detection:
    """Streaks in a camera image (H, W): the image smoothed by a Gaussian of ``sigma_px`` minus its
    background (median over blocks of ``window`` px, interpolated), thresholded at ``threshold``
    noise standard deviations (median absolute deviation of the smoothed residual); the connected
    components of at least ``min_area_px`` pixels are streaks. A component wider than the window
    (its largest extent) is several particles merged ('merged'); a streak is kept when a
    ``window`` px window centred on it lies inside the image (else 'border'). Kept streaks whose
    windows hold each other's pixels are neighbours (fitted together, blurflow.particles.fit_frames)."""
    from scipy import ndimage
    from skimage import measure, transform

    image = np.asarray(image, dtype=np.float32)
    h, w = image.shape
    smooth = ndimage.gaussian_filter(image, sigma_px)
    block = max(8, window)
    coarse = measure.block_reduce(smooth, (block, block), np.nanmedian, cval=np.nan)  # partial edge blocks: their own pixels
    background = transform.resize(coarse, (h, w), order=1, mode="edge", anti_aliasing=False)
    residual = smooth - background
    noise = 1.4826 * np.median(np.abs(residual - np.median(residual))) + 1e-6
    labels = measure.label(residual > threshold * noise)
    regions = [r for r in measure.regionprops(labels, intensity_image=np.clip(residual, 0, None)) if r.area >= min_area_px]
    half = window // 2
    rejected = {"border": 0, "merged": 0}
    keep, centres, merged, lost = [], [], [], []
    for region in regions:
        cy, cx = (round(c) for c in region.centroid_weighted)
        if region.feret_diameter_max > window:
            rejected["merged"] += 1
            merged.append(region.centroid_weighted)
            lost.append(region.label)
        elif cy - half < 0 or cx - half < 0 or cy + half > h or cx + half > w:
            rejected["border"] += 1
            lost.append(region.label)
        else:
            keep.append(region.label)
            centres.append((cy, cx))
    index = np.zeros(labels.max() + 1, np.int32)
    index[keep] = np.arange(1, len(keep) + 1)
    kept = index[labels]
    pairs = [
        (i, int(j) - 1)
        for i, (cy, cx) in enumerate(centres)
        for j in np.unique(kept[cy - half : cy + half, cx - half : cx + half])
        if j and j - 1 != i
    ]  # fmt: skip
    pairs = {p for pair in pairs for p in (pair, pair[::-1])}
    unfitted = ndimage.binary_dilation(np.isin(labels, lost), iterations=MASK_GROWTH_PX) if lost else np.zeros((h, w), bool)
    return Detection(
        np.array(centres, dtype=np.int64).reshape(-1, 2), kept, np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2), unfitted, rejected,
        np.array(merged, dtype=np.float64).reshape(-1, 2),
    )  # fmt: skip


def windows(image: np.ndarray, centres: np.ndarray, window: int) -> torch.Tensor:
    """The ``window`` px windows (N, window, window) float32 of ``image`` centred on ``centres``
    (row, col): pixel (window // 2, window // 2) of a window is its centre."""
    half = window // 2
    return torch.from_numpy(np.stack([image[y - half : y + half, x - half : x + half] for y, x in centres]).astype(np.float32)) if len(centres) else torch.zeros(0, window, window)


@dataclass
class Particles:
    """The particles fitted in a stack of frames, one row per particle: ``frame`` (N,), window
    ``centres`` (N, 2) (row, col), ``group`` (N,): particles fitted together share it (numbered
    across the stack), ``neighbours`` (N,): how many other particles' streaks reach its window,
    and the fit (``fit``: the joint estimate; its std from the joint Fisher information of the
    particle and its neighbours)."""

    frame: np.ndarray
    centres: np.ndarray
    group: np.ndarray
    neighbours: np.ndarray
    fit: FitResult


def place(patches: np.ndarray, centres: np.ndarray, pairs: np.ndarray, window: int) -> np.ndarray:
    """(N, window, window): for each window i, the sum of the patches j (N, window, window, each
    in its own window centred at centres[j]) of the pairs (i, j), where they reach window i."""
    out = np.zeros((len(centres), window, window), np.float32)
    for i, j in pairs:
        dy, dx = centres[j] - centres[i]
        if abs(dy) >= window or abs(dx) >= window:
            continue
        ys, xs = slice(max(dy, 0), window + min(dy, 0)), slice(max(dx, 0), window + min(dx, 0))  # in window i
        yj, xj = slice(max(-dy, 0), window + min(-dy, 0)), slice(max(-dx, 0), window + min(-dx, 0))  # in window j
        out[i, ys, xs] += patches[j, yj, xj]
    return out


@torch.no_grad()
def fit_frames(fitter: BeadFitter, frames: Sequence[np.ndarray], found: Sequence[Detection], rounds: int = 4, tol: float = 1e-3) -> Particles:
    """Fit the particles of every frame (camera counts) with its detection, all frames in one
    batch. A particle alone in its window is fitted alone; neighbours (streaks reaching each
    other's windows) are fitted together: first each alone with the others' pixels left out, then
    each with the others' current streaks as known light in its window, in turn, until no motion
    parameter moves by ``tol`` or after ``rounds``. Light that no fit explains (border streaks,
    merged blobs) never counts. The std of a particle with neighbours comes from the joint
    Fisher information of it and its neighbours over their windows (:func:`joint_std`)."""
    from scipy import ndimage

    w, half = fitter.window, fitter.window // 2
    counts, unfitted, others, pairs, frame, centres, group = [], [], [], [], [], [], []
    first = groups = 0
    for f, (image, det) in enumerate(zip(frames, found)):
        k = len(det.centres)
        own = np.stack([det.labels[y - half : y + half, x - half : x + half] for y, x in det.centres]) if k else np.zeros((0, w, w), np.int32)
        streaks = (own > 0) & (own != np.arange(1, k + 1)[:, None, None])  # the other particles' pixels in each window
        others.append(ndimage.binary_dilation(streaks, np.ones((1, 3, 3), bool), iterations=MASK_GROWTH_PX) if k else streaks)
        counts.append(windows(image, det.centres, w))
        unfitted.append(windows(det.unfitted.astype(np.float32), det.centres, w))
        centres.append(det.centres)
        frame.append(np.full(k, f))
        pairs.append(det.neighbours + first)
        group.append(det.groups() + groups)
        first, groups = first + k, groups + (int(group[-1].max()) + 1 if k else 0)
    counts, weight = torch.cat(counts), 1 - torch.cat(unfitted)
    centres, frame, pairs, group = np.concatenate(centres), np.concatenate(frame), np.concatenate(pairs), np.concatenate(group)
    n = len(centres)
    fit = fitter.fit(counts, weight=weight * torch.from_numpy(~np.concatenate(others)))  # each alone, its neighbours' pixels left out
    grouped = np.unique(pairs[:, 0])
    theta = torch.from_numpy(fit.params)
    for _ in range(rounds if len(grouped) else 0):
        known = torch.from_numpy(place((fitter.expected(theta) - theta[:, 7, None, None]).numpy(), centres, pairs, w))
        again = fitter.fit(counts[grouped], iterations=10, known=known[grouped], weight=weight[grouped], start=theta[grouped])
        moved = float(np.abs(again.params[:, 2:6] - theta[grouped, 2:6].numpy()).max())
        theta[grouped] = torch.from_numpy(again.params)
        for name in (f.name for f in fields(FitResult)):
            getattr(fit, name)[grouped] = getattr(again, name)
        if moved < tol:
            break
    if len(grouped):
        fit.std[grouped] = joint_std(fitter, theta, centres, frame, pairs, weight, grouped)
        fit.direction_resolved[grouped] = resolved(theta[grouped], torch.from_numpy(fit.std[grouped])).numpy()
    return Particles(frame, centres, group, np.bincount(pairs[:, 0], minlength=n), fit)


def joint_std(
    fitter: BeadFitter, theta: torch.Tensor, centres: np.ndarray, frame: np.ndarray, pairs: np.ndarray, weight: torch.Tensor, index: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Cramér-Rao standard deviations (len(index), 8) of the particles ``index`` with neighbours:
    the Poisson Fisher information of the particle's and its neighbours' parameters (position,
    motion, photons each; one background for all) over the pixels of their windows that count
    (``weight``), where the expected counts are the background plus every one of their streaks.
    A neighbour's streak over the particle's shows in its std: what the neighbour could explain
    is no longer the particle's alone."""
    w = fitter.window
    mu_all, jac_all = fitter._jacobian(theta)
    signal = (mu_all - theta[:, 7, None]).reshape(-1, w, w).numpy()
    jac_all = jac_all[:, :7].reshape(-1, 7, w, w).numpy()
    weight = weight.reshape(-1, w, w).numpy()
    out = np.zeros((len(index), 8), np.float32)
    for row, i in enumerate(index):
        members = np.concatenate([[i], pairs[pairs[:, 0] == i, 1]])
        corner = centres[members].min(0) - w // 2
        size = centres[members].max(0) - centres[members].min(0) + w
        mu = np.zeros(size, np.float64)
        seen = np.zeros(size, np.float64)
        jac = np.zeros((7 * len(members) + 1, *size), np.float64)
        for k, m in enumerate(members):
            y, x = centres[m] - w // 2 - corner
            mu[y : y + w, x : x + w] += signal[m]
            seen[y : y + w, x : x + w] = np.maximum(seen[y : y + w, x : x + w], weight[m])
            jac[7 * k : 7 * k + 7, y : y + w, x : x + w] = jac_all[m]
        mu += float(theta[members, 7].mean())
        jac[-1] = 1.0
        flat = jac.reshape(len(jac), -1) * np.sqrt(seen.reshape(-1) / mu.reshape(-1))
        cov = np.linalg.pinv(flat @ flat.T)
        std = np.sqrt(np.clip(np.diagonal(cov), 0, None))
        out[row, :7], out[row, 7] = std[:7], std[-1]
    return out


TRAINING_VARIANCE = {"v1": 1 / 3, "v2": 1 / 3, "v3": 1 / 12, "z0": 1 / 12}  # of uniform [-1, 1], [-1, 1], [0, 1], [0, 1]


@torch.no_grad()
def cramer_rao_map(
    optics: Optics, settings: list[tuple[float, float]], photons: list[float], motions: int = 48, background: float = 2.0, seed: int = 0,
) -> list[dict]:  # fmt: skip
    """The bound for one bead against the exposure: for every blur scale (L px, A um per unit speed,
    as a longer exposure scales both) and photon count, the median Cramér-Rao standard deviation
    of v1, v2, v3, z0 (normalised units) over ``motions`` motions drawn in the training ranges, and
    the ideal R^2 it allows, var / (var + mean sigma^2) with the training ranges' variance. The window
    of each setting holds its longest streak and widest defocus (required_kernel_px)."""
    from blurflow.optics import required_kernel_px

    g = torch.Generator().manual_seed(seed)
    motion = torch.rand(motions, 4, generator=g) * torch.tensor([2.0, 2.0, 1.0, 1.0]) - torch.tensor([1.0, 1.0, 0.0, 0.0])
    motion[:, 2:] = motion[:, 2:].clamp(min=0.02)  # v3 = 0 exactly: its derivative is one-sided there
    rows = []
    for lateral, axial in settings:
        scales = MotionScales(lateral, axial)
        window = max(32, required_kernel_px(optics, scales, math.sqrt(2), 2.0))
        fitter = BeadFitter(optics, scales, window + window % 2)
        for count in photons:
            theta = torch.cat([torch.zeros(motions, 2), motion, torch.full((motions, 1), float(count)), torch.full((motions, 1), background)], 1)
            std = fitter.cramer_rao(theta)[1][:, 2:6]
            row = {"lateral_scale_px": lateral, "axial_scale_um": axial, "photons": count, "window_px": fitter.window}
            for i, name in enumerate(("v1", "v2", "v3", "z0")):
                row[f"std_{name}"] = float(std[:, i].median())
                row[f"ideal_r2_{name}"] = TRAINING_VARIANCE[name] / (TRAINING_VARIANCE[name] + float((std[:, i] ** 2).mean()))
            rows.append(row)
    return rows




def fit_testset(testset: str | Path, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Fit every bead of a test set with beads on a grid (blurflow.testsets.write_beads, and the
    bead images of write_table1) in its grid cell: one row per bead with its image, index, true
    motion and photons, the fit (PARAMS), their standard deviations (``std_*``) and the flags."""
    from blurflow.data import ShardDataset

    ds = ShardDataset([testset])
    centres = np.stack([ds.attrs["bead_rows"], ds.attrs["bead_cols"]], 1)
    images = np.array(ds.attrs.get("bead_images", range(len(ds))), int)
    image_px = ds[0]["image"].shape[-1]
    per_side = round(math.sqrt(len(centres)))
    fitter = BeadFitter(Optics.from_config(ds.attrs["optics"]), MotionScales.from_config(ds.attrs["scales"]), image_px // per_side, device)
    n = len(centres)
    with h5py.File(testset) as f:  # one motion per bead, or one per image (Table 1)
        truth = np.broadcast_to(f["params"][()][images], (len(images), n, 4))
        photons = (f["quantum_efficiency"][()] * f["photons"][()])[images]
    cut = torch.cat([windows(ds[i]["image"][0].numpy(), centres, fitter.window) for i in images])
    fit = fitter.fit(cut)
    table = pd.DataFrame({"image": np.repeat(images, n), "bead": np.tile(np.arange(n), len(images))})
    for j, name in enumerate(COMPONENTS):
        table[f"true_{name}"] = truth[:, :, j].reshape(-1)
    table["true_photons"] = np.repeat(photons, n)
    for j, name in enumerate(PARAMS):
        table[name], table[f"std_{name}"] = fit.params[:, j], fit.std[:, j]
    for flag in ("direction_resolved", "crosses_focus", "at_bound", "converged"):
        table[flag] = getattr(fit, flag)
    table["deviance"] = fit.deviance
    return table


def paper_sign(estimate: np.ndarray, resolved: np.ndarray) -> np.ndarray:
    """(M, 4) (v1, v2, v3, z0) with the lateral motion of each bead whose direction is not
    resolved turned to v2 >= 0 (an orientation, signed as in the paper's tables)."""
    out = estimate.copy()
    out[:, :2] *= np.where(~resolved & (out[:, 1] < 0), -1, 1)[:, None]
    return out


def bead_scores(truth: np.ndarray, estimate: np.ndarray, scales: MotionScales, pixel_um: float, std: np.ndarray | None = None, resolved: np.ndarray | None = None) -> dict:
    """Scores of per-bead estimates (M, 4) of (v1, v2, v3, z0) against the truth (M, 4): R^2
    (squared Pearson; of |v1|, |v2| as in the paper), MAE in um (per exposure; z0 in um), the
    median orientation error (deg, beads moving > 0.1), and for a fit with ``std`` and
    ``resolved``: the share of resolved directions and of those right, the median |error| / std and
    the coverage (share of errors within 1 and 2 predicted std; an unresolved direction's sign is
    not an error)."""
    est = estimate.copy()
    same = (est[:, 0] * truth[:, 0] + est[:, 1] * truth[:, 1]) >= 0
    if resolved is not None:
        est[:, :2] *= np.where(resolved | same, 1, -1)[:, None]
    pairs = [(np.abs(truth[:, 0]), np.abs(est[:, 0])), (np.abs(truth[:, 1]), np.abs(est[:, 1])), (truth[:, 2], est[:, 2]), (truth[:, 3], est[:, 3])]
    to_um = np.array([scales.lateral_scale_px * pixel_um] * 2 + [scales.axial_scale_um] * 2)
    moving = np.hypot(truth[:, 0], truth[:, 1]) > 0.1
    angle = np.rad2deg(np.abs(np.arctan2(est[:, 1], est[:, 0]) - np.arctan2(truth[:, 1], truth[:, 0]))) % 180
    out = {
        "beads": len(truth),
        "r2": {c: float(np.corrcoef(a, b)[0, 1] ** 2) for c, (a, b) in zip(COMPONENTS, pairs)},
        "mae_um": {c: float(v) for c, v in zip(COMPONENTS, np.abs(est - truth).mean(0) * to_um)},
        "orientation_error_deg_median": float(np.median(np.minimum(angle, 180 - angle)[moving])) if moving.any() else math.nan,
    }
    out["r2"]["mean"] = float(np.mean(list(out["r2"].values())))
    if std is not None and resolved is not None:
        z = np.abs(est - truth) / std
        out["directions_resolved"] = float(resolved.mean())
        out["resolved_directions_right"] = float(same[resolved].mean()) if resolved.any() else math.nan
        out["median_error_over_std"] = {c: float(v) for c, v in zip(COMPONENTS, np.median(z, 0))}
        out["within_1_std"] = {c: float(v) for c, v in zip(COMPONENTS, (z < 1).mean(0))}
        out["within_2_std"] = {c: float(v) for c, v in zip(COMPONENTS, (z < 2).mean(0))}
    return out
