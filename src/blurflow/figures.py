"""Figures: PSF gallery, training data and training curves, the paper's figures. Matplotlib, Agg."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from blurflow.optics import MotionPSF, MotionScales, Optics  # noqa: E402

GALLERY = {  # title: (v1, v2, v3, z0)
    "in focus": (0.0, 0.0, 0.0, 0.0),
    "defocused": (0.0, 0.0, 0.0, 1.0),
    "lateral motion": (0.8, 0.4, 0.0, 0.0),
    "axial motion": (0.0, 0.0, 1.0, 0.0),
    "lateral + axial": (0.6, 0.6, 0.8, 0.2),
}


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
            (image, "gray", f"camera counts #{index}", (np.percentile(image, 0.5), np.percentile(image, 99.5))),
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
