"""Figures: PSF gallery, training data and training curves, the paper's figures. Matplotlib, Agg."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from blurflow.optics import COMPONENTS, MotionPSF, MotionScales, Optics

GALLERY = {  # title: (v1, v2, v3, z0)
    "in focus": (0.0, 0.0, 0.0, 0.0),
    "defocused": (0.0, 0.0, 0.0, 1.0),
    "lateral motion": (0.8, 0.4, 0.0, 0.0),
    "axial motion": (0.0, 0.0, 1.0, 0.0),
    "lateral + axial": (0.6, 0.6, 0.8, 0.2),
}


def save_png(fig: plt.Figure, path, software: str) -> None:
    """Write ``fig`` as a PNG (110 dpi, ``software`` in its metadata) and close it, so that a
    process writing many figures does not keep them all."""
    try:
        fig.savefig(path, dpi=110, format="png", metadata={"Software": software})
    finally:
        plt.close(fig)


def psf_gallery(optics: Optics, scales: MotionScales, size: int = 48) -> plt.Figure:
    """Motion PSFs of :data:`GALLERY`, linear (top) and log10 (bottom), axes in um."""
    params = torch.tensor(list(GALLERY.values()))
    kernels = MotionPSF(optics, scales, size=size)(params).numpy()
    lo, hi = (-size // 2 - 0.5) * optics.pixel_um, (size // 2 - 0.5) * optics.pixel_um
    extent = (lo, hi, hi, lo)  # pixel edges; the origin is the centre of pixel size // 2
    fig, axes = plt.subplots(2, len(GALLERY), figsize=(3.0 * len(GALLERY), 6.4), constrained_layout=True)
    for col, ((title, (v1, v2, v3, z0)), kernel) in enumerate(zip(GALLERY.items(), kernels)):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(kernel / kernel.max(), cmap="magma", extent=extent, vmin=0, vmax=1)
        im = bottom.imshow(np.log10(np.maximum(kernel, 1e-7)), cmap="magma", extent=extent, vmin=-6, vmax=-0.5)
        lateral = np.hypot(v1, v2) * scales.lateral_scale_px * optics.pixel_um
        top.set_title(
            f"{title}\nv=({v1:g}, {v2:g}, {v3:g}), z0={z0:g}\n"
            f"lateral {lateral:.1f} um, axial {v3 * scales.axial_scale_um:.1f} um from {z0 * scales.axial_scale_um:.1f} um",
            fontsize=9,
        )
        for ax in (top, bottom):
            ax.set_xlabel("x (um)")
        top.set_ylabel("y (um)" if col == 0 else "")
        bottom.set_ylabel("y (um), log10 scale" if col == 0 else "")
    fig.colorbar(im, ax=axes[1, :], shrink=0.8, label="log10 fraction of energy per pixel")
    fig.suptitle(
        f"Motion PSFs: NA {optics.na:g}, n {optics.n:g}, lambda {optics.wavelength_um:g} um, "
        f"pixel {optics.pixel_um:.3g} um, L = {scales.lateral_scale_px:g} px, A = {scales.axial_scale_um:g} um"
    )
    return fig


def velocity_rgb(target: np.ndarray) -> np.ndarray:
    """(4, H, W) canonical labels -> (H, W, 3) RGB: |v1| red, v2 green, v3 blue (paper Fig. 2)."""
    return np.clip(np.stack([np.abs(target[0]), np.abs(target[1]), target[2]], -1), 0, 1)


def training_samples(dataset, count: int = 6) -> plt.Figure:
    """Samples of a ShardDataset: camera image, regions, validity w, labels as RGB, z0."""
    fig, axes = plt.subplots(count, 5, figsize=(12.5, 2.6 * count), constrained_layout=True)
    for row, index in enumerate(np.linspace(0, len(dataset) - 1, count).astype(int)):
        item = dataset[int(index)]
        target = item["target"].numpy()
        image = item["image"][0].numpy()
        panels = [
            (image, "gray", f"camera counts #{index}", _display_range(image)),
            (velocity_rgb(target), None, "labels (|v1|, v2, v3) as RGB", (0, 1)),
            (target[3], "viridis", "z0", (0, 1)),
            (item["valid"][0].numpy(), "gray", "validity w", (0, 1)),
            (item["region"].numpy(), "tab10", "regions", (0, 9)),
        ]
        for ax, (data, cmap, title, (lo, hi)) in zip(axes[row], panels):
            ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    return fig


def training_curve(log: pd.DataFrame) -> plt.Figure:
    """Training log (blurflow.train CSV): losses against epochs, validation R^2 against minutes."""
    fig, (ax_loss, ax_r2) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax_loss.plot(log["epoch"], log["train_loss"], "o-", label="training")
    ax_loss.plot(log["epoch"], log["val_loss"], "s-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_loss.legend()
    for comp, style in (("v1", "r"), ("v2", "g"), ("v3", "b"), ("z0", "m")):
        ax_r2.plot(log["minutes"], log[f"val_r2_{comp}"], f"{style}.-", label=f"|{comp}|" if comp in ("v1", "v2") else comp)
    ax_r2.plot(log["minutes"], log["val_r2_mean"], "k-", lw=2.5, label="mean (paper's R²)")
    ax_r2.set(xlabel="training time (minutes)", ylabel="validation R² (squared Pearson)", ylim=(0, 1), title="validation R²")
    ax_r2.legend(loc="upper left", fontsize=8)
    return fig


def measurability(table: pd.DataFrame, logs: dict[str, pd.DataFrame]) -> plt.Figure:
    """Measurability study: final validation R^2 per component against the blur scale (left) and
    the mean R^2 against training images for every setting (right)."""
    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    x = np.arange(len(table))
    labels = [f"L = {r.lateral_scale_px:g} px\nA = {r.axial_scale_um:g} um" for r in table.itertuples()]
    for comp, style in (("v1", "r"), ("v2", "g"), ("v3", "b"), ("z0", "m")):
        ax.plot(x, table[f"r2_{comp}"], f"{style}o-", label=f"|{comp}|" if comp in ("v1", "v2") else comp)
    ax.plot(x, table["r2_mean"], "ks-", lw=2.5, label="mean (paper's R²)")
    ax.set_xticks(x, labels, fontsize=8)
    budget = f"{int(table['samples'].max()):,} training images of each setting"
    ax.set(ylabel="validation R² (squared Pearson)", ylim=(0, 1), title=f"R² against the blur per unit speed ({budget})")
    ax.legend(fontsize=8, loc="upper left")
    for name, log in logs.items():
        ax_curve.plot(log["samples"], log["val_r2_mean"], "o-", label=name)
    ax_curve.set(xlabel="training images", ylabel="validation R² (mean)", ylim=(0, 1), title="learning curves")
    ax_curve.legend(fontsize=8)
    return fig


def _display_range(image: np.ndarray) -> tuple[float, float]:
    """Grey-level limits that clip the darkest and brightest 0.5% of the pixels."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    return float(lo), float(hi)


