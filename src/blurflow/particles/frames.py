"""Particle mode, neighbours and frames: the particles of a stack of frames fitted in one batch, those whose light
touches fitted together, streaks that hold two particles split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from blurflow.particles.detection import MASK_GROWTH_PX, Detection, neighbour_pairs, windows
from blurflow.particles.fit import BeadFitter, FitResult, resolved


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
    own = fitter.light(theta).cpu().numpy()
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
TYPICAL_FITS = 10  # fits from which the median deviance tells how well the PSF model explains a stack (_split)
PAIR_DEVIANCE = 1.1  # deviance per counted pixel and unit of dispersion above which a one-particle fit is tried as two


def _pair_trial(
    fitter: BeadFitter, counts: torch.Tensor, weight: torch.Tensor, known: torch.Tensor, theta: torch.Tensor, own: np.ndarray, rounds: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Two particles fitted in each window of ``counts`` (P, w*w) with pixel ``weight`` and
    ``known`` light (P, w*w), against its one-particle fit ``theta`` (P, 8) and its streak's
    pixels ``own`` (P, w, w) bool. Three starts: the streak's pixels split in two across either
    of its axes (of its light's second moments), each half's best bank match with the other
    half's pixels left out; and the one-particle fit with the best bank match of the light it
    leaves. From each, each particle is refined with the other's light known; then the likeliest
    start's pair alone, ``rounds`` - 1 times more (all three for both rounds: 1.1x slower on the
    dense benchmark, 93.8 % fitted instead of 92.7 %, the mean R² 0.953 instead of 0.947).
    Returns (P,) the log-likelihood gain of two particles over one, the pair (P, 2, 8) and
    (P, w, w) bool: the streak's pixels where the second particle's light exceeds the first's."""
    p, w = len(theta), fitter.window
    counts, weight, known, theta = (fitter._on(x) for x in (counts, weight, known, theta))  # on the fitter's device
    one_mu = fitter.expected(theta).flatten(1) + known
    light = (counts - known - theta[:, 7, None]).clamp(min=0).reshape(p, w, w).cpu().numpy() * own
    rows, cols = np.mgrid[:w, :w]
    mass = light.sum((1, 2)) + 1e-9
    cy, cx = (light * rows).sum((1, 2)) / mass, (light * cols).sum((1, 2)) / mass
    dy, dx = rows - cy[:, None, None], cols - cx[:, None, None]
    syy, sxx, sxy = ((light * dy * dy).sum((1, 2)), (light * dx * dx).sum((1, 2)), (light * dx * dy).sum((1, 2)))
    angle = 0.5 * np.arctan2(2 * sxy, sxx - syy)[:, None, None] + np.array([0, np.pi / 2])[:, None, None, None]  # (2, P, 1, 1): the streak's axes
    second = own & (dx * np.cos(angle) + dy * np.sin(angle) > 0)  # (2, P, w, w): the halves across each axis
    halves = fitter._on(np.stack([~second, ~(own & ~second)], 1).reshape(4 * p, -1).astype(np.float32))  # (axis, member, window)
    free = (counts - known).clamp(min=0)
    split = fitter._starts(free.repeat(4, 1).reshape(-1, w, w), (weight.repeat(4, 1) * halves).reshape(-1, w, w))[:, 0]
    extra = fitter._starts((counts - one_mu).clamp(min=0).reshape(-1, w, w), weight.reshape(-1, w, w))[:, 0]
    kept = theta.clone()
    kept[:, 6] = (theta[:, 6] - extra[:, 6]).clamp(min=0.5 * theta[:, 6])
    pair = torch.cat([split, kept, extra]).reshape(3, 2, p, 8)  # (start, member, window): (halves, halves, one plus the rest) x (first, second)
    every = torch.arange(p, device=pair.device)
    for r in range(rounds + 1):
        signal = fitter.light(pair.reshape(-1, 8)).reshape(*pair.shape[:3], -1)
        if r in (1, rounds):  # after the first round only the likeliest start's pair goes on
            two = torch.stack([fitter.log_likelihood(counts, pair[c, 0, :, 7, None] + signal[c].sum(0) + known, weight) for c in range(len(pair))])
            best = two.argmax(0)
            pair, signal = pair[best, :, every].transpose(0, 1)[None], signal[best, :, every].transpose(0, 1)[None]
        if r == rounds:
            break
        n = pair.shape[0] * 2
        light = known.repeat(n, 1) + signal.flip(1).reshape(n * p, -1)  # the partner's light known
        pair = fitter.refine(counts.repeat(n, 1), pair.reshape(-1, 8), 6, known=light, weight=weight.repeat(n, 1))[0].reshape(-1, 2, p, 8)
    gain = two.max(0).values - fitter.log_likelihood(counts, one_mu, weight)
    return gain.cpu().numpy(), pair[0].transpose(0, 1).cpu().numpy(), own & (signal[0, 1] > signal[0, 0]).reshape(p, w, w).cpu().numpy()


def _split(
    fitter: BeadFitter, stack: _Stack, fit: FitResult, found: list[Detection], image_shape: Sequence[tuple[int, int]], settled: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[tuple[int, int], np.ndarray]]:  # fmt: skip
    """Split the streaks that hold two particles: where the residual (Pearson, smoothed by a
    1.5 px Gaussian) of a particle's own detected pixels exceeds SPLIT_SIGMA of its noise over at
    least 6 px and holds SPLIT_SHARE of the particle's photons, those pixels (grown by 2 px)
    become a new streak; but where two particles fitted in its window (:func:`_pair_trial`, for
    fits that explain their window poorly, PAIR_DEVIANCE, or did not converge, and are not
    ``settled``: (N,) bool, unchanged since the last pass; against the median fit's deviance where
    that exceeds the noise, as a measured PSF's does) gain PAIR_GAIN times its dispersion in
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
    excess = fit.deviance / (fit.dispersion * np.maximum(fit.pixels, 1))  # deviance per pixel over what the noise explains
    # above 1 where the PSF model itself falls short (a measured PSF): every fit explains less (from enough fits to tell)
    typical = max(1.0, float(np.median(excess))) if len(excess) >= TYPICAL_FITS else 1.0
    poor = (excess > PAIR_DEVIANCE * typical) | ~fit.converged
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
    mu_all, jac_all = (x.cpu() for x in fitter._jacobian(theta))
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
