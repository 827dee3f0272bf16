"""Training data (paper Eq. 5): spatially variant 3D motion blur of sharp sources, camera noise.

One sample: a random crop of a source tile (random flip/rotation), N non-overlapping regions
(warped Voronoi cells), a motion PSF per region, the blurred image
``sum_n F^-1[F(h_n) F(m_n * o)]`` (computed on a reflect-padded canvas so nothing wraps),
expected photons ``photons * blurred``, counts ``Poisson(beta * photons * blurred)`` plus a
half-normal background, rounded to uint16. Sample ``i`` of shard ``s`` draws everything from
``SeedSequence([seed, split, s, i])``, so a shard is byte-identical when regenerated.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch
from scipy import fft as sfft
from scipy import ndimage

from blurflow import __version__, logs
from blurflow.config import Setup, config_hash, dataclass_values, defaults
from blurflow.files import atomic_path
from blurflow.optics import MotionPSF, canonical_sign

log = logging.getLogger(__name__)
SPLITS = {"train": 0, "val": 1, "test": 2}
_SYN = defaults("synthesis")  # the schema holds the defaults
RENDER_BATCH = 16  # images rendered together when writing files (the same batches give the same bytes)


@dataclass(frozen=True)
class SynthesisConfig:
    """Per-image random draws; ranges are (low, high), uniform."""

    image_px: int = _SYN["image_px"]
    regions: tuple[int, int] = tuple(_SYN["regions"])
    v_lateral: tuple[float, float] = tuple(_SYN["v_lateral"])
    v3: tuple[float, float] = tuple(_SYN["v3"])
    z0: tuple[float, float] = tuple(_SYN["z0"])
    photons: tuple[float, float] = tuple(_SYN["photons"])  # expected photons per pixel at source intensity 1
    quantum_efficiency: tuple[float, float] = tuple(_SYN["quantum_efficiency"])
    background_sigma: tuple[float, float] = tuple(_SYN["background_sigma"])  # half-normal scale, counts
    validity_window_px: int = _SYN["validity_window_px"]
    validity_threshold: float = _SYN["validity_threshold"]  # local standard deviation of the sharp source (0..1 scale)
    stretch_crops: bool = _SYN["stretch_crops"]  # scale each crop to its 1st..99th percentiles (fill the camera range)
    source_zoom: tuple[float, float] = tuple(_SYN["source_zoom"])  # magnification of the source crops, log-uniform
    smooth_flow: float = _SYN["smooth_flow"]  # share of images whose motion is a ramp across the image (Synthesizer.ramp)
    smooth_flow_bands: int = _SYN["smooth_flow_bands"]  # bands of one motion each that make up a ramp

    @property
    def max_regions(self) -> int:
        """The most regions an image can have (Voronoi cells or ramp bands)."""
        return max(self.regions[1], self.smooth_flow_bands if self.smooth_flow > 0 else 0)

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> SynthesisConfig:
        """Build from the ``synthesis`` config section (blurflow.config.dataclass_values); checks the ranges."""
        out = cls(**dataclass_values(cls, "synthesis", cfg))
        for name in ("regions", "v_lateral", "v3", "z0", "photons", "quantum_efficiency", "background_sigma", "source_zoom"):
            lo, hi = getattr(out, name)
            if lo > hi:
                raise ValueError(f"synthesis.{name} must be [low, high] with low <= high, got {[lo, hi]}")
        if not 1 <= out.regions[0] <= out.regions[1] <= 255:
            raise ValueError(f"synthesis.regions must satisfy 1 <= min <= max <= 255, got {list(out.regions)}")
        if not 2 <= out.smooth_flow_bands <= 255:
            raise ValueError(f"synthesis.smooth_flow_bands must satisfy 2 <= bands <= 255, got {out.smooth_flow_bands}")
        if not 0 <= out.smooth_flow <= 1:
            raise ValueError(f"synthesis.smooth_flow must be a share in [0, 1], got {out.smooth_flow}")
        if not (0 < out.quantum_efficiency[0] and out.quantum_efficiency[1] <= 1):
            raise ValueError(f"synthesis.quantum_efficiency must lie in (0, 1], got {list(out.quantum_efficiency)}")
        if out.source_zoom[0] < 1:
            raise ValueError(f"synthesis.source_zoom must be >= 1 (a source is magnified, never shrunk), got {list(out.source_zoom)}")
        return out


def smooth_field(size: int, rng: np.random.Generator, rank: int = 3, modes: int = 3) -> np.ndarray:
    """Random smooth (size, size) field of unit-order amplitude: a sum of ``rank`` outer products
    of random low-frequency cosine series (one small matrix product, no 2D filtering)."""
    t = np.arange(size, dtype=np.float32) * (np.pi / size)
    m = np.arange(1, modes + 1, dtype=np.float32)[None, :, None]
    amp = rng.standard_normal((2 * rank, modes, 1)).astype(np.float32) / m
    series = (amp * np.cos(m * t + rng.uniform(0, 2 * np.pi, (2 * rank, modes, 1)).astype(np.float32))).sum(1)
    return series[:rank].T @ series[rank:]


def region_map(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) uint8 labels 0..n-1: Voronoi cells of random centres, boundaries warped smoothly."""
    labels = np.zeros((size, size), np.uint8)
    if n == 1:
        return labels
    centres = rng.uniform(0, size, (n, 2)).astype(np.float32)
    y = np.arange(size, dtype=np.float32)[:, None] + smooth_field(size, rng) * (size / 6)
    x = np.arange(size, dtype=np.float32)[None, :] + smooth_field(size, rng) * (size / 6)
    best = (y - centres[0, 0]) ** 2 + (x - centres[0, 1]) ** 2
    for k in range(1, n):
        d = (y - centres[k, 0]) ** 2 + (x - centres[k, 1]) ** 2
        closer = d < best
        labels[closer] = k
        np.minimum(best, d, out=best)
    return labels