def _counts_panel(ax, image: np.ndarray, title: str) -> None:
    lo, hi = _display_range(image)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _rgb_panel(ax, maps: np.ndarray, title: str) -> None:
    ax.imshow(velocity_rgb(maps), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def two_zone_examples(dataset, pred: np.ndarray, count: int = 4) -> plt.Figure:
    """Paper Fig. 2: blurred input, ground truth and prediction (|v1| red, v2 green, v3 blue)."""
    count = min(count, len(pred))
    fig, axes = plt.subplots(count, 4, figsize=(10, 2.6 * count), constrained_layout=True, squeeze=False)
    for row in range(count):
        item = dataset[row]
        _counts_panel(axes[row, 0], item["image"][0].numpy(), f"input i(s) #{row}")
        _rgb_panel(axes[row, 1], item["target"].numpy(), "ground truth v(s)")
        _rgb_panel(axes[row, 2], pred[row, :4], "prediction")
        axes[row, 3].imshow(pred[row, 4], cmap="gray", vmin=0, vmax=1)
        axes[row, 3].set_title("predicted validity w", fontsize=9)
        axes[row, 3].set_axis_off()
    return fig


def cylinder_sketch(speed: float, direction_deg: float, rows: int = 128) -> plt.Figure:
    """Paper Fig. 3: (a) flow in a cylinder seen by the camera, (b) the expected flow profile."""
    from blurflow.testsets import cylinder_params

    fig = plt.figure(figsize=(10, 4.2), constrained_layout=True)
    ax = fig.add_subplot(1, 3, 1)
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(2.2 * np.cos(t) * 0.35, 2.2 * np.sin(t), "k-", lw=1.5)  # pipe cross-section, ellipse = tilt
    ax.plot([-1.2, 1.2], [0, 0], "c--", lw=1)
    ax.text(1.25, 0.05, "focal plane", color="c", fontsize=8)
    for y in np.linspace(-1.8, 1.8, 7):
        phi = np.pi / 2 * (y + 1.8) / 3.6  # 0 at the bottom, pi/2 at the top
        ax.annotate("", xy=(0.9 * np.cos(phi) - 0.45, y + 0.9 * np.sin(phi) * 0.3), xytext=(-0.45, y), arrowprops={"arrowstyle": "->", "color": "C3"})
    ax.set(xlim=(-1.5, 2.2), ylim=(-2.5, 2.5), title="(a) flow in a cylinder", xticks=[], yticks=[])
    ax.text(-1.45, -2.4, "bottom: lateral motion", fontsize=8)
    ax.text(-1.45, 2.25, "top: axial motion", fontsize=8)
    params = cylinder_params(rows, speed, 0.0, direction_deg)
    maps = np.repeat(params.T[:, :, None], rows, axis=2)
    ax = fig.add_subplot(1, 3, 2)
    ax.imshow(velocity_rgb(maps))
    ax.set(title="(b) expected flow v(s) as RGB", xticks=[], yticks=[])
    ax = fig.add_subplot(1, 3, 3)
    y = np.arange(rows)
    for k, (name, color) in enumerate((("|v1|", "r"), ("v2", "g"), ("v3", "b"))):
        ax.plot(np.abs(params[:, k]), y, color, label=name)
    ax.invert_yaxis()
    ax.set(xlabel="normalised velocity", ylabel="image row (top to bottom)", title="profile along y", xlim=(0, 1))
    ax.legend(fontsize=8)
    return fig


def row_profiles(maps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(C, H) mean over valid pixels of each row of (C, H, W) maps (NaN where none is valid)."""
    w = valid.astype(np.float64)
    with np.errstate(invalid="ignore"):
        return (np.abs(maps) * w).sum(-1) / w.sum(-1)


def cylinder_result(dataset, pred: np.ndarray, index: int = 0) -> plt.Figure:
    """Paper Fig. 4: input, ground truth, prediction and the profile of each component along y."""
    item = dataset[index]
    target, valid = item["target"].numpy(), item["valid"][0].numpy()
    fig = plt.figure(figsize=(13, 3.8), constrained_layout=True)
    gs = fig.add_gridspec(1, 5, width_ratios=[1, 1, 1, 0.9, 0.9])
    _counts_panel(fig.add_subplot(gs[0]), item["image"][0].numpy(), "input i(s)")
    _rgb_panel(fig.add_subplot(gs[1]), target, "ground truth")
    _rgb_panel(fig.add_subplot(gs[2]), pred[index, :4], "prediction")
    y = np.arange(target.shape[1])
    true_p = row_profiles(target, valid)
    pred_p = np.nanmean([row_profiles(pred[i, :4], dataset[i]["valid"][0].numpy()) for i in range(len(pred))], 0)
    for panel, comps in ((gs[3], ((0, "|v1|", "r"), (1, "|v2|", "g"), (2, "v3", "b"))), (gs[4], ((3, "z0", "m"),))):
        ax = fig.add_subplot(panel)
        for k, name, color in comps:
            ax.plot(true_p[k], y, color + "-", lw=2, label=f"{name} truth")
            ax.plot(pred_p[k], y, color + "--", label=f"{name} predicted")
        ax.invert_yaxis()
        ax.set(xlabel="normalised velocity" if len(comps) > 1 else "normalised depth", ylabel="row", xlim=(0, 1))
        ax.legend(fontsize=7)
    fig.suptitle(f"Cylinder flow: prediction averaged over the rows of {len(pred)} images", fontsize=10)
    return fig


def scatter(dataset, pred: np.ndarray, r2: dict, ci: dict | None = None, max_points: int = 50_000, seed: int = 0) -> plt.Figure:
    """Prediction against ground truth over valid pixels, one panel per component (hexbin); each
    title the component's R² with its 95 % interval (``ci``: component -> [lo, hi]) and the
    figure's the mean's."""
    xs, ys = [], []
    for i in range(len(pred)):
        item = dataset[i]
        m = item["valid"][0].numpy() > 0.5
        ys.append(item["target"].numpy()[:, m])
        xs.append(pred[i, :4][:, m])
    x, y = np.abs(np.concatenate(xs, 1)), np.abs(np.concatenate(ys, 1))
    if x.shape[1] > max_points:
        keep = np.random.default_rng(seed).choice(x.shape[1], max_points, replace=False)
        x, y = x[:, keep], y[:, keep]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), constrained_layout=True)
    for k, (ax, name) in enumerate(zip(axes, ("|v1|", "|v2|", "v3", "z0"))):
        ax.hexbin(y[k], x[k], gridsize=40, extent=(0, 1, 0, 1), mincnt=1, cmap="viridis", bins="log")
        ax.plot([0, 1], [0, 1], "w--", lw=1)
        c = ("v1", "v2", "v3", "z0")[k]
        ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}: R² = {r2[c]:.2f}" + (f" [{ci[c][0]:.2f}, {ci[c][1]:.2f}]" if ci else ""))
    if ci:
        fig.suptitle(f"mean R² {r2['mean']:.3f}, 95 % interval over the images [{ci['mean'][0]:.3f}, {ci['mean'][1]:.3f}]", fontsize=10)
    return fig


def table1_image(rows: pd.DataFrame, thumbnails: list[np.ndarray]) -> plt.Figure:
    """Paper Table 1: ground truth, blurred thumbnail and predicted values of each case: the
    network's, the particle fit's (columns ``fit_*``, where present) and the paper's."""
    fit = "fit_v1" in rows
    fig, axes = plt.subplots(
        len(rows), 3, figsize=(8.8 if fit else 8, 2.1 * len(rows)), constrained_layout=True, gridspec_kw={"width_ratios": [1.2, 1, 2.1 if fit else 1.6]}
    )
    for (_, r), thumb, (a, b, c) in zip(rows.iterrows(), thumbnails, axes):
        for ax in (a, c):
            ax.set_axis_off()
        a.text(
            0, 0.5, f"{r['case']}\nv1 = {r['v1']:.2f}\nv2 = {r['v2']:.2f}\nv3 = {r['v3']:.2f}\nz0 = {r['z0']:.2f}", va="center", family="monospace", fontsize=9
        )
        _counts_panel(b, thumb, "")
        lines = [f"{'':3}{'network':>8}" + (f"{'fit':>7}" if fit else "") + f"{'paper':>7}"]
        for name in COMPONENTS:
            fitted = (f"{r['fit_' + name]:+7.2f}" if np.isfinite(r["fit_" + name]) else f"{'-':>7}") if fit else ""
            lines.append(f"{name:<3}{r['pred_' + name]:+8.2f}" + fitted + f"{r['paper_' + name]:+7.2f}")
        c.text(0, 0.5, "\n".join(lines), va="center", family="monospace", fontsize=9)
    axes[0, 0].set_title("ground truth v(s)", fontsize=9)
    axes[0, 1].set_title("blurred image i(s)", fontsize=9)
    axes[0, 2].set_title(
        "predicted: network (valid pixels),\nparticle fit (beads), paper" if fit else "prediction (mean over valid pixels)", fontsize=9, loc="left"
    )
    return fig


def flow_overlay(image: np.ndarray, flow: np.ndarray, units: list[str], arrows: int = 24) -> plt.Figure:
    """Input with the lateral motion as headless segments (orientation, where w > 0.5), and the
    velocity as RGB (|v1| red, v2 green, v3 blue, each scaled to its maximum). ``flow`` is
    (5, H, W) in physical units."""
    h, w = image.shape
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5.2 * h / max(w, 1) + 0.8), constrained_layout=True)
    lo, hi = _display_range(image)
    a.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    step = max(1, max(h, w) // arrows)
    yy, xx = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    v1, v2, valid = flow[0][yy, xx], flow[1][yy, xx], flow[4][yy, xx] > 0.5
    a.quiver(
        xx[valid],
        yy[valid],
        v1[valid],
        v2[valid],  # rows grow downwards, as the image's
        color="yellow",
        pivot="middle",
        headwidth=0,
        headlength=0,
        headaxislength=0,
        angles="xy",
        scale_units="xy",
        scale=np.abs(flow[:2]).max() / step + 1e-12,
    )
    a.set_title(f"input with lateral motion (w > 0.5); longest segment = {np.hypot(flow[0], flow[1]).max():.2g} {units[0]}", fontsize=9)
    a.set_axis_off()
    peak = np.abs(flow[:3]).reshape(3, -1).max(1) + 1e-12
    b.imshow(velocity_rgb(np.concatenate([flow[:3] / peak[:, None, None], flow[3:4]])), interpolation="nearest")
    b.set_title(f"|v1| red (max {peak[0]:.2g}), v2 green (max {peak[1]:.2g}), v3 blue (max {peak[2]:.2g}) {units[0]}", fontsize=9)
    b.set_axis_off()
    return fig


def particles_overlay(image: np.ndarray, labels: np.ndarray, table) -> plt.Figure:
    """The image with the fitted streaks outlined and each particle's lateral path as an arrow from
    its start to its end (a headless segment where the direction is not resolved), coloured by v3;
    a red cross where a row has no numbers (a blob of merged particles). ``table`` has the columns
    of blurflow particles' CSV (x_px, y_px, dx_px, dy_px, v3, ...)."""
    h, w = image.shape
    unfitted = table[~np.isfinite(table["v3"].to_numpy(dtype=float))]
    table = table[np.isfinite(table["v3"].to_numpy(dtype=float))]
    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1) + 0.6), constrained_layout=True)
    lo, hi = _display_range(image)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    if labels.any():
        ax.contour(labels > 0, levels=[0.5], colors="cyan", linewidths=0.6)
    if len(table):
        unit = table["speed_unit"].iloc[0]
        v3 = table["v3"].to_numpy()
        norm = plt.Normalize(0, max(float(v3.max()), 1e-9))
        colours = plt.cm.plasma(norm(v3))
        for row, colour in zip(table.itertuples(), colours):
            start = (row.x_px - row.dx_px / 2, row.y_px - row.dy_px / 2)
            style = "-|>" if row.direction_resolved else "-"
            ax.annotate("", xy=(row.x_px + row.dx_px / 2, row.y_px + row.dy_px / 2), xytext=start, arrowprops={"arrowstyle": style, "color": colour, "lw": 1.5})
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="plasma"), ax=ax, shrink=0.8, label=f"v3 ({unit}, away from focus)")
    if len(unfitted):
        ax.plot(unfitted["x_px"], unfitted["y_px"], "x", color="red", markersize=10, mew=2)
    ax.set_title(
        f"{len(table)} particles: lateral path over the exposure (arrow: direction resolved)" + (f"; {len(unfitted)} not fitted (x)" if len(unfitted) else ""),
        fontsize=9,
    )
    ax.set_axis_off()
    return fig


