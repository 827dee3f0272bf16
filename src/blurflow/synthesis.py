"""Training data (paper Eq. 5): spatially variant 3D motion blur of sharp sources, camera noise.

One sample: a random crop of a source tile (magnified, rotated by k * 90 degrees, maybe mirrored,
contrast-stretched), N non-overlapping regions (warped Voronoi cells, or the bands of a smooth
flow), a motion PSF per region, the blurred image ``sum_n F^-1[F(h_n) F(m_n * o)]`` (computed on a
reflect-padded canvas so nothing wraps), then the camera (blurflow.camera.CameraNoise).

Three parts, each with one job, in the manner of deepinv's physics: :class:`SampleDraws` draws a
batch's random choices as numbers (numpy, a few hundred bytes per image) from one generator keyed
by (seed, split, shard, batch); :class:`Renderer` turns them into sharp crops, region maps, motion
PSFs (blurflow.optics.MotionPSF) and blurred images on the rendering device, with shapes fixed by
the config and nothing read back to the host (so ``torch.compile(fullgraph=True)`` traces it);
the camera draws one Poisson and one normal sample per batch. The same key gives the same bytes
on one device type.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from scipy import fft as sfft

from blurflow import __version__, logs
from blurflow.camera import CameraNoise, generator
from blurflow.files import atomic_path
from blurflow.optics import MotionPSF, MotionScales, Optics, canonical_sign, required_kernel_px
from blurflow.schema import config_hash, dataclass_values, defaults

log = logging.getLogger(__name__)
SPLITS = {"train": 0, "val": 1, "test": 2}
_SYN = defaults("synthesis")  # the schema holds the defaults
RENDER_BATCH = 16  # images rendered together when writing files (each batch has its own key: the same batches give the same bytes)
FIELD_RANK, FIELD_MODES = 3, 3  # the smooth fields that warp region boundaries: rank and cosine modes per axis


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
        """Build from the ``synthesis`` config section (blurflow.schema.dataclass_values); checks the ranges."""
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



@dataclass(frozen=True)
class Setup:
    """What every stage that makes images shares, built once from the validated config: the
    microscope, the blur scales (L px per unit lateral speed, A um per unit v3 and z0), the size of
    the motion-PSF kernels (px), the synthesis ranges and the master seed."""

    optics: Optics
    scales: MotionScales
    kernel_px: int
    synthesis: SynthesisConfig
    seed: int

    @classmethod
    def from_config(cls, config: Mapping) -> Setup:
        """From a config (its ``seed``, ``optics``, ``motion`` and ``synthesis`` sections; missing
        keys take the schema's defaults)."""
        motion = {**defaults("motion"), **config.get("motion", {})}
        return cls(
            Optics.from_config(config.get("optics")), MotionScales.from_config(motion), int(motion["kernel_px"]),
            SynthesisConfig.from_config(config.get("synthesis")), int(config.get("seed", defaults()["seed"])),
        )  # fmt: skip

    def with_synthesis(self, **changes: Any) -> Setup:
        """The same setup with some synthesis settings changed (a test set's image size, ranges)."""
        return replace(self, synthesis=replace(self.synthesis, **changes))

    @property
    def speed_max(self) -> float:
        """The largest lateral speed |(v1, v2)| of the synthesis ranges (normalised)."""
        return math.hypot(*(max(abs(v) for v in self.synthesis.v_lateral),) * 2)

    @property
    def depth_max(self) -> float:
        """The largest depth |z0| + |v3| a path of the synthesis ranges reaches (normalised)."""
        syn = self.synthesis
        return max(abs(syn.z0[0]), abs(syn.z0[1])) + max(abs(syn.v3[0]), abs(syn.v3[1]))

    def required_kernel_px(self) -> int:
        """The kernel size (px) that holds the longest streak and the widest defocus of the ranges."""
        return required_kernel_px(self.optics, self.scales, self.speed_max, self.depth_max)


def voronoi(centres: torch.Tensor, count: torch.Tensor, amp: torch.Tensor, phase: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size, size) int64 labels 0..count-1: Voronoi cells of the first ``count`` (B,) of the
    ``centres`` (B, R, 2) (row, col px) on a grid whose rows and columns are warped by smooth
    fields of amplitude size / 6; ties go to the lower label.

    The warps (y and x, coefficients ``amp`` and ``phase`` (B, 2, 2 * FIELD_RANK, FIELD_MODES))
    are sums of FIELD_RANK outer products of low-frequency cosine series u_r v_r^T. Cell k beats
    cell 0 where |p - c_k|^2 - |p - c_0|^2 < 0, which is linear in the warped point p = (y, x):
    so each comparison is one matrix product of rank 2 * FIELD_RANK + 3, evaluated once per pixel."""
    t = torch.arange(size, dtype=amp.dtype, device=amp.device)
    m = torch.arange(1, amp.shape[-1] + 1, dtype=amp.dtype, device=amp.device)
    series = (amp[..., None] * torch.cos(m[:, None] * (t * (math.pi / size)) + phase[..., None])).sum(-2)  # (B, 2, 2 rank, size)
    u, v = series[:, :, :FIELD_RANK] * (size / 6), series[:, :, FIELD_RANK:]
    ones = torch.ones_like(series[:, 0, :1])  # (B, 1, size)
    best = labels = None
    for k in range(1, centres.shape[1]):  # R, fixed by the config
        dc = -2 * (centres[:, k] - centres[:, 0])  # (B, 2): d(distance^2) per unit of y and of x
        dnorm = centres[:, k].square().sum(-1) - centres[:, 0].square().sum(-1)
        left = torch.cat([dc[:, 0, None, None] * u[:, 0], dc[:, 1, None, None] * u[:, 1], dc[:, 0, None, None] * t, ones, ones], 1)
        right = torch.cat([v[:, 0], v[:, 1], ones, dc[:, 1, None, None] * t, dnorm[:, None, None] * ones], 1)
        d = torch.where((count > k)[:, None, None], left.transpose(1, 2) @ right, math.inf)  # distance^2 to c_k less to c_0
        if labels is None:
            best, labels = d.clamp(max=0), (d < 0).long()
            continue
        labels.masked_fill_(d < best, k)
        best = torch.minimum(best, d)
    return torch.zeros(len(centres), size, size, dtype=torch.long, device=centres.device) if labels is None else labels


def band_map(canvas: int, image: int, bands: int, angle: torch.Tensor) -> torch.Tensor:
    """(B, canvas, canvas) int64 labels 0..bands-1: equal bands across the central ``image``
    pixels along direction ``angle`` (B,) (radians; 0: label grows with the column, pi/2: with the
    row); the padding takes the label of the nearest image pixel. Float64, so that the bands at
    pi/2 are exactly the cylinder's rows."""
    angle = angle.to(torch.float64)
    r = (torch.arange(canvas, device=angle.device) - (canvas - image) // 2).clamp(0, image - 1).to(torch.float64)
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    t = r[None, None, :] * c + r[None, :, None] * s
    corners = torch.stack([x * c + y * s for x in (0, image - 1) for y in (0, image - 1)])
    lo, span = corners.amin(0), corners.amax(0) - corners.amin(0) + 1  # + 1: a pixel's extent, so bands are equal
    return torch.floor((t - lo) / span * bands + 1e-9).clamp(0, bands - 1).long()


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


def kernel_spectra(kernels: torch.Tensor, size: int) -> torch.Tensor:
    """rfft2 (..., size, size // 2 + 1) of kernels (..., k, k) centred at k // 2, placed on a
    periodic ``size`` canvas with their centre at the origin. Separable: the k kernel rows are
    transformed first, so only the last pass runs over the whole canvas."""
    k = kernels.shape[-1]
    cols = torch.roll(torch.nn.functional.pad(kernels, (0, size - k)), -(k // 2), -1)
    rows = torch.fft.rfft(cols, dim=-1)
    return torch.fft.fft(torch.roll(torch.nn.functional.pad(rows, (0, 0, 0, size - k)), -(k // 2), -2), dim=-2)


def blur(canvas: torch.Tensor, regions: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """sum_n F^-1[F(h_n) F(m_n * o)] on periodic canvases: canvas (B, C, C) sharp sources,
    regions (B, C, C) int labels, kernels (B, N, k, k) (kernel n blurs label n; centred at
    k // 2). Returns (B, C, C); summed in label order (deterministic)."""
    c, n = canvas.shape[-1], kernels.shape[1]
    masks = regions[:, None] == torch.arange(n, device=regions.device)[:, None, None]
    spectra = torch.fft.rfft2(masks * canvas[:, None]) * kernel_spectra(kernels, c)
    return torch.fft.irfft2(spectra.sum(1), s=(c, c))


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile (0..1) of each row of x (B, n), linearly interpolated between order
    statistics as numpy.percentile's default; from the nearer end's top-k (cheap for q near 0 or 1)."""
    n = x.shape[1]
    pos = q * (n - 1)
    i = math.floor(pos)
    j = min(i + 1, n - 1)
    if i < n - 1 - i:
        v = torch.topk(x, j + 1, dim=1, largest=False, sorted=True).values
        lo, hi = v[:, i], v[:, j]
    else:
        v = torch.topk(x, n - i, dim=1, largest=True, sorted=True).values
        lo, hi = v[:, n - 1 - i], v[:, n - 1 - j]
    return lo + (pos - i) * (hi - lo)


class SampleDraws:
    """The random choices of a batch of training samples, as numbers (numpy, float32/int64
    arrays with a leading batch axis; a few hundred bytes per image): the crop (tile, size,
    corner, rotation, mirror), the regions (count, Voronoi centres and warp coefficients, or a
    smooth flow's direction), the raw motion per region slot (B, N, 4) (NaN for unused slots),
    the camera (photons, quantum efficiency, background) and the batch's noise seed."""

    def __init__(self, cfg: SynthesisConfig, canvas_px: int, n_tiles: int, tile_px: int):
        self.cfg, self.canvas_px, self.n_tiles, self.tile_px = cfg, canvas_px, n_tiles, tile_px

    def step(self, batch: int, key: Sequence[int]) -> dict[str, np.ndarray]:
        """The draws of ``batch`` samples from the generator of seed key ``key``
        (e.g. (seed, split, shard, batch index))."""
        return self.draw(batch, sample_rng(key))

    def motions(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """(*shape, 4) float32 raw (v1, v2, v3, z0), uniform in the configured ranges."""
        cfg = self.cfg
        v = [rng.uniform(*cfg.v_lateral, shape), rng.uniform(*cfg.v_lateral, shape), rng.uniform(*cfg.v3, shape), rng.uniform(*cfg.z0, shape)]
        return np.stack(v, axis=-1).astype(np.float32)

    def draw(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The draws of ``batch`` samples from ``rng``; a share ``smooth_flow`` of them are ramps
        (``smooth_flow_bands`` bands along a random direction, the motion going linearly from one
        random motion at the first band to another at the last), drawn only when it is > 0."""
        cfg, f32 = self.cfg, np.float32
        z_lo, z_hi = cfg.source_zoom
        zoom = np.full(batch, z_lo) if z_lo == z_hi else np.exp(rng.uniform(math.log(z_lo), math.log(z_hi), batch))
        crop = np.round(cfg.image_px / zoom).astype(np.int64)
        corner = (rng.random((batch, 2)) * (self.tile_px - crop[:, None] + 1)).astype(np.int64)
        count = rng.integers(cfg.regions[0], cfg.regions[1] + 1, batch)
        modes = np.arange(1, FIELD_MODES + 1)
        d = {
            "tile": rng.integers(self.n_tiles, size=batch), "crop_px": crop, "y0": corner[:, 0], "x0": corner[:, 1],
            "rot": rng.integers(4, size=batch), "flip": rng.random(batch) < 0.5, "regions": count,
            "centres": rng.uniform(0, self.canvas_px, (batch, cfg.regions[1], 2)).astype(f32),
            "field_amp": (rng.standard_normal((batch, 2, 2 * FIELD_RANK, FIELD_MODES)) / modes).astype(f32),
            "field_phase": rng.uniform(0, 2 * math.pi, (batch, 2, 2 * FIELD_RANK, FIELD_MODES)).astype(f32),
        }  # fmt: skip
        params = self.motions((batch, cfg.max_regions), rng)
        params[np.arange(cfg.max_regions) >= count[:, None]] = np.nan
        d["ramp"], d["angle"] = np.zeros(batch, bool), np.zeros(batch, f32)
        if cfg.smooth_flow > 0:
            bands = cfg.smooth_flow_bands
            d["ramp"], d["angle"] = rng.random(batch) < cfg.smooth_flow, rng.uniform(0, 2 * math.pi, batch).astype(f32)
            ends = self.motions((batch, 2), rng)
            ramps = ends[:, :1] + (ends[:, 1:] - ends[:, :1]) * np.linspace(0, 1, bands, dtype=f32)[:, None]
            params[d["ramp"]] = np.nan
            params[d["ramp"], :bands] = ramps[d["ramp"]]
            d["regions"] = np.where(d["ramp"], bands, count)
        d["params"] = params
        return {**d, **self.camera(batch, rng)}

    def camera(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Photon level, quantum efficiency and background scale per image, the batch's noise seed."""
        cfg = self.cfg
        return {
            "photons": rng.uniform(*cfg.photons, batch).astype(np.float32),
            "quantum_efficiency": rng.uniform(*cfg.quantum_efficiency, batch).astype(np.float32),
            "background_sigma": rng.uniform(*cfg.background_sigma, batch).astype(np.float32),
            "noise_seed": np.int64(rng.integers(2**63 - 1)),
        }


# np.rot90(crop, k) then, where mirrored, crop[:, ::-1] as integer affine maps of the output pixel
# (a, b): row k * 2 + mirrored holds the origin (row, col) in units of the crop's last index, then
# the (row, col) steps per a and per b
_TURNS = [
    [0, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, -1],  # k = 0
    [0, 1, 0, -1, 1, 0], [1, 1, 0, -1, -1, 0],  # k = 1: rot90[a, b] = crop[b, last - a]
    [1, 1, -1, 0, 0, -1], [1, 0, -1, 0, 0, 1],  # k = 2: crop[last - a, last - b]
    [1, 0, 0, 1, -1, 0], [0, 0, 0, 1, 1, 0],  # k = 3: crop[last - b, a]
]


class Renderer(torch.nn.Module):
    """The noise-free part of a batch, from its draws (:class:`SampleDraws`, as tensors on the
    rendering device): sharp crops of the source tiles (held here, as a buffer), region maps,
    one motion PSF per region slot (zero motion where a slot is unused: its mask is empty) and
    the blurred images. Shapes are fixed by the config and nothing is read back to the host."""

    def __init__(self, tiles: np.ndarray, cfg: SynthesisConfig, canvas_px: int, psf: MotionPSF):
        super().__init__()
        self.cfg, self.canvas_px, self.psf = cfg, canvas_px, psf
        self.zoom = tuple(cfg.source_zoom) != (1.0, 1.0)
        self.register_buffer("tiles", torch.from_numpy(tiles.astype(np.float32) / 65535), persistent=False)  # 0..1, as crops are
        self.register_buffer("_turns", torch.tensor(_TURNS), persistent=False)

    def crop(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sharp crops (B, H, W) float32 in 0..1: ``crop_px`` source pixels from corner (``y0``,
        ``x0``) of tile ``tile``, rotated by ``rot`` * 90 degrees (np.rot90), mirrored (columns)
        where ``flip``, magnified to ``image_px`` (cubic interpolation, when ``source_zoom`` is not
        [1, 1]), stretched to their 1st..99th percentiles when ``stretch_crops``.

        Output pixel (a, b) reads tile pixel ``(y0, x0) + origin + a * col_a + b * col_b``: the
        rotation and the mirror are a per-image integer affine map (:data:`_TURNS`)."""
        h, size = self.cfg.image_px, self.tiles.shape[-1]
        last = d["crop_px"] - 1 if self.zoom else torch.full_like(d["crop_px"], h - 1)
        turn = self._turns[d["rot"] * 2 + d["flip"].long()]  # (B, 6): origin (in units of last), a and b steps, as (row, col)
        y0, x0 = d["y0"] + turn[:, 0] * last, d["x0"] + turn[:, 1] * last
        grid = torch.arange(h, device=self.tiles.device)
        if self.zoom:
            step = last.to(torch.float32)[:, None] / (h - 1)
            a, b = (grid * step)[:, :, None], (grid * step)[:, None, :]
            y = y0[:, None, None] + turn[:, 2, None, None] * a + turn[:, 4, None, None] * b
            x = x0[:, None, None] + turn[:, 3, None, None] * a + turn[:, 5, None, None] * b
            xy = torch.stack([x, y], -1) * (2 / (size - 1)) - 1
            crop = torch.nn.functional.grid_sample(self.tiles[d["tile"]][:, None], xy, mode="bicubic", padding_mode="reflection", align_corners=True)[:, 0]
            crop = crop.clamp(0, 1)
        else:  # flat index into the tiles: one pass over the crop
            along_a, along_b = turn[:, 2] * size + turn[:, 3], turn[:, 4] * size + turn[:, 5]
            first = (d["tile"] * size + y0) * size + x0
            crop = self.tiles.reshape(-1)[(first[:, None] + along_a[:, None] * grid)[:, :, None] + (along_b[:, None] * grid)[:, None, :]]
        if not self.cfg.stretch_crops:
            return crop
        flat = crop.reshape(len(crop), -1)
        lo, hi = quantile(flat, 0.01)[:, None, None], quantile(flat, 0.99)[:, None, None]
        stretched = ((crop - lo) / (hi - lo).clamp(min=1e-3)).clamp(0, 1)
        return torch.where(hi - lo > 1e-3, stretched, crop)  # a flat crop stays flat instead of amplifying nothing

    def regions(self, d: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Canvas region maps (B, C, C) int64: warped Voronoi cells, or the bands of a ramp."""
        cells = voronoi(d["centres"], d["regions"], d["field_amp"], d["field_phase"], self.canvas_px)
        if self.cfg.smooth_flow <= 0:
            return cells
        bands = band_map(self.canvas_px, self.cfg.image_px, self.cfg.smooth_flow_bands, d["angle"])
        return torch.where(d["ramp"][:, None, None], bands, cells)

    def forward(self, d: Mapping[str, torch.Tensor], sharp: torch.Tensor | None = None, regions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``blurred`` (B, H, W) float32 in source units, ``region`` (B, H, W) uint8, ``valid``
        (B, H, W) uint8 and ``params`` (B, N, 4) canonical labels (NaN for unused slots). ``sharp``
        (B, H, W) and canvas ``regions`` (B, C, C) replace the draws' own (test sets)."""
        h, c = self.cfg.image_px, self.canvas_px
        lo = (c - h) // 2
        sharp = self.crop(d) if sharp is None else sharp
        regions = self.regions(d) if regions is None else regions
        params = d["params"]
        b, n = params.shape[:2]
        kernels = self.psf(params.nan_to_num(0.0).reshape(-1, 4), check=False).reshape(b, n, self.psf.size, self.psf.size)
        canvas = torch.nn.functional.pad(sharp[:, None], (lo, c - h - lo, lo, c - h - lo), mode="reflect")[:, 0]
        return {
            "blurred": blur(canvas, regions, kernels)[:, lo : lo + h, lo : lo + h],
            "region": regions[:, lo : lo + h, lo : lo + h].to(torch.uint8),
            "valid": validity(sharp, self.cfg.validity_window_px, self.cfg.validity_threshold),
            "params": canonical_sign(params),
        }


class Synthesizer:
    """Draws and renders samples from a sources file (HDF5 tiles, see blurflow.sources): the
    draws (:class:`SampleDraws`, numpy on the host), the renderer (:class:`Renderer`, on
    ``device``; compiled with ``torch.compile(fullgraph=True)`` when ``compile``) and the camera
    (blurflow.camera.CameraNoise), so training images can be made on the training device itself.

    ``static``: every batch runs the motion PSF's time steps for the longest path of the configured
    ranges (masked per kernel), so nothing is read back to the host (the training device's path,
    always when compiled); otherwise a batch steps only as long as its own longest path needs
    (fastest where host reads cost nothing: shard and test-set writers on the CPU). The kernels
    agree to float rounding (~1e-7)."""

    def __init__(self, sources: str | Path, setup: Setup, device: torch.device | str = "cpu", compile: bool = False, static: bool = False):
        self.setup = setup
        self.cfg, self.optics, self.scales, self.kernel_px = setup.synthesis, setup.optics, setup.scales, setup.kernel_px
        cfg, kernel_px = self.cfg, self.kernel_px
        self.device = torch.device(device)
        with h5py.File(sources, "r") as f:
            tiles = f["images"][()]  # (T, S, S) uint16; sources files are small enough to hold
        if tiles.shape[-1] < cfg.image_px:
            raise ValueError(f"source tiles ({tiles.shape[-1]} px) are smaller than synthesis.image_px ({cfg.image_px})")
        if kernel_px < 4 or kernel_px % 2:
            raise ValueError(f"motion.kernel_px must be an even number >= 4, got {kernel_px}")
        self.canvas_px = sfft.next_fast_len(cfg.image_px + kernel_px, real=True)
        self.draws = SampleDraws(cfg, self.canvas_px, len(tiles), tiles.shape[-1])
        a, v3 = self.scales.axial_scale_um, max(abs(cfg.v3[0]), abs(cfg.v3[1]))
        z_range = (min(cfg.z0[0] + min(cfg.v3[0], 0), 0.0) * a - 1, (cfg.z0[1] + max(cfg.v3[1], 0)) * a + 1)
        psf = MotionPSF(self.optics, self.scales, size=kernel_px, z_range_um=z_range, device=self.device)
        if static or compile:
            psf.max_steps = psf.steps_for(setup.speed_max, v3)
        self.renderer = Renderer(tiles, cfg, self.canvas_px, psf).to(self.device)
        self.noise = CameraNoise()
        self._render = torch.compile(self.renderer, fullgraph=True) if compile else self.renderer

    @property
    def psf(self) -> MotionPSF:
        """The motion PSF operator of every depth and speed the configured ranges reach."""
        return self.renderer.psf

    def tensors(self, draws: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The per-image draws as tensors on the rendering device (one small copy each)."""
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True) for k, v in draws.items() if k != "noise_seed"}

    def batch(
        self, draws: Mapping[str, np.ndarray], sharp: torch.Tensor | None = None, regions: torch.Tensor | None = None, check: bool = False,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Rendered samples on ``device`` from a batch's draws (:class:`SampleDraws`): ``image``
        (B, H, W) float32 counts, ``region`` (B, H, W) uint8, ``valid`` (B, H, W) uint8,
        ``params`` (B, N, 4) float32 canonical labels (NaN for unused slots) and the camera draws.
        ``sharp`` (B, H, W) and canvas ``regions`` (B, C, C) replace the draws' own; ``check``:
        refuse motions outside the PSF operator's reach first (draws made elsewhere than
        :class:`SampleDraws`, whose ranges the operator covers)."""
        if check:
            self.psf.check(np.nan_to_num(draws["params"]))
        d = self.tensors(draws)
        out = self._render(d, sharp, regions)
        noise = generator(int(draws["noise_seed"]), self.device)
        out["image"] = self.noise(out.pop("blurred"), d["photons"], d["quantum_efficiency"], d["background_sigma"], noise)
        return {**out, **{k: d[k] for k in CAMERA}}


CAMERA = ("photons", "quantum_efficiency", "background_sigma")  # per-image camera draws stored with each sample


def sample_rng(key: Sequence[int]) -> np.random.Generator:
    """The generator of seed key ``key`` (e.g. (seed, split, shard, batch))."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def write_samples(
    path: str | Path,
    render: Callable[[int, int], Mapping[str, torch.Tensor]],
    samples: int,
    n_max: int,
    attrs: Mapping,
    batch: int = RENDER_BATCH,
    progress: bool = True,
    desc: str = "",
) -> None:
    """Write ``samples`` rendered samples into an HDF5 file (docs/design.md format), atomically.

    ``render(b, n)`` gives batch ``b`` of ``n`` samples (:meth:`Synthesizer.batch`: labels with the
    canonical sign, ``n_max`` region slots); ``attrs`` must hold the synthesizer's description
    (:func:`describe`) and whatever else names the file.
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        h = json.loads(attrs["synthesis"])["image_px"]
        chunk = (1, h, h)
        image = f.create_dataset("image", (samples, h, h), np.uint16, chunks=chunk, compression="lzf", shuffle=True)
        region = f.create_dataset("region", (samples, h, h), np.uint8, chunks=chunk, compression="lzf")
        valid = f.create_dataset("valid", (samples, h, h), np.uint8, chunks=chunk, compression="lzf")
        params = f.create_dataset("params", (samples, n_max, 4), np.float32, fillvalue=np.nan)
        camera = {k: f.create_dataset(k, (samples,), np.float32) for k in CAMERA}
        t0 = time.perf_counter()
        for b, start in enumerate(logs.progress(range(0, samples, batch), desc=desc or Path(path).name, unit="batch", enabled=progress)):
            sl = slice(start, min(start + batch, samples))
            out = {k: v.cpu().numpy() for k, v in render(b, sl.stop - sl.start).items()}
            image[sl] = out["image"].astype(np.uint16)
            region[sl], valid[sl], params[sl] = out["region"], out["valid"], out["params"]
            for k, ds in camera.items():
                ds[sl] = out[k]
        dt = time.perf_counter() - t0
        log.info("rendered %d images of %d px in %.1f s (%.0f images/s) for %s", samples, h, dt, samples / max(dt, 1e-9), path)


def describe(syn: Synthesizer) -> dict:
    """The HDF5 attributes that describe how a synthesizer renders (optics, scales, ranges)."""
    return {
        "optics": json.dumps(syn.optics.to_dict()),
        "scales": json.dumps(syn.scales.to_dict()),
        "synthesis": json.dumps(asdict(syn.cfg)),
        "kernel_px": syn.kernel_px,
        "blurflow_version": __version__,
        "label_order": "v1,v2,v3,z0 (canonical sign: v2 > 0, or v2 == 0 and v1 >= 0)",
    }


def batch_key(seed: int, split: str, shard: int, batch: int = 0) -> tuple[int, int, int, int]:
    """Seed key of batch ``batch`` of a shard: (seed, split code, shard, batch). Online training
    draws its step ``s`` as the first batch of shard ``s`` (blurflow.data.OnlineData), so a step of
    RENDER_BATCH images is the first RENDER_BATCH samples of that shard."""
    return (seed, SPLITS[split], shard, batch)


def write_shard(path: str | Path, sources: str | Path, setup: Setup, split: str, shard: int, samples: int, progress: bool = True) -> None:
    """Synthesise ``samples`` training images into an HDF5 shard; batch b of RENDER_BATCH samples
    is keyed by (setup.seed, split, shard, b)."""
    syn = Synthesizer(sources, setup)
    seed = setup.seed
    attrs = {
        **describe(syn), "seed": seed, "split": split, "shard": shard,
        "config_hash": config_hash(setup.optics.to_dict(), setup.scales.to_dict(), asdict(setup.synthesis), {"kernel_px": setup.kernel_px}),
    }  # fmt: skip

    def render(b: int, n: int) -> dict[str, torch.Tensor]:
        return syn.batch(syn.draws.step(n, batch_key(seed, split, shard, b)))

    write_samples(path, render, samples, setup.synthesis.max_regions, attrs, progress=progress, desc=f"{split} shard {shard}")