def band_map(canvas: int, image: int, bands: int, angle: float) -> np.ndarray:
    """(canvas, canvas) uint8 labels 0..bands-1: equal bands across the central ``image`` pixels
    along direction ``angle`` (radians; 0: label grows with the column, pi/2: with the row); the
    padding takes the label of the nearest image pixel."""
    r = np.clip(np.arange(canvas) - (canvas - image) // 2, 0, image - 1).astype(np.float64)
    c, s = math.cos(angle), math.sin(angle)
    t = r[None, :] * c + r[:, None] * s
    corners = [x * c + y * s for x in (0, image - 1) for y in (0, image - 1)]
    lo, span = min(corners), max(corners) - min(corners) + 1  # + 1: a pixel's extent, so bands are equal
    return np.clip(np.floor((t - lo) / span * bands + 1e-9), 0, bands - 1).astype(np.uint8)


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a window x window box (reflect padding) of (B, H, W), via integral images."""
    lo, hi = window // 2, window - 1 - window // 2
    p = torch.nn.functional.pad(x[:, None], (lo, hi, lo, hi), mode="reflect")[:, 0].double()
    s = torch.nn.functional.pad(p.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    h, w = x.shape[-2:]
    total = s[:, window:, window:] - s[:, :h, window:] - s[:, window:, :w] + s[:, :h, :w]
    return (total / window**2).to(x.dtype)


def validity(sharp: torch.Tensor, window: int, threshold: float) -> torch.Tensor:
    """1 where the local standard deviation of the sharp source (B, H, W) exceeds ``threshold``."""
    mean = box_mean(sharp, window)
    var = box_mean(sharp * sharp, window) - mean**2
    return (torch.sqrt(torch.clamp(var, min=0)) > threshold).to(torch.uint8)


def blur(canvas: torch.Tensor, regions: torch.Tensor, kernels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sum_n F^-1[F(h_n) F(m_n * o)] on periodic canvases, one PSF and one FFT pair per region
    that exists (an image's cost does not depend on the other images of its batch).

    canvas (B, C, C) sharp sources, regions (B, C, C) int labels, counts (B,) regions per image,
    kernels (P, k, k) centred at k // 2, P = counts.sum(): labels 0..counts[0]-1 of image 0, then
    image 1's, ... Returns (B, C, C).
    """
    b, c, _ = canvas.shape
    p, k = kernels.shape[0], kernels.shape[-1]
    counts = counts.to(canvas.device)
    owner = torch.repeat_interleave(torch.arange(b, device=canvas.device), counts)  # image of each region
    label = torch.arange(p, device=canvas.device) - (torch.cumsum(counts, 0) - counts)[owner]
    padded = torch.zeros(p, c, c, dtype=kernels.dtype, device=kernels.device)
    padded[:, :k, :k] = kernels
    padded = torch.roll(padded, shifts=(-(k // 2), -(k // 2)), dims=(-2, -1))
    masks = regions[owner] == label[:, None, None]
    spectra = torch.fft.rfft2(masks * canvas[owner]) * torch.fft.rfft2(padded)
    slots = torch.full((b, int(counts.max())), p, device=canvas.device)  # index p: a zero spectrum
    slots[owner, label] = torch.arange(p, device=canvas.device)
    spectra = torch.cat([spectra, spectra.new_zeros(1, *spectra.shape[1:])])
    return torch.fft.irfft2(spectra[slots].sum(1), s=(c, c))  # summed in label order: deterministic


class Synthesizer:
    """Draws and renders samples from a sources file (HDF5 tiles, see blurflow.sources).

    Drawing (:meth:`draw`: crop, regions, motion, camera settings) is numpy on the CPU; rendering
    (:meth:`render`, :meth:`camera`, :meth:`batch`: motion PSFs, blur, noise, validity) is batched
    torch on ``device``, so training images can be made on the training device itself.
    """

    def __init__(self, sources: str | Path, setup: Setup, device: torch.device | str = "cpu"):
        self.setup = setup
        self.cfg, self.optics, self.scales, self.kernel_px = setup.synthesis, setup.optics, setup.scales, setup.kernel_px
        cfg, kernel_px = self.cfg, self.kernel_px
        self.device = torch.device(device)
        with h5py.File(sources, "r") as f:
            self.tiles = f["images"][()]  # (T, S, S) uint16; sources files are small enough to hold
        if self.tiles.shape[-1] < cfg.image_px:
            raise ValueError(f"source tiles ({self.tiles.shape[-1]} px) are smaller than synthesis.image_px ({cfg.image_px})")
        if kernel_px < 4 or kernel_px % 2:
            raise ValueError(f"motion.kernel_px must be an even number >= 4, got {kernel_px}")
        self.canvas_px = sfft.next_fast_len(cfg.image_px + kernel_px, real=True)

    @cached_property
    def psf(self) -> MotionPSF:
        """Motion PSF for every depth the configured ranges reach (built on first use)."""
        cfg, a = self.cfg, self.scales.axial_scale_um
        z_hi = (cfg.z0[1] + max(cfg.v3[1], 0)) * a
        z_lo = (cfg.z0[0] + min(cfg.v3[0], 0)) * a
        return MotionPSF(self.optics, self.scales, size=self.kernel_px, z_range_um=(min(z_lo, 0.0) - 1, z_hi + 1), device=self.device)

    def crop(self, rng: np.random.Generator) -> np.ndarray:
        """Random ``image_px`` crop of a random tile, magnified by a factor drawn from
        ``source_zoom`` (cubic interpolation of a crop of ``image_px / zoom`` source pixels),
        rotated by k * 90 degrees, maybe mirrored, contrast-stretched to its 1st..99th percentiles
        when ``stretch_crops``."""
        h, (z_lo, z_hi) = self.cfg.image_px, self.cfg.source_zoom
        tile = self.tiles[rng.integers(len(self.tiles))]
        zoom = z_lo if z_lo == z_hi else math.exp(rng.uniform(math.log(z_lo), math.log(z_hi)))
        c = round(h / zoom)
        y0, x0 = rng.integers(0, tile.shape[0] - c + 1), rng.integers(0, tile.shape[1] - c + 1)
        crop = np.rot90(tile[y0 : y0 + c, x0 : x0 + c], rng.integers(4))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = crop.astype(np.float32) / 65535
        if c != h:
            crop = np.clip(ndimage.zoom(crop, h / c, order=3, mode="mirror"), 0, 1)
        if self.cfg.stretch_crops:
            lo, hi = np.percentile(crop, [1, 99])
            if hi - lo > 1e-3:  # a flat crop stays flat instead of amplifying nothing
                crop = np.clip((crop - lo) / (hi - lo), 0, 1)
        return crop.astype(np.float32, copy=False)

    def motions(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 4) float32 raw (v1, v2, v3, z0), uniform in the configured ranges."""
        cfg = self.cfg
        v = [rng.uniform(*cfg.v_lateral, n), rng.uniform(*cfg.v_lateral, n), rng.uniform(*cfg.v3, n), rng.uniform(*cfg.z0, n)]
        return np.stack(v, axis=1).astype(np.float32)

    def camera_draws(self, rng: np.random.Generator) -> dict:
        """Photon level, quantum efficiency, background scale and noise seed of one image."""
        cfg = self.cfg
        return {
            "photons": rng.uniform(*cfg.photons),
            "quantum_efficiency": rng.uniform(*cfg.quantum_efficiency),
            "background_sigma": rng.uniform(*cfg.background_sigma),
            "noise_seed": int(rng.integers(2**63 - 1)),
        }

    def ramp(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Canvas labels and raw motions (bands, 4) of a smooth flow: ``smooth_flow_bands`` bands
        along a random direction (:func:`band_map`), the motion going linearly from one random
        motion at the first band to another at the last."""
        bands = self.cfg.smooth_flow_bands
        regions = band_map(self.canvas_px, self.cfg.image_px, bands, rng.uniform(0, 2 * math.pi))
        ends = self.motions(2, rng)
        weight = np.linspace(0, 1, bands, dtype=np.float32)[:, None]
        return regions, ends[0] + (ends[1] - ends[0]) * weight

    def draw(self, rng: np.random.Generator) -> dict:
        """Random choices of one training sample (source crop, regions, raw motion, camera); a
        share ``smooth_flow`` of the samples are ramps (:meth:`ramp`), drawn only when it is > 0."""
        sharp = self.crop(rng)
        if self.cfg.smooth_flow > 0 and rng.random() < self.cfg.smooth_flow:
            regions, params = self.ramp(rng)
        else:
            n = int(rng.integers(self.cfg.regions[0], self.cfg.regions[1] + 1))
            regions = region_map(self.canvas_px, n, rng)
            params = self.motions(n, rng)
        return {"sharp": sharp, "regions": regions, "params": params, **self.camera_draws(rng)}

    def render(self, draws: Sequence[dict]) -> torch.Tensor:
        """Noise-free blurred images (B, H, W), float32 on ``device``, in source intensity units."""
        h, c = self.cfg.image_px, self.canvas_px
        lo = (c - h) // 2
        sharp = np.stack([d["sharp"] for d in draws])
        canvas = np.pad(sharp, ((0, 0), (lo, c - h - lo), (lo, c - h - lo)), mode="reflect")
        kernels = self.psf(torch.from_numpy(np.concatenate([d["params"] for d in draws])))
        counts = torch.tensor([len(d["params"]) for d in draws])
        regions = torch.from_numpy(np.stack([d["regions"] for d in draws]).astype(np.int64)).to(self.device)
        blurred = blur(torch.from_numpy(canvas).to(self.device), regions, kernels, counts)
        return blurred[:, lo : lo + h, lo : lo + h]

    def camera(self, blurred: torch.Tensor, draws: Sequence[dict]) -> torch.Tensor:
        """Counts (B, H, W), float32 integers in 0..65535: Poisson(beta * photons * blurred) plus a
        half-normal background, each image from a generator seeded by its ``noise_seed``."""
        out = torch.empty_like(blurred)
        for i, d in enumerate(draws):
            g = torch.Generator(blurred.device).manual_seed(d["noise_seed"])
            expected = (d["quantum_efficiency"] * d["photons"]) * blurred[i].clamp(min=0)
            background = torch.randn(expected.shape, generator=g, device=blurred.device).abs() * d["background_sigma"]
            out[i] = torch.poisson(expected, generator=g) + background
        return out.round_().clamp_(0, 65535)

    def batch(self, draws: Sequence[dict], n_max: int) -> dict[str, torch.Tensor]:
        """Rendered samples on ``device``: ``image`` (B, H, W) float32 counts, ``region`` (B, H, W)
        uint8, ``valid`` (B, H, W) uint8 and ``params`` (B, n_max, 4) float32 canonical labels
        (NaN for unused regions)."""
        h, lo = self.cfg.image_px, (self.canvas_px - self.cfg.image_px) // 2
        sharp = torch.from_numpy(np.stack([d["sharp"] for d in draws])).to(self.device)
        params = torch.full((len(draws), n_max, 4), torch.nan)
        for j, d in enumerate(draws):
            params[j, : len(d["params"])] = canonical_sign(torch.from_numpy(d["params"]))
        regions = np.stack([d["regions"][lo : lo + h, lo : lo + h] for d in draws])
        return {
            "image": self.camera(self.render(draws), draws),
            "region": torch.from_numpy(regions).to(self.device),
            "valid": validity(sharp, self.cfg.validity_window_px, self.cfg.validity_threshold),
            "params": params.to(self.device),
        }


def sample_rng(key: Sequence[int]) -> np.random.Generator:
    """The generator of the sample with seed key ``key`` (e.g. (seed, split, shard, index))."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def write_samples(
    path: str | Path,
    syn: Synthesizer,
    draw: Callable[[int, np.random.Generator], dict],
    keys: Sequence[Sequence[int]],
    n_max: int,
    attrs: Mapping,
    batch: int = RENDER_BATCH,
    progress: bool = True,
    desc: str = "",
) -> None:
    """Render one sample per seed key with ``draw`` into an HDF5 file (docs/design.md format), atomically.

    Sample i uses :func:`sample_rng` of ``keys[i]``; ``draw(i, rng)`` returns a dict with
    ``sharp`` (H, W), ``regions`` (canvas, canvas) labels < n_max, raw ``params`` (n, 4) and the
    camera draws. Labels are stored with the canonical sign.
    """
    h, samples = syn.cfg.image_px, len(keys)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        chunk = (1, h, h)
        image = f.create_dataset("image", (samples, h, h), np.uint16, chunks=chunk, compression="lzf", shuffle=True)
        region = f.create_dataset("region", (samples, h, h), np.uint8, chunks=chunk, compression="lzf")
        valid = f.create_dataset("valid", (samples, h, h), np.uint8, chunks=chunk, compression="lzf")
        params = f.create_dataset("params", (samples, n_max, 4), np.float32, fillvalue=np.nan)
        camera = {k: f.create_dataset(k, (samples,), np.float32) for k in ("photons", "quantum_efficiency", "background_sigma")}
        f.attrs.update(
            optics=json.dumps(syn.optics.to_dict()),
            scales=json.dumps(syn.scales.to_dict()),
            synthesis=json.dumps(asdict(syn.cfg)),
            kernel_px=syn.kernel_px,
            blurflow_version=__version__,
            label_order="v1,v2,v3,z0 (canonical sign: v2 > 0, or v2 == 0 and v1 >= 0)",
            **attrs,
        )
        t0 = time.perf_counter()
        for start in logs.progress(range(0, samples, batch), desc=desc or Path(path).name, unit="batch", enabled=progress):
            sl = slice(start, min(start + batch, samples))
            draws = [draw(i, sample_rng(keys[i])) for i in range(sl.start, sl.stop)]
            out = {k: v.cpu().numpy() for k, v in syn.batch(draws, n_max).items()}
            image[sl] = out["image"].astype(np.uint16)
            region[sl], valid[sl], params[sl] = out["region"], out["valid"], out["params"]
            for k, ds in camera.items():
                ds[sl] = [d[k] for d in draws]
        dt = time.perf_counter() - t0
        log.info("rendered %d images of %d px in %.1f s (%.0f images/s) for %s", samples, h, dt, samples / max(dt, 1e-9), path)


def shard_keys(seed: int, split: str, shard: int, samples: int) -> list[tuple[int, int, int, int]]:
    """Seed keys of the samples of a shard: (seed, split code, shard, index). Online training draws
    its step ``s`` as shard ``s`` (blurflow.data.OnlineBatches), so the two paths agree."""
    return [(seed, SPLITS[split], shard, i) for i in range(samples)]


def write_shard(path: str | Path, sources: str | Path, setup: Setup, split: str, shard: int, samples: int, progress: bool = True) -> None:
    """Synthesise ``samples`` training images into an HDF5 shard; sample i is keyed by
    (setup.seed, split, shard, i)."""
    syn = Synthesizer(sources, setup)
    seed = setup.seed
    keys = shard_keys(seed, split, shard, samples)
    attrs = {
        "seed": seed,
        "split": split,
        "shard": shard,
        "config_hash": config_hash(setup.optics.to_dict(), setup.scales.to_dict(), asdict(setup.synthesis), {"kernel_px": setup.kernel_px}),
    }
    write_samples(path, syn, lambda i, rng: syn.draw(rng), keys, setup.synthesis.max_regions, attrs, progress=progress, desc=f"{split} shard {shard}")
