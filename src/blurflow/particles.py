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
two starts from it (the best match and the best match of the other v3 class), each refined by
Fisher scoring with Levenberg-Marquardt damping on the Poisson likelihood (analytic Jacobian,
blurflow.optics.MotionPSF with ``gradient``; all particles and starts in one batch), the start of
highest likelihood kept; a fit that ends without axial motion is tried again from axial motion in
both directions. Uncertainty: the Cramér-Rao standard deviations (inverse Poisson Fisher
information at the estimate), the deviance as goodness of fit, and flags for estimates at a bound
or not converged. Particles whose light touches are fitted together (:func:`fit_frames`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from blurflow.optics import COMPONENTS, MotionPSF, MotionScales, Optics

PARAMS = ("x_px", "y_px", "v1", "v2", "v3", "z0", "photons", "background")
MOTION = slice(2, 6)
CHUNK = 64  # kernels computed at once: their sums stay in the processor's cache (1.5x faster than all at once on 2 cores)


@dataclass
class FitResult:
    """Per particle (arrays of length B): ``params`` (B, 8) in PARAMS order, ``std`` (B, 8)
    Cramér-Rao standard deviations times the square root of ``dispersion`` (the quasi-Poisson
    std: a camera whose noise exceeds Poisson's widens it by as much), ``deviance`` (over the ``pixels`` of the window that count),
    ``log_likelihood``, ``direction_resolved``, ``at_bound``, ``converged``, ``crosses_focus``
    (the path passes through the focal plane), ``dispersion``: variance over mean of the counts
    about the fit where the particle adds less than 1 % of its peak (1 for Poisson counts; a
    camera's read noise or offset adds to it, and the deviance grows by as much)."""

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
    """

    def __init__(self, optics: Optics, scales: MotionScales, window: int = 64, device: torch.device | str = "cpu"):
        self.optics, self.scales, self.window = optics, scales, window
        self.device = torch.device(device)
        blur_px_per_um = optics.na / math.sqrt(optics.n**2 - optics.na**2) / optics.pixel_um
        self.z_max = window / 4 / blur_px_per_um / scales.axial_scale_um
        self.v_max = 0.75 * window / scales.lateral_scale_px
        depth = (self.z_max + 0.5) * scales.axial_scale_um
        # time steps of 4 px laterally and 1/8 of the axial Nyquist pitch instead of 0.5 px and 1/16: within a step the
        # lateral motion is integrated exactly and the OTF linearly, and the kernels differ from finer steps' by
        # < 0.08 of the Poisson noise at 20,000 photons (median 0.02), at about 4x the speed
        self.psf = MotionPSF(optics, scales, window, z_range_um=(-depth, depth), lateral_step_px=4.0, axial_steps_per_nyquist=8.0, device=self.device)
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lower = torch.tensor([-window / 4, -window / 4, -self.v_max, -self.v_max, 0.0, -self.z_max, 1.0, 1e-3])
        self.upper = torch.tensor([window / 4, window / 4, self.v_max, self.v_max, 2 * self.z_max, self.z_max, math.inf, math.inf])

    # --- the forward model -----------------------------------------------------------------

    def expected(self, theta: torch.Tensor) -> torch.Tensor:
        """Expected counts (B, window, window) for parameters (B, 8) in PARAMS order."""
        kernels = self.psf(theta[:, MOTION], offset_px=theta[:, :2], chunk=CHUNK)
        return theta[:, 7, None, None] + theta[:, 6, None, None] * kernels.clamp(min=0)

    def light(self, theta: torch.Tensor) -> torch.Tensor:
        """Each particle's own expected counts (B, window, window): :meth:`expected` less the background."""
        return self.expected(theta) - theta[:, 7, None, None]

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
        """Start parameters (B, 2, 8): for each window (counts less any known light), the best
        bank match and the best match of the other v3 class (< or >= 0.3); pixels of weight 0
        do not count. (A start in the wrong direction ends at v3 = 0, where
        :meth:`_probe` tries both.)"""
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
        for idx in (best, other):
            motion = params[idx]
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
        """(expected counts (B, window**2), d mu / d theta (B, 8, window**2)), analytic
        (blurflow.optics.MotionPSF with ``gradient``; where the kernel is clamped at 0, by the
        position and motion alone), written into one tensor."""
        b = theta.shape[0]
        kernels = self.psf(theta[:, MOTION], offset_px=theta[:, :2], gradient=True, chunk=CHUNK).reshape(b, 7, -1)
        jac = torch.empty(b, 8, kernels.shape[2])
        torch.mul(theta[:, 6, None, None], kernels[:, 1:], out=jac[:, :6])
        torch.clamp(kernels[:, 0], min=0, out=jac[:, 6])
        jac[:, 7] = 1.0
        return theta[:, 7, None] + theta[:, 6, None] * jac[:, 6], jac

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
        self, counts: torch.Tensor, theta: torch.Tensor, iterations: int = 30, tol: float = 1e-2, known: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Levenberg-Marquardt Fisher scoring from ``theta`` (B, 8) on counts (B, window**2) with
        ``known`` light (B, window**2, default none) and pixel ``weight`` (B, window**2, default 1);
        returns (theta, log-likelihood, converged (B,) bool). A window has converged when the
        step's predicted or achieved gain in log-likelihood is below ``tol`` (the std of a
        parameter is where it falls by 0.5); a rejected step is retried with more damping on the
        Fisher information already computed; a rejected step that promised less than NEAR ends
        the fit too (the optimum lies within about 0.3 std, where the kernel's time steps change
        their number and the likelihood its value by about as much)."""
        known = torch.zeros_like(counts) if known is None else known
        weight = torch.ones_like(counts) if weight is None else weight
        theta = self._clamp(theta.clone())
        ll = self.log_likelihood(counts, self.expected(theta).flatten(1) + known, weight)
        b = theta.shape[0]
        damping = torch.full((b,), 1e-2)
        converged, stale = torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)
        fish, grad = torch.zeros(b, 8, 8), torch.zeros(b, 8)
        for _ in range(iterations):
            active = (~converged).nonzero()[:, 0]
            if not len(active):
                break
            need = active[stale[active]]  # moved since their Fisher information was computed
            if len(need):
                m, jac = self._jacobian(theta[need])
                m, wt = m + known[need], weight[need]
                fish[need] = torch.einsum("bpn,bqn->bpq", jac * (wt / m)[:, None], jac)
                grad[need] = torch.einsum("bpn,bn->bp", jac, (counts[need] - m) * wt / m)
                stale[need] = False
            f, g = fish[active], grad[active]
            scale = torch.diagonal(f, dim1=1, dim2=2).clamp(min=1e-12)
            system = f + damping[active, None, None] * torch.diag_embed(scale)
            step = torch.linalg.solve(system, g[..., None])[..., 0]
            # a parameter at a bound that the step would push beyond is held (its row and column out), and the rest solved again
            th = theta[active]
            free = ~(((th <= self.lower + 1e-6) & (step < 0)) | ((th >= self.upper - 1e-6) & (step > 0)))
            g = g * free
            system = system * (free[:, :, None] & free[:, None, :]) + torch.diag_embed(scale * ~free)
            step = torch.linalg.solve(system, g[..., None])[..., 0]
            gain = (step * g).sum(1)  # about twice the predicted gain
            small = gain < 2 * tol
            go = active[~small]
            trial = self._clamp(theta[go] + step[~small])
            trial_ll = self.log_likelihood(counts[go], self.expected(trial).flatten(1) + known[go], weight[go])
            ll_before = ll[go]
            better = trial_ll > ll_before
            done = better & (trial_ll - ll[go] < tol)
            theta[go] = torch.where(better[:, None], trial, theta[go])
            ll[go] = torch.where(better, trial_ll, ll[go])
            stale[go] = better
            ratio = (trial_ll - ll_before) / (0.5 * gain[~small])  # achieved over predicted gain
            damping[go] = torch.where(better, damping[go] * torch.where(ratio > 0.75, 1 / 3, torch.where(ratio < 0.25, 2.0, 1.0)), damping[go] * 10).clamp(
                1e-6, 1e8
            )
            converged[active[small]] = True
            converged[go] = done | (damping[go] >= 1e8) | (~better & (gain[~small] < 2 * NEAR))
        return theta, ll, converged

    def _probe(
        self, counts: torch.Tensor, theta: torch.Tensor, ll: torch.Tensor, converged: torch.Tensor, known: torch.Tensor, weight: torch.Tensor,
        iterations: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Fits that end where Fisher scoring cannot leave a wrong answer are refined again from
        other starts, in both lateral directions, and the most likely kept. Without axial motion
        (v3 < STILL_V3): from v3 = PROBE_V3 about the same mean depth (at v3 = 0 the derivative by
        v3 is half that by z0, so a fit that started in the wrong direction ends there). Through
        focus (z0 < 0 < z0 + v3): from v3 = STILL_V3 at the path's root-mean-square depth (a path
        through focus blurs about as one that stays at that depth, two optima apart)."""
        z0, v3 = theta[:, 5], theta[:, 4]
        still, through = (v3 < STILL_V3).nonzero()[:, 0], ((z0 < 0) & (z0 + v3 > 0)).nonzero()[:, 0]
        which = torch.cat([still, through])
        if not len(which):
            return theta, ll, converged
        probes = theta[which, None].repeat(1, 2, 1)
        probes[:, 1, 2:4] *= -1  # either direction: at v3 = 0 the two are one image
        rms = (z0[through] ** 2 + z0[through] * v3[through] + v3[through] ** 2 / 3).sqrt()
        depth = torch.cat([z0[still] + (v3[still] - PROBE_V3) / 2, rms - STILL_V3 / 2])
        probes[:, :, 4] = torch.cat([torch.full((len(still),), PROBE_V3), torch.full((len(through),), STILL_V3)])[:, None]
        probes[:, :, 5] = depth[:, None]
        tried, tried_ll, tried_ok = self.refine(
            counts[which].repeat_interleave(2, 0), probes.reshape(-1, 8), iterations,
            known=known[which].repeat_interleave(2, 0), weight=weight[which].repeat_interleave(2, 0),
        )  # fmt: skip
        best = tried_ll.reshape(-1, 2).argmax(1) + torch.arange(len(which)) * 2
        better = tried_ll[best] > ll[which]
        theta[which[better]], ll[which[better]], converged[which[better]] = tried[best[better]], tried_ll[best[better]], tried_ok[best[better]]
        return theta, ll, converged

    # --- the whole fit ---------------------------------------------------------------------

    @torch.no_grad()
    def fit(
        self, counts: torch.Tensor, screen: int = 3, iterations: int = 25, known: torch.Tensor | None = None, weight: torch.Tensor | None = None,
        start: torch.Tensor | None = None, also: bool = False,
    ) -> FitResult:  # fmt: skip
        """Fit every window of ``counts`` (B, window, window), camera counts (photo-electrons), with
        ``known`` light (B, window, window: the neighbours' streaks, default none) added to the
        model and pixel ``weight`` (B, window, window; 0: the pixel does not count, default 1).
        Without ``start`` (B, 8) every start of the coarse search is refined for ``screen``
        iterations, the most likely one per window for up to ``iterations`` more; with it, only
        the refinement from it, or with ``also`` it is one more start of the search."""
        w = self.window
        counts = torch.as_tensor(counts, dtype=torch.float32).reshape(-1, w * w)
        b = counts.shape[0]
        if b == 0:
            empty, flags = np.zeros((0, len(PARAMS)), np.float32), np.zeros(0, bool)
            nothing = np.zeros(0, np.float32)
            return FitResult(empty, empty.copy(), nothing, nothing, flags, flags, flags, flags, nothing, nothing)
        known = torch.zeros_like(counts) if known is None else torch.as_tensor(known, dtype=torch.float32).reshape(b, -1)
        weight = torch.ones_like(counts) if weight is None else torch.as_tensor(weight, dtype=torch.float32).reshape(b, -1)
        if start is None or also:
            starts = self._starts((counts - known).clamp(min=0).reshape(b, w, w), weight.reshape(b, w, w))
            if start is not None:
                starts = torch.cat([starts, torch.as_tensor(start, dtype=torch.float32)[:, None]], 1)
            s = starts.shape[1]

            def repeat(x: torch.Tensor) -> torch.Tensor:
                return x[:, None].expand(b, s, w * w).reshape(b * s, w * w)

            theta, ll, _ = self.refine(repeat(counts), starts.reshape(b * s, 8), screen, known=repeat(known), weight=repeat(weight))
            start = theta[ll.reshape(b, s).argmax(1) + torch.arange(b) * s]
        theta, ll, converged = self.refine(counts, torch.as_tensor(start, dtype=torch.float32), iterations, known=known, weight=weight)
        theta, ll, converged = self._probe(counts, theta, ll, converged, known, weight, iterations)
        m, std = self.cramer_rao(theta, known, weight)
        at_bound = ((theta - self.lower).abs() < 1e-6) | ((self.upper - theta).abs() < 1e-6)
        at_bound[:, 4] &= theta[:, 4] > 1e-6  # v3 = 0 is a value, not a bound hit
        theta = canonical(theta)
        deviance = 2 * (weight * (torch.where(counts > 0, counts * (counts / m).log(), torch.zeros_like(counts)) - (counts - m))).sum(1)
        signal = m - known - theta[:, 7, None]
        quiet = (weight * (signal < 0.01 * signal.amax(1, keepdim=True))).clamp(max=1)
        dispersion = ((quiet * (counts - m) ** 2).sum(1) / (quiet * m).sum(1).clamp(min=1e-6)).clamp(min=1)
        std = std * dispersion.sqrt()[:, None]  # quasi-Poisson: noise beyond Poisson widens the bound by as much
        return FitResult(
            params=theta.numpy(), std=std.numpy(), deviance=deviance.numpy(), log_likelihood=ll.numpy(), direction_resolved=resolved(theta, std).numpy(),
            at_bound=at_bound.any(1).numpy(), converged=converged.numpy(), crosses_focus=(theta[:, 5] < 0).numpy(), pixels=weight.sum(1).numpy(),
            dispersion=dispersion.numpy(),
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
    MASK_GROWTH_PX; ``rejected`` {reason: count} for streaks left out, ``merged`` (M, 2) float
    (row, col) centroids of blobs wider than the fit window: several particles that no single
    streak explains, and ``touching`` (T, 2): the neighbours whose light reaches each other's
    streak (pixels within twice MASK_GROWTH_PX): fitted together."""

    centres: np.ndarray
    labels: np.ndarray
    neighbours: np.ndarray
    unfitted: np.ndarray
    rejected: dict[str, int]
    merged: np.ndarray
    touching: np.ndarray

    def groups(self) -> np.ndarray:
        """(N,) the connected group of each streak under the ``touching`` relation (0, 1, ...):
        streaks of one group are fitted together."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(self.centres)
        graph = coo_matrix((np.ones(len(self.touching)), (self.touching[:, 0], self.touching[:, 1])), shape=(n, n))
        return connected_components(graph, directed=False)[1] if n else np.zeros(0, np.int64)


NEAR = 0.05  # log-likelihood gain a rejected step must promise for the fit to go on (BeadFitter.refine)
STILL_V3, PROBE_V3 = 0.05, 0.4  # fits with less axial motion than STILL_V3 are tried again from PROBE_V3 (BeadFitter._probe)
TOUCH_PX = 12  # px between two streaks' detected pixels within which their light is fitted together (defocus tails)
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
    unfitted = ndimage.binary_dilation(np.isin(labels, lost), iterations=MASK_GROWTH_PX) if lost else np.zeros((h, w), bool)
    centres = np.array(centres, dtype=np.int64).reshape(-1, 2)
    near, touching = neighbour_pairs(kept, centres, window)
    return Detection(centres, kept, near, unfitted, rejected, np.array(merged, dtype=np.float64).reshape(-1, 2), touching)


def neighbour_pairs(labels: np.ndarray, centres: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of (P, 2) sorted pairs (i, j), both ways, of streaks (``labels`` 1..N of the
    image): j has pixels in the ``window`` px window centred on streak i's ``centres`` (row,
    col); and of those, j has pixels within 2 MASK_GROWTH_PX of i's (their light touches)."""
    from scipy import ndimage

    half, reach = window // 2, TOUCH_PX
    pairs = {
        pair
        for i, (cy, cx) in enumerate(centres)
        for j in np.unique(labels[cy - half : cy + half, cx - half : cx + half])
        if j and j - 1 != i
        for pair in ((i, int(j) - 1), (int(j) - 1, i))
    }  # fmt: skip
    touching = set()
    for i, box in enumerate(ndimage.find_objects(labels, len(centres))):
        if box is None:
            continue
        box = tuple(slice(max(b.start - reach, 0), b.stop + reach) for b in box)
        near = ndimage.binary_dilation(labels[box] == i + 1, iterations=reach)
        touching |= {pair for j in np.unique(labels[box][near]) if j and j - 1 != i for pair in ((i, int(j) - 1), (int(j) - 1, i))}
    return tuple(np.array(sorted(p), dtype=np.int64).reshape(-1, 2) for p in (pairs, touching))


def windows(image: np.ndarray, centres: np.ndarray, window: int) -> torch.Tensor:
    """The ``window`` px windows (N, window, window) float32 of ``image`` centred on ``centres``
    (row, col): pixel (window // 2, window // 2) of a window is its centre."""
    half = window // 2
    return (
        torch.from_numpy(np.stack([image[y - half : y + half, x - half : x + half] for y, x in centres]).astype(np.float32))
        if len(centres)
        else torch.zeros(0, window, window)
    )


@dataclass
class Particles:
    """The particles fitted in a stack of frames, one row per particle: ``frame`` (N,), window
    ``centres`` (N, 2) (row, col), ``group`` (N,): particles fitted together share it (numbered
    across the stack), ``neighbours`` (N,): how many other particles' light touches its streak,
    the fit (``fit``: the joint estimate; its std from the joint Fisher information of the
    particle and its neighbours) and the ``detections`` of every frame as fitted (streaks split
    where a fit showed two)."""

    frame: np.ndarray
    centres: np.ndarray
    group: np.ndarray
    neighbours: np.ndarray
    fit: FitResult
    detections: list[Detection]


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


@dataclass
class _Stack:
    """The fit windows of every particle of a stack of frames (N of them): ``counts`` (N, w*w),
    ``weight`` (N, w*w): 0 on light no fit explains, ``own`` (N, w, w) bool: the particle's
    detected pixels, ``others`` (N, w, w) bool: the other particles' (grown by MASK_GROWTH_PX),
    ``centres`` (N, 2), ``frame`` (N,), ``pairs`` (P, 2) of neighbours, ``touching`` (T, 2) of
    those whose light touches (Detection.touching), ``group`` (N,)."""

    counts: torch.Tensor
    weight: torch.Tensor
    own: np.ndarray
    others: np.ndarray
    centres: np.ndarray
    frame: np.ndarray
    pairs: np.ndarray
    touching: np.ndarray
    group: np.ndarray

    @classmethod
    def of(cls, frames: Sequence[np.ndarray], found: Sequence[Detection], w: int) -> _Stack:
        from scipy import ndimage

        half = w // 2
        parts: dict[str, list] = {k: [] for k in ("counts", "unfitted", "own", "others", "centres", "frame", "pairs", "touching", "group")}
        first = groups = 0
        for f, (image, det) in enumerate(zip(frames, found)):
            k = len(det.centres)
            labels = np.stack([det.labels[y - half : y + half, x - half : x + half] for y, x in det.centres]) if k else np.zeros((0, w, w), np.int32)
            own = labels == np.arange(1, k + 1)[:, None, None]
            parts["own"].append(own)
            parts["others"].append(ndimage.binary_dilation((labels > 0) & ~own, np.ones((1, 3, 3), bool), iterations=MASK_GROWTH_PX) if k else own)
            parts["counts"].append(windows(image, det.centres, w))
            parts["unfitted"].append(windows(det.unfitted.astype(np.float32), det.centres, w))
            parts["centres"].append(det.centres)
            parts["frame"].append(np.full(k, f))
            parts["pairs"].append(det.neighbours + first)
            parts["touching"].append(det.touching + first)
            group = det.groups()
            parts["group"].append(group + groups)
            first, groups = first + k, groups + (int(group.max()) + 1 if k else 0)
        return cls(
            torch.cat(parts["counts"]).flatten(1), 1 - torch.cat(parts["unfitted"]).flatten(1),
            *(np.concatenate(parts[k]) for k in ("own", "others", "centres", "frame", "pairs", "touching", "group")),
        )  # fmt: skip

    def signals(self, fitter: BeadFitter, theta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(each particle's own light, the light of its neighbours' streaks in its window), both
        (N, w, w) float32, for parameters ``theta`` (N, 8)."""
        return _light(fitter, theta, self.centres, self.pairs)


def _light(fitter: BeadFitter, theta: torch.Tensor, centres: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each particle's own light, the light of its neighbours ``pairs`` in its window), both
    (N, w, w) float32, for parameters ``theta`` (N, 8) of windows centred on ``centres``."""
    own = fitter.light(theta).numpy()
    return own, place(own, centres, pairs, fitter.window)


def _fit_groups(fitter: BeadFitter, stack: _Stack, index: np.ndarray, rounds: int, tol: float, previous: FitResult | None = None) -> FitResult:
    """The fits of the particles ``index`` of ``stack`` (whole groups): each alone with its
    neighbours' pixels left out (up to FIRST_ITERATIONS), then those that touch another with
    their neighbours' current streaks as known light in the window, in turn (the first time also
    from the coarse search's starts), until no motion parameter moves by ``tol`` of its std or
    after ``rounds``. With ``previous`` (fits of ``index``, NaN where there is none) those with a
    fit start the rounds from it."""
    local = np.full(len(stack.centres), -1)
    local[index] = np.arange(len(index))
    pairs = local[stack.pairs[np.isin(stack.pairs[:, 0], index)]]
    touching = local[stack.touching[np.isin(stack.touching[:, 0], index)]]
    counts, weight, centres = stack.counts[index], stack.weight[index], stack.centres[index]
    fresh = np.ones(len(index), bool) if previous is None else np.isnan(previous.params[:, 0])
    alone = weight * torch.from_numpy(~stack.others[index]).flatten(1)
    fit = previous or fitter.fit(counts, iterations=FIRST_ITERATIONS, weight=alone)
    if previous is not None:
        fit.update(fresh, fitter.fit(counts[fresh], iterations=FIRST_ITERATIONS, weight=alone[fresh]))
    grouped = np.unique(touching[:, 0])
    theta = torch.from_numpy(fit.params)
    for r in range(rounds if len(grouped) else 0):
        known = torch.from_numpy(_light(fitter, theta, centres, pairs)[1])
        again = fitter.fit(counts[grouped], iterations=6, known=known[grouped], weight=weight[grouped], start=theta[grouped], also=r == 0 and previous is None)
        moved = float((np.abs(again.params[:, 2:6] - theta[grouped, 2:6].numpy()) / np.maximum(again.std[:, 2:6], 1e-6)).max())
        theta[grouped] = torch.from_numpy(again.params)
        fit.update(grouped, again)
        if moved < tol:
            break
    return fit


def _finish(fitter: BeadFitter, stack: _Stack, fit: FitResult) -> None:
    """Fits short of convergence go on (up to 25 iterations, their neighbours' light held: alone
    with the other streaks' pixels left out, or with the light of those that touch known); then
    the std of every particle that touches another comes from their joint Fisher information
    (:func:`joint_std`, times the square root of the particle's dispersion). In place."""
    grouped = np.zeros(len(stack.centres), bool)
    grouped[stack.touching[:, 0]] = True
    weight = torch.where(torch.from_numpy(grouped)[:, None], stack.weight, stack.weight * torch.from_numpy(~stack.others).flatten(1))
    theta = torch.from_numpy(fit.params)
    stuck = np.flatnonzero(~fit.converged)
    if len(stuck):
        _, known = stack.signals(fitter, theta)
        fit.update(stuck, fitter.fit(stack.counts[stuck], iterations=25, known=torch.from_numpy(known[stuck]), weight=weight[stuck], start=theta[stuck]))
    index = np.flatnonzero(grouped)
    if len(index):
        fit.std[index] = (
            joint_std(fitter, torch.from_numpy(fit.params), stack.centres, stack.touching, stack.weight, index) * np.sqrt(fit.dispersion[index])[:, None]
        )
        fit.direction_resolved[index] = resolved(torch.from_numpy(fit.params[index]), torch.from_numpy(fit.std[index])).numpy()


FIRST_ITERATIONS = 10  # of a particle's first fit: those that need more (often two streaks as one) wait for the split (fit_frames)
SPLIT_SIGMA = 4.0  # smoothed Pearson residual, in its noise std, above which light is left unexplained
SPLIT_SHARE = 0.15  # share of the particle's photons that unexplained light must hold to be another particle


PAIR_GAIN = 50.0  # log-likelihood gain, per unit of the window's dispersion, at which two particles explain a streak better than one
PAIR_DEVIANCE = 1.1  # deviance per counted pixel and unit of dispersion above which a one-particle fit is tried as two


def _pair_trial(
    fitter: BeadFitter, counts: torch.Tensor, weight: torch.Tensor, known: torch.Tensor, theta: torch.Tensor, own: np.ndarray, rounds: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Two particles fitted in each window of ``counts`` (P, w*w) with pixel ``weight`` and
    ``known`` light (P, w*w), against its one-particle fit ``theta`` (P, 8) and its streak's
    pixels ``own`` (P, w, w) bool. Three starts: the streak's pixels split in two across either
    of its axes (of its light's second moments), each half's best bank match with the other
    half's pixels left out; and the one-particle fit with the best bank match of the light it
    leaves. From each, each particle is refined with the other's light known, ``rounds`` times;
    the more likely pair is kept. Returns (P,) the log-likelihood gain of two particles over one,
    the pair (P, 2, 8) and (P, w, w) bool: the streak's pixels where the second particle's light
    exceeds the first's."""
    p, w = len(theta), fitter.window
    one_mu = fitter.expected(theta).flatten(1) + known
    light = (counts - known - theta[:, 7, None]).clamp(min=0).reshape(p, w, w).numpy() * own
    rows, cols = np.mgrid[:w, :w]
    mass = light.sum((1, 2)) + 1e-9
    cy, cx = (light * rows).sum((1, 2)) / mass, (light * cols).sum((1, 2)) / mass
    dy, dx = rows - cy[:, None, None], cols - cx[:, None, None]
    syy, sxx, sxy = ((light * dy * dy).sum((1, 2)), (light * dx * dx).sum((1, 2)), (light * dx * dy).sum((1, 2)))
    angle = 0.5 * np.arctan2(2 * sxy, sxx - syy)[:, None, None] + np.array([0, np.pi / 2])[:, None, None, None]  # (2, P, 1, 1): the streak's axes
    second = own & (dx * np.cos(angle) + dy * np.sin(angle) > 0)  # (2, P, w, w): the halves across each axis
    halves = torch.from_numpy(np.stack([~second, ~(own & ~second)], 1).reshape(4 * p, -1).astype(np.float32))  # (axis, member, window)
    free = (counts - known).clamp(min=0)
    split = fitter._starts(free.repeat(4, 1).reshape(-1, w, w), (weight.repeat(4, 1) * halves).reshape(-1, w, w))[:, 0]
    extra = fitter._starts((counts - one_mu).clamp(min=0).reshape(-1, w, w), weight.reshape(-1, w, w))[:, 0]
    kept = theta.clone()
    kept[:, 6] = (theta[:, 6] - extra[:, 6]).clamp(min=0.5 * theta[:, 6])
    pair = torch.cat([split, kept, extra])  # (6P, 8): (start, member, window): (halves, halves, one plus the rest) x (first, second)
    counts6, known6, weight6 = counts.repeat(6, 1), known.repeat(6, 1), weight.repeat(6, 1)
    for _ in range(rounds):
        signal = fitter.light(pair).reshape(3, 2, p, -1)
        pair = fitter.refine(counts6, pair, 6, known=known6 + signal.flip(1).reshape(6 * p, -1), weight=weight6)[0]  # the partner's light known
    signal = fitter.light(pair).reshape(3, 2, p, -1)
    pair = pair.reshape(3, 2, p, 8)
    two = torch.stack([fitter.log_likelihood(counts, pair[c, 0, :, 7, None] + signal[c].sum(0) + known, weight) for c in range(3)])
    best, every = two.argmax(0), torch.arange(p)
    pair, signal = pair[best, :, every], signal[best, :, every]  # (P, 2, ...): the more likely start's pair
    gain = two.max(0).values - fitter.log_likelihood(counts, one_mu, weight)
    return gain.numpy(), pair.numpy(), own & (signal[:, 1] > signal[:, 0]).reshape(p, w, w).numpy()


def _split(
    fitter: BeadFitter, stack: _Stack, fit: FitResult, found: list[Detection], image_shape: Sequence[tuple[int, int]], settled: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:  # fmt: skip
    """Split the streaks that hold two particles: where the residual (Pearson, smoothed by a
    1.5 px Gaussian) of a particle's own detected pixels exceeds SPLIT_SIGMA of its noise over at
    least 6 px and holds SPLIT_SHARE of the particle's photons, those pixels (grown by 2 px)
    become a new streak; but where two particles fitted in its window (:func:`_pair_trial`, for
    fits that explain their window poorly, PAIR_DEVIANCE, or did not converge, and are not
    ``settled``: (N,) bool, unchanged since the last pass) gain PAIR_GAIN times its dispersion in
    log-likelihood over one, each with SPLIT_SHARE of their photons, the pixels where the
    second's light is the larger become the new streak, and the pair's fits the two streaks'
    starts. The new streak gets its own window, and the rest stays the particle's, re-centred.
    ``found`` is updated in place; returns (N,) whether each particle of ``stack`` was split, and
    the starts {(frame, label): parameters (8,) in the label's window}."""
    from scipy import ndimage

    w, half = fitter.window, fitter.window // 2
    split = np.zeros(len(stack.centres), bool)
    starts: dict[tuple[int, int], np.ndarray] = {}
    if not len(split):
        return split, starts
    theta = torch.from_numpy(fit.params)
    own_light, known = stack.signals(fitter, theta)
    mu = own_light + known + fit.params[:, 7, None, None]
    counts = stack.counts.reshape(-1, w, w).numpy()
    pearson = ndimage.gaussian_filter((counts - mu) / np.sqrt(np.maximum(mu, 1e-3)), (0, 1.5, 1.5))
    seen = stack.weight.reshape(-1, w, w).numpy() > 0
    quiet = np.where(seen, pearson, np.nan).reshape(len(counts), -1)
    noise = np.nan_to_num(1.4826 * np.nanmedian(np.abs(quiet - np.nanmedian(quiet, 1, keepdims=True)), 1), nan=np.inf)
    blobs, n = ndimage.label(
        stack.own & seen & (pearson > SPLIT_SIGMA * noise[:, None, None]), np.array([np.zeros((3, 3)), [[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.zeros((3, 3))])
    )
    new: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # particle -> (the new streak's pixels in its window, the pair's fits)
    if n:
        ids = np.arange(1, n + 1)
        area = ndimage.sum_labels(np.ones_like(counts), blobs, ids)
        excess = ndimage.sum_labels(counts - mu, blobs, ids)
        owner = np.array([box[0].start for box in ndimage.find_objects(blobs)])  # the window (plane) of each blob
        strong = (area >= 6) & (excess >= SPLIT_SHARE * fit.params[owner, 6])
        for i in np.unique(owner[strong]):
            best = ids[strong & (owner == i)][np.argmax(excess[strong & (owner == i)])]
            new[int(i)] = ndimage.binary_dilation(blobs[i] == best, iterations=2) & stack.own[i], None
    poor = (fit.deviance > PAIR_DEVIANCE * fit.dispersion * np.maximum(fit.pixels, 1)) | ~fit.converged
    trial = np.flatnonzero(poor & (True if settled is None else ~settled))
    if len(trial):
        gain, pair, second = _pair_trial(
            fitter, stack.counts[trial], stack.weight[trial], torch.from_numpy(known[trial]).flatten(1), theta[trial], stack.own[trial]
        )
        share = pair[:, :, 6].min(1) / pair[:, :, 6].sum(1)
        for k in np.flatnonzero((gain > PAIR_GAIN * fit.dispersion[trial]) & (share >= SPLIT_SHARE)):
            new[int(trial[k])] = second[k], pair[k]  # the fitted pair's partition before the residual's
    for i, (pixels, pair) in sorted(new.items()):
        f = stack.frame[i]
        det, (cy, cx), label = found[f], stack.centres[i], i - np.searchsorted(stack.frame, f) + 1
        streak = np.zeros(image_shape[f], bool)
        streak[cy - half : cy + half, cx - half : cx + half] = pixels
        remaining = (det.labels == label) & ~streak
        if remaining.sum() < 6 or streak.sum() < 6:
            continue
        det.labels[streak] = len(det.centres) + 1
        det.centres[label - 1] = _centre(remaining, half, image_shape[f])
        det.centres = np.concatenate([det.centres, _centre(streak, half, image_shape[f])[None]])
        split[i] = True
        for member, where in zip(() if pair is None else pair, (label, len(det.centres))):
            start = member.copy()
            start[[1, 0]] += (cy, cx) - det.centres[where - 1]  # the midpoint's offset from the new window's centre
            starts[(int(f), int(where))] = start
    for f in np.unique(stack.frame[split]):
        found[f].neighbours, found[f].touching = neighbour_pairs(found[f].labels, found[f].centres, w)
    return split, starts


def _centre(pixels: np.ndarray, half: int, shape: tuple[int, int]) -> np.ndarray:
    """(row, col) of the centroid of ``pixels`` (H, W) bool, moved where a window of 2 ``half``
    px centred on it lies inside the image."""
    rows, cols = np.nonzero(pixels)
    return np.array([min(max(round(rows.mean()), half), shape[0] - half), min(max(round(cols.mean()), half), shape[1] - half)], np.int64)


@torch.no_grad()
def fit_frames(
    fitter: BeadFitter, frames: Sequence[np.ndarray], found: Sequence[Detection], rounds: int = 3, tol: float = 0.1, splits: int = 2,
) -> Particles:  # fmt: skip
    """Fit the particles of every frame (camera counts) with its detection, all frames in one
    batch. A particle alone in its window is fitted alone; neighbours (streaks reaching each
    other's windows) are fitted together (:func:`_fit_groups`). Light that no fit explains
    (border streaks, merged blobs) never counts. Streaks that touch are detected as one: up to
    ``splits`` times, a streak whose fit leaves another streak's worth of its light unexplained
    is split in two, or one whose fit explains it poorly and which two particles explain much
    better (:func:`_split`), and its group fitted again. The detections returned
    (``Particles.detections``) are copies of ``found`` with the split streaks."""
    found = [replace(d, labels=d.labels.copy(), centres=d.centres.copy()) for d in found]
    shapes = [np.shape(f) for f in frames]
    stack = _Stack.of(frames, found, fitter.window)
    fit = _fit_groups(fitter, stack, np.arange(len(stack.centres)), rounds, tol)
    settled = None
    for _ in range(splits):
        split, starts = _split(fitter, stack, fit, found, shapes, settled)
        if not split.any():
            break
        old = stack
        stack = _Stack.of(frames, found, fitter.window)
        local = np.arange(len(stack.frame)) - np.searchsorted(stack.frame, stack.frame)  # a particle's place in its frame: kept by a split
        kept = np.searchsorted(old.frame, stack.frame) + local
        kept = np.where(local < np.bincount(old.frame, minlength=len(frames))[stack.frame], kept, -1)
        kept[kept >= 0] = np.where(split[kept[kept >= 0]], -1, kept[kept >= 0])
        redo = np.flatnonzero(np.isin(stack.group, stack.group[kept < 0]))
        fit = fit.take(np.maximum(kept, 0))
        fit.params[kept < 0] = np.nan
        for (f, label), start in starts.items():  # a fitted pair's members start from their fits
            fit.params[np.searchsorted(stack.frame, f) + label - 1] = start
        fit.update(redo, _fit_groups(fitter, stack, redo, rounds, tol, previous=fit.take(redo)))
        settled = ~np.isin(np.arange(len(stack.frame)), redo)
    _finish(fitter, stack, fit)
    return Particles(stack.frame, stack.centres, stack.group, np.bincount(stack.touching[:, 0], minlength=len(stack.centres)), fit, found)


def joint_std(
    fitter: BeadFitter, theta: torch.Tensor, centres: np.ndarray, pairs: np.ndarray, weight: torch.Tensor, index: np.ndarray,
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


def match(particles: Particles, midpoints: Sequence[np.ndarray], distance_px: float = 3.0) -> list[np.ndarray]:
    """For every frame, the index into ``particles`` of the fit of each true path midpoint
    (``midpoints``: (M, 2) (row, col) per frame), -1 where no fit that converged and explains its
    window (FitResult.poor_fit) lies within ``distance_px``; nearest pairs first, each fit once."""
    fitted = particles.centres + particles.fit.params[:, [1, 0]]  # (row, col) of each fit's midpoint
    good = ~particles.fit.poor_fit() & particles.fit.converged
    out = []
    for frame, truth in enumerate(midpoints):
        mine = np.flatnonzero((particles.frame == frame) & good)
        index = np.full(len(truth), -1)
        if len(mine) and len(truth):
            dist = np.hypot(*(fitted[mine, None, :] - np.asarray(truth)[None]).transpose(2, 0, 1))
            for f, t in zip(*np.unravel_index(np.argsort(dist, axis=None), dist.shape)):
                if dist[f, t] >= distance_px:
                    break
                if index[t] < 0 and mine[f] not in index:
                    index[t] = mine[f]
        out.append(index)
    return out


def fit_dense_testset(testset: str | Path, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Detect and fit the beads of a dense bead test set (blurflow.testsets.write_beads_dense), all
    images in one batch, neighbours together (:func:`fit_frames`), and match the fits to the
    beads (:func:`match`): one row per bead with its image, index, true motion and photons,
    ``fitted`` and, where fitted, the fit (PARAMS), its std (``std_*``), the flags and the
    number of neighbours (NaN where not)."""
    from blurflow.data import ShardDataset

    ds = ShardDataset([testset])
    midpoints = [np.stack([r, c], 1) for r, c in zip(ds.attrs["bead_rows"], ds.attrs["bead_cols"])]
    fitter = BeadFitter(Optics.from_config(ds.attrs["optics"]), MotionScales.from_config(ds.attrs["scales"]), int(ds.attrs["window"]), device)
    images = [ds[i]["image"][0].numpy() for i in range(len(ds))]
    parts = fit_frames(fitter, images, [detect(image, fitter.window) for image in images])
    index = np.concatenate(match(parts, midpoints))
    with h5py.File(testset) as f:
        truth = np.concatenate([p[: len(m)] for p, m in zip(f["params"][()], midpoints)])
        photons = np.repeat(f["quantum_efficiency"][()] * f["photons"][()], [len(m) for m in midpoints])
    table = pd.DataFrame(
        {"image": np.repeat(np.arange(len(images)), [len(m) for m in midpoints]), "bead": np.concatenate([np.arange(len(m)) for m in midpoints])}
    )
    for j, name in enumerate(COMPONENTS):
        table[f"true_{name}"] = truth[:, j]
    table["true_photons"] = photons
    table["fitted"] = index >= 0
    fit, at = parts.fit, np.maximum(index, 0)
    for j, name in enumerate(PARAMS):
        table[name] = np.where(index >= 0, fit.params[at, j], np.nan)
        table[f"std_{name}"] = np.where(index >= 0, fit.std[at, j], np.nan)
    for flag in ("direction_resolved", "crosses_focus", "at_bound", "converged"):
        table[flag] = np.where(index >= 0, getattr(fit, flag)[at], False)
    table["deviance"] = np.where(index >= 0, fit.deviance[at], np.nan)
    table["neighbours"] = np.where(index >= 0, parts.neighbours[at], -1)
    return table


def bead_scores(
    truth: np.ndarray, estimate: np.ndarray, scales: MotionScales, pixel_um: float, std: np.ndarray | None = None, resolved: np.ndarray | None = None
) -> dict:
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