def crb_map(table: pd.DataFrame) -> plt.Figure:
    """Measurability from theory: the ideal R^2 that one bead's Cramér-Rao bound allows for the
    lateral motion, v3 and z0, against the blur per unit speed (L, A), one line per photon count."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), constrained_layout=True, sharey=True)
    settings = table[["lateral_scale_px", "axial_scale_um"]].drop_duplicates()
    x = np.arange(len(settings))
    labels = [f"L = {r.lateral_scale_px:g} px\nA = {r.axial_scale_um:g} um" for r in settings.itertuples()]
    for ax, (comp, name) in zip(axes, (("v1", "lateral (v1; v2 alike)"), ("v3", "v3 (axial velocity)"), ("z0", "z0 (start depth)"))):
        for count, rows in table.groupby("photons"):
            ax.plot(x, rows[f"ideal_r2_{comp}"], "o-", label=f"{count:,.0f} photons")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set(title=name, ylim=(0, 1.02))
    axes[0].set_ylabel("ideal R² of one bead (Cramér-Rao)")
    axes[0].legend(fontsize=8, loc="lower right")
    return fig


def fit_vs_truth(table: pd.DataFrame, network: np.ndarray) -> plt.Figure:
    """Bead test set: the particle fit (with its 2-std error bars) and the network against the
    truth, per component (normalised units). ``table`` is blurflow.particles.fit_testset's,
    ``network`` the network's per-bead estimates (M, 4) in the same order."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 4), constrained_layout=True)
    for j, (ax, name) in enumerate(zip(axes, ("v1", "v2", "v3", "z0"))):
        truth = table[f"true_{name}"].to_numpy()
        ax.errorbar(truth, table[name], yerr=2 * table[f"std_{name}"], fmt="o", ms=3, lw=0.8, color="tab:blue", label="particle fit (+-2 std)")
        ax.plot(truth, network[:, j], "s", ms=3, color="tab:orange", alpha=0.7, label="network (mean over the bead)")
        lo, hi = min(truth.min(), 0), max(truth.max(), 1)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xlabel=f"true {name}", ylabel=f"estimated {name}", title=name)
    axes[0].legend(fontsize=8)
    return fig


def calibration(model, ideal) -> plt.Figure:
    """A PSF model (blurflow.psfmodel.PSFModel) beside the ideal PSF of the same optics: xz and yz
    sections through the origin (square root of intensity, so the defocus rings show), the focus
    curves (each plane's peak over the sharpest plane's, against depth in um) and the xz section of
    the calibration's residual (rms over the beads, same scale as the model's)."""
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.5), constrained_layout=True)
    label = f"PSF model ({model.beads} beads)" if model.beads else "PSF model"

    def extent(psf) -> tuple[float, float, float, float]:  # of an xz or yz section, um
        half = psf.table.shape[-1] / psf.oversample * psf.pixel_um / 2
        return -half, half, psf.z_um[0], psf.z_um[-1]

    for row, (psf, name) in enumerate(((model, label), (ideal, "ideal optics"))):
        s = psf.table.shape[-1]
        for col, (section, axis) in enumerate(((psf.table[:, s // 2, :], "x"), (psf.table[:, :, s // 2], "y"))):
            ax = axes[row, col]
            ax.imshow(np.sqrt(section.clip(min=0)), origin="lower", aspect="auto", extent=extent(psf), cmap="magma")
            ax.set(xlabel=f"{axis} (um)", ylabel="z (um)", title=f"{name}: {axis}z section")
        peak = psf.table.max((1, 2))
        axes[0, 2].plot(psf.z_um, peak / peak.max(), "-" if row == 0 else "--", label=name)
    axes[0, 2].set(xlabel="z (um)", ylabel="peak / peak of the sharpest plane", title="focus curves")
    axes[0, 2].legend(fontsize=8)
    s = model.table.shape[-1]
    residual = model.residual if model.residual is not None else np.zeros_like(model.table)
    axes[1, 2].imshow(
        np.sqrt(residual[:, s // 2, :].clip(min=0)), origin="lower", aspect="auto", extent=extent(model), cmap="magma",
        vmax=float(np.sqrt(model.table[:, s // 2, :].clip(min=0).max())),
    )  # fmt: skip
    axes[1, 2].set(xlabel="x (um)", ylabel="z (um)", title="residual: xz section (rms over beads)")
    asym = f"asymmetric in depth ({model.asymmetry:.2f}): depth signed" if not model.symmetric else "symmetric in depth"
    if model.symmetric and model.sign_gap == np.inf:
        asym = f"asymmetric in depth ({model.asymmetry:.2f}), sign not reproduced on its beads: depth folded"
    optics = model.optics
    fig.suptitle(f"PSF model: NA {optics.na:g}, n {optics.n:g}, {optics.wavelength_um:g} um, pixel {model.pixel_um:.3g} um; {asym}")
    return fig


def flow_field(field) -> plt.Figure:
    """A gridded flow field (blurflow.field.grid's table): one quiver panel of the lateral velocity
    (u, v) per depth bin, coloured by w, and the profile of u and w against depth (the count-weighted
    mean over each bin's cells, with the standard error)."""
    depths = np.sort(field["z"].unique())
    panels = len(depths) + 1
    cols = min(panels, 4)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), constrained_layout=True, squeeze=False)
    unit = str(field["speed_unit"].iloc[0])
    norm = plt.Normalize(*np.percentile(field["w"], [2, 98])) if len(field) > 1 else plt.Normalize(-1, 1)
    for ax, z in zip(axes.flat, depths):
        cells = field[field["z"] == z]
        ax.quiver(cells["x"], cells["y"], cells["u"], cells["v"], cells["w"], cmap="coolwarm", norm=norm, angles="xy")
        ax.set_title(f"z {z:.3g} um: {int(cells['count'].sum())} beads", fontsize=9)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xlabel("x (um)")
        ax.set_ylabel("y (um)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="coolwarm"), ax=axes[:, 0], shrink=0.8, label=f"w ({unit})")
    profile = axes.flat[len(depths)]
    by = field.groupby("z")
    for name, colour in (("u", "C0"), ("w", "C3")):
        mean = by.apply(lambda g, n=name: np.average(g[n], weights=g["count"]), include_groups=False)
        se = by.apply(lambda g, n=name: np.sqrt(np.average(g[f"{n}_se"] ** 2, weights=g["count"])), include_groups=False)
        profile.errorbar(mean, mean.index, xerr=se, fmt="o-", color=colour, label=name, ms=3)
    profile.set_xlabel(f"velocity ({unit})")
    profile.set_ylabel("z (um)")
    profile.invert_yaxis()
    profile.legend(fontsize=8)
    profile.set_title("profile across depth", fontsize=9)
    for ax in list(axes.flat)[panels:]:
        ax.set_axis_off()
    return fig
