"""Widefield optics: 3D PSF from a scalar pupil and the 3D motion PSF (paper Eq. 2-4).

Units: lengths in micrometres (um) in the sample unless a name says ``_px`` (camera pixels
projected to the sample, i.e. ``camera_pixel_um / magnification``). Spatial frequencies are in
cycles/um for pupil quantities and cycles/px for kernel quantities. Kernels are arrays of shape
(B, size, size) whose origin (the midpoint of the lateral path) is at index ``size // 2``; every
kernel sums to 1. Axis convention: index ``[..., row, col]`` = ``[y, x]``; v1 moves along x
(columns), v2 along y (rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from blurflow.schema import dataclass_values, defaults

_OPTICS, _MOTION = defaults("optics"), defaults("motion")  # the schema holds the defaults

__all__ = [
    "MotionPSF",
    "MotionScales",
    "Optics",
    "PSFSource",
    "PupilPSF",
    "SpherePSF",
    "canonical_sign",
    "noll_to_nm",
    "psf3d",
    "required_kernel_px",
    "zernike",
]


@dataclass(frozen=True)
class Optics:
    """Widefield microscope. Lengths in um; aberrations as {Noll index: waves RMS}."""

    na: float = _OPTICS["na"]
    n: float = _OPTICS["n"]
    wavelength_um: float = _OPTICS["wavelength_um"]
    magnification: float = _OPTICS["magnification"]
    camera_pixel_um: float = _OPTICS["camera_pixel_um"]
    zernike: Mapping[int, float] = field(default_factory=lambda: dict(_OPTICS["zernike"]))

    def __post_init__(self) -> None:
        for name in ("na", "n", "wavelength_um", "magnification", "camera_pixel_um"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"optics.{name} must be a positive number, got {value!r}")
        if self.na >= self.n:
            raise ValueError(
                f"optics.na must be smaller than the immersion index optics.n "
                f"(got na={self.na}, n={self.n})"
            )
        clean = {}
        for j, c in dict(self.zernike).items():
            if isinstance(j, str) and j.strip().isdigit():
                j = int(j)
            if not isinstance(j, int) or isinstance(j, bool) or j < 1:
                raise ValueError(f"optics.zernike keys must be Noll indices >= 1, got {j!r}")
            if not isinstance(c, (int, float)) or not math.isfinite(c):
                raise ValueError(f"optics.zernike[{j}] must be a finite number (waves RMS), got {c!r}")
            if c != 0:
                clean[j] = float(c)
        object.__setattr__(self, "zernike", dict(sorted(clean.items())))

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> Optics:
        """Build from the ``optics`` config section (blurflow.schema.dataclass_values)."""
        return cls(**dataclass_values(cls, "optics", cfg))

    def to_dict(self) -> dict:
        """Plain dict (JSON/HDF5-attribute friendly; Noll keys as strings)."""
        return {
            "na": self.na,
            "n": self.n,
            "wavelength_um": self.wavelength_um,
            "magnification": self.magnification,
            "camera_pixel_um": self.camera_pixel_um,
            "zernike": {str(j): c for j, c in self.zernike.items()},
        }

    @property
    def pixel_um(self) -> float:
        """Camera pixel size projected to the sample (um)."""
        return self.camera_pixel_um / self.magnification

    @property
    def cutoff(self) -> float:
        """Coherent (pupil) cutoff NA/lambda in cycles/um."""
        return self.na / self.wavelength_um

    @property
    def lateral_nyquist_um(self) -> float:
        """Nyquist sampling of the intensity PSF, lambda / (4 NA), in um."""
        return self.wavelength_um / (4 * self.na)

    @property
    def axial_nyquist_um(self) -> float:
        """Axial Nyquist sampling of the intensity PSF, lambda / (2 (n - sqrt(n^2 - NA^2))), um."""
        return self.wavelength_um / (2 * (self.n - math.sqrt(self.n**2 - self.na**2)))

    @property
    def min_oversample(self) -> int:
        """Smallest grid refinement of the camera pixel that holds the whole OTF unaliased."""
        return max(1, math.floor(4 * self.na * self.pixel_um / self.wavelength_um) + 1)

COMPONENTS = ("v1", "v2", "v3", "z0")  # the motion parameters, in this order everywhere


@dataclass(frozen=True)
class MotionScales:
    """Label scales: lateral motion (v1, v2) * L px, axial motion v3 * A um, start depth z0 * A um."""

    lateral_scale_px: float = _MOTION["lateral_scale_px"]
    axial_scale_um: float = _MOTION["axial_scale_um"]

    def __post_init__(self) -> None:
        for name in ("lateral_scale_px", "axial_scale_um"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"motion.{name} must be a positive number, got {value!r}")

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> MotionScales:
        """Build from the ``motion`` config section (blurflow.schema.dataclass_values)."""
        return cls(**dataclass_values(cls, "motion", cfg))

    def to_dict(self) -> dict:
        return {"lateral_scale_px": self.lateral_scale_px, "axial_scale_um": self.axial_scale_um}


def required_kernel_px(optics: Optics, scales: MotionScales, speed_max: float, depth_max: float) -> int:
    """Smallest even motion-PSF kernel (px) that holds a lateral path of ``speed_max * L`` px
    (centred) with, at either end, the geometric defocus blur of depth ``depth_max * A`` um (radius
    z tan(asin(NA / n))), plus two Airy FWHM of margin on each side."""
    streak = speed_max * scales.lateral_scale_px
    radius = depth_max * scales.axial_scale_um * math.tan(math.asin(optics.na / optics.n)) / optics.pixel_um
    fwhm = 0.5145 * optics.wavelength_um / optics.na / optics.pixel_um
    size = math.ceil(streak + 2 * radius + 4 * fwhm)
    return size + size % 2


def noll_to_nm(j: int) -> tuple[int, int]:
    """Radial order n and azimuthal frequency m of Noll index j (m < 0: sine term)."""
    if j < 1:
        raise ValueError(f"Noll index must be >= 1, got {j}")
    n, j1 = 0, j - 1
    while j1 > n:
        n += 1
        j1 -= n
    m = (-1) ** j * ((n % 2) + 2 * ((j1 + ((n + 1) % 2)) // 2))
    return n, m


def zernike(j: int, rho: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """RMS-normalised Zernike polynomial Z_j (Noll) on the unit disc (zero outside)."""
    n, m = noll_to_nm(j)
    am = abs(m)
    radial = torch.zeros_like(rho)
    for k in range((n - am) // 2 + 1):
        coef = (-1) ** k * math.factorial(n - k)
        coef /= math.factorial(k) * math.factorial((n + am) // 2 - k) * math.factorial((n - am) // 2 - k)
        radial = radial + coef * rho ** (n - 2 * k)
    if m == 0:
        z = math.sqrt(n + 1) * radial
    elif m > 0:
        z = math.sqrt(2 * (n + 1)) * radial * torch.cos(am * theta)
    else:
        z = math.sqrt(2 * (n + 1)) * radial * torch.sin(am * theta)
    return torch.where(rho <= 1, z, torch.zeros_like(z))


def _fine_otf(optics: Optics, z_um: torch.Tensor, m: int, pitch_um: float, pixel_integrate: bool) -> torch.Tensor:
    """Normalised OTF (value 1 at DC) of the intensity PSF at depths z_um (B,), float64.

    Computed on a periodic grid of m x m samples of pitch ``pitch_um`` (FFT order, origin at
    index 0); with ``pixel_integrate`` it includes the camera-pixel box (a sinc on the OTF).
    Normalisation uses the pupil energy (Parseval), the same for every depth, so the unit DC value
    is energy conservation, not a per-slice rescaling. Returns (B, M, M) complex128.
    """
    f = torch.fft.fftfreq(m, d=pitch_um, dtype=torch.float64, device=z_um.device)  # cycles/um
    ky, kx = torch.meshgrid(f, f, indexing="ij")
    k2 = kx**2 + ky**2
    rho = torch.sqrt(k2) / optics.cutoff
    inside = rho <= 1
    phase = torch.zeros_like(rho)
    theta = torch.atan2(ky, kx)
    for j, c in optics.zernike.items():
        phase = phase + c * zernike(j, rho, theta)
    kn = optics.n / optics.wavelength_um
    kz = torch.sqrt(torch.clamp(kn**2 - k2, min=0.0)) - kn  # piston removed, exact (non-paraxial)
    pupil = torch.where(inside, torch.polar(torch.ones_like(rho), 2 * math.pi * phase), 0)
    energy = inside.sum().to(torch.float64) / m**2  # sum |a|^2 by Parseval
    field = pupil * torch.polar(torch.ones_like(rho), 2 * math.pi * z_um.to(torch.float64)[:, None, None] * kz)
    intensity = torch.fft.ifft2(field).abs() ** 2
    otf = torch.fft.fft2(intensity) / energy
    if pixel_integrate:
        otf = otf * (torch.sinc(kx * optics.pixel_um) * torch.sinc(ky * optics.pixel_um))
    return otf


def psf3d(
    optics: Optics,
    z_um: torch.Tensor | float,
    size: int,
    oversample: int = 1,
    pixel_integrate: bool = True,
) -> torch.Tensor:
    """Static 3D PSF at depths ``z_um`` (um; tensor (B,) or scalar) -> (B, size*oversample, ...).

    Output pitch is ``pixel_um / oversample``; with ``pixel_integrate`` every value is the
    intensity integrated over a camera pixel centred on that sample. Computed on a grid fine
    enough to hold the OTF unaliased, then decimated (folded in the Fourier domain). Each PSF
    sums to 1, float32, origin at index ``(size * oversample) // 2``.
    """
    z = torch.as_tensor(z_um, dtype=torch.float64).reshape(-1)
    fold = math.ceil(optics.min_oversample / oversample)
    out = size * oversample
    otf = _fine_otf(optics, z, out * fold, optics.pixel_um / (oversample * fold), pixel_integrate)
    otf = otf.reshape(-1, fold, out, fold, out).sum(dim=(1, 3))
    psf = torch.fft.ifft2(otf).real
    return torch.fft.fftshift(psf, dim=(-2, -1)).to(torch.float32)


def canonical_sign(params: torch.Tensor) -> torch.Tensor:
    """Flip (v1, v2) -> (-v1, -v2) so that v2 > 0, or v2 == 0 and v1 >= 0 (docs/design.md)."""
    v1, v2 = params[..., 0], params[..., 1]
    flip = (v2 < 0) | ((v2 == 0) & (v1 < 0))
    sign = torch.where(flip, -1.0, 1.0).to(params.dtype)
    out = params.clone()
    out[..., 0] = v1 * sign
    out[..., 1] = v2 * sign
    return out


def paper_sign(estimate: np.ndarray, resolved: np.ndarray) -> np.ndarray:
    """(M, 4) (v1, v2, v3, z0) with the lateral motion of each bead whose direction is not
    resolved turned to v2 >= 0 (an orientation, signed as in the paper's tables)."""
    out = estimate.copy()
    out[:, :2] *= np.where(~resolved & (out[:, 1] < 0), -1, 1)[:, None]
    return out


class PSFSource(Protocol):
    """What MotionPSF needs of a 3D PSF: its OTF at any depth, pixel-integrated, on a grid fine
    enough to hold it unaliased (pitch ``pixel_um / oversample``); at DC the share of a point's
    light it holds (1 for the pupil; less far from focus for a measured PSF's window)."""

    pixel_um: float  # camera pixel projected to the sample, um
    oversample: int  # fine-grid samples per camera pixel (each axis)
    axial_step_um: float  # depth over which the PSF changes appreciably (the axial Nyquist pitch), um
    support_per_px: float  # radius of the OTF's support, cycles per camera px
    symmetric: bool  # whether +z and -z image alike (the depth's sign cannot be measured)

    def otf(self, z_um: torch.Tensor, m: int) -> torch.Tensor:
        """(B, m, m) complex128 OTFs at depths ``z_um`` (B,) float64, FFT order."""
        ...


class PupilPSF:
    """The scalar-pupil PSF of an :class:`Optics` (its Zernike aberrations included) as a
    :class:`PSFSource`: symmetric in depth without aberrations."""

    def __init__(self, optics: Optics) -> None:
        self.optics = optics
        self.pixel_um, self.oversample, self.axial_step_um = optics.pixel_um, optics.min_oversample, optics.axial_nyquist_um
        self.support_per_px = 2 * optics.cutoff * optics.pixel_um
        self.symmetric = not optics.zernike

    def otf(self, z_um: torch.Tensor, m: int) -> torch.Tensor:
        return _fine_otf(self.optics, z_um, m, self.pixel_um / self.oversample, pixel_integrate=True)


class SpherePSF:
    """The image of a uniformly fluorescent sphere of ``diameter_um`` (a tracer bead that is not a
    point) under a :class:`PSFSource`, as a PSF source: the 3D PSF convolved with the sphere, i.e.
    the sum over ``slices`` slabs of the sphere (weighted by their cross-section) of the PSF at the
    slab's depth times the OTF of its disc, 2 J1(2 pi f r) / (2 pi f r)."""

    def __init__(self, source: PSFSource, diameter_um: float, slices: int | None = None) -> None:
        if not (math.isfinite(diameter_um) and diameter_um > 0):
            raise ValueError(f"a bead diameter must be a positive number of um, got {diameter_um!r}")
        self.source, self.radius_um = source, diameter_um / 2
        self.pixel_um, self.oversample, self.axial_step_um = source.pixel_um, source.oversample, source.axial_step_um
        self.support_per_px, self.symmetric = source.support_per_px, source.symmetric
        n = slices or max(3, 2 * math.ceil(diameter_um / (source.axial_step_um / 4) / 2) + 1)
        z = (torch.arange(n, dtype=torch.float64) + 0.5) / n * diameter_um - self.radius_um  # slab midpoints
        area = self.radius_um**2 - z**2
        self._z, self._r, self._w = z, area.sqrt(), area / area.sum()

    def otf(self, z_um: torch.Tensor, m: int) -> torch.Tensor:
        f = torch.fft.fftfreq(m, d=self.pixel_um / self.oversample, dtype=torch.float64, device=z_um.device)
        rho = torch.hypot(f[:, None], f[None, :])
        out = 0
        for dz, r, w in zip(self._z.tolist(), self._r.tolist(), self._w.tolist()):
            x = 2 * math.pi * rho * r
            disc = torch.where(x > 1e-6, 2 * torch.special.bessel_j1(x) / x.clamp(min=1e-6), torch.ones_like(x))
            out = out + w * self.source.otf(z_um.to(torch.float64) - dz, m) * disc
        return out


class MotionPSF(torch.nn.Module):
    """Batched motion PSF (paper Eq. 4) for one PSF (an :class:`Optics`' pupil or any
    :class:`PSFSource`, such as a measured PSF model), label scales and kernel size: an operator
    whose constants (the defocus OTF table and the fold to the camera grid) are buffers.

    The time average of the pixel-integrated 3D PSF along the path that starts at depth
    ``z0 * A`` um and moves by ``(v1, v2) * L`` px laterally and ``v3 * A`` um axially during the
    exposure. Method: the exposure is split into K equal steps (midpoint rule in depth); within a
    step the lateral motion is integrated exactly (a sinc on the OTF), and the step's shift is a
    phase ramp updated by complex multiplication. Depth enters through a table of defocus OTFs
    (linear interpolation, pitch ``axial_nyquist / 32``) built once on a grid fine enough that
    the OTF is not aliased; the result is folded to the camera grid and inverse transformed.
    K is 1 without axial motion (exact); otherwise consecutive positions differ by at most
    ``lateral_step_px`` laterally and ``axial_nyquist / axial_steps_per_nyquist`` axially.

    With ``max_steps`` every batch runs that many steps, each kernel's steps beyond its own K
    reading a zero row of the table: shapes and op counts do not depend on the parameters and
    nothing is read back to the host (``torch.compile(fullgraph=True)`` traces it; parameters are
    checked by :meth:`check` where they enter, not here). Without it the loop runs as many steps
    as the longest path needs, on the kernels that still need them (fastest for mixed paths).
    """

    table_per_nyquist = 32

    def __init__(
        self,
        optics: Optics | PSFSource,
        scales: MotionScales,
        size: int = 32,
        z_range_um: tuple[float, float] | None = None,
        lateral_step_px: float = 0.5,
        axial_steps_per_nyquist: float = 16.0,
        device: torch.device | str | None = None,
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        if size < 4 or size % 2:
            raise ValueError(f"motion.kernel_px must be an even number >= 4, got {size}")
        self.source = PupilPSF(optics) if isinstance(optics, Optics) else optics
        self.scales, self.size, self.max_steps = scales, size, max_steps
        self.lateral_step_px = lateral_step_px
        self.axial_step_um = self.source.axial_step_um / axial_steps_per_nyquist
        lo, hi = z_range_um or (-2 * scales.axial_scale_um, 2 * scales.axial_scale_um)
        dz = self.source.axial_step_um / self.table_per_nyquist
        nz = max(2, math.ceil((hi - lo) / dz) + 1)
        self.z_lo, self.dz = lo, (hi - lo) / (nz - 1)
        self.z_hi = lo + (nz - 1) * self.dz

        sub = self.source.oversample
        m = size * sub
        z = torch.linspace(lo, self.z_hi, nz, dtype=torch.float64)
        k = torch.fft.fftfreq(m, d=1.0 / m, dtype=torch.float64).round().long()
        ky, kx = torch.meshgrid(k, k, indexing="ij")
        r_max = self.source.support_per_px * size + 1  # OTF support radius, in samples
        keep = (kx**2 + ky**2 <= r_max**2) & (kx % size <= size // 2)  # support x rfft half
        rows = max(1, TABLE_BYTES // (16 * m * m))  # depths computed at once: a deep range on a fine grid would not fit in memory
        table = torch.cat([self.source.otf(part, m)[:, keep].to(torch.complex64) for part in z.split(rows)])
        table *= (1 - 2 * ((kx + ky)[keep] % 2)).to(table.dtype)  # (-1)^(kx + ky): the kernel's origin moved to index size // 2 (fftshift)
        table = torch.cat([table, table.new_zeros(nz, 1)], 1)  # a last sample 0 at every depth: where the fold's padding points
        zero = table.new_zeros(1, table.shape[1])  # row nz of both: what a step beyond a kernel's own K reads
        nothing = torch.zeros(1)
        self.register_buffer("_fy", torch.cat([ky[keep].to(torch.float32) / size, nothing]), persistent=False)  # cycles/px
        self.register_buffer("_fx", torch.cat([kx[keep].to(torch.float32) / size, nothing]), persistent=False)
        self.register_buffer("_fold", _fold_index((ky[keep] % size) * (size // 2 + 1) + kx[keep] % size, size * (size // 2 + 1)), persistent=False)
        rates = torch.stack([self._fx, self._fy]) * (-2j * math.pi)  # d/ds of exp(-2 pi i f s): the offsets' derivatives
        self.register_buffer("_rates", rates[:, self._fold.T], persistent=False)  # (2, columns, bins) as the fold gathers them
        self.register_buffer("_table", torch.cat([table, zero]), persistent=False)
        self.register_buffer("_slope", torch.cat([torch.diff(table, dim=0), zero, zero]), persistent=False)
        self.to(device or "cpu")

    @property
    def device(self) -> torch.device:
        return self._table.device

    def n_steps(self, params: torch.Tensor, step_factor: int = 1) -> torch.Tensor:
        """Time steps per parameter set (B,), int64 (1 when there is no axial motion)."""
        v1, v2, v3 = params[:, 0], params[:, 1], params[:, 2]
        lateral = torch.hypot(v1, v2) * self.scales.lateral_scale_px / self.lateral_step_px
        axial = v3.abs() * self.scales.axial_scale_um / self.axial_step_um
        k = torch.ceil(torch.maximum(lateral, axial)).clamp(min=1).long()
        return torch.where(v3 == 0, torch.ones_like(k), k) * step_factor

    def steps_for(self, speed_max: float, v3_max: float) -> int:
        """Time steps of the longest path of lateral speed ``speed_max`` and axial ``v3_max``
        (normalised): the ``max_steps`` that covers them."""
        return int(self.n_steps(torch.tensor([[speed_max, 0.0, v3_max, 0.0]]))[0])

    def check(self, params: torch.Tensor | np.ndarray) -> None:
        """Raise ValueError unless params (B, 4) are finite, keep their depths inside the table
        and need at most ``max_steps`` time steps (a host read: call where parameters enter)."""
        p = torch.as_tensor(params, dtype=torch.float32).reshape(-1, 4).cpu()
        if not torch.isfinite(p).all():
            raise ValueError("motion parameters must be finite")
        if not len(p):
            return
        z_start, z_end = p[:, 3] * self.scales.axial_scale_um, (p[:, 3] + p[:, 2]) * self.scales.axial_scale_um
        z_min, z_max = float(torch.minimum(z_start, z_end).min()), float(torch.maximum(z_start, z_end).max())
        tol = 1e-4 * self.dz
        if z_min < self.z_lo - tol or z_max > self.z_hi + tol:
            raise ValueError(f"depths {z_min:.3g}..{z_max:.3g} um leave the PSF table range {self.z_lo:.3g}..{self.z_hi:.3g} um (set z_range_um)")
        steps = int(self.n_steps(p).max())
        if self.max_steps is not None and steps > self.max_steps:
            raise ValueError(f"a path needs {steps} time steps, more than the {self.max_steps} of this PSF operator (max_steps)")

    def forward(
        self, params: torch.Tensor, step_factor: int = 1, chunk: int | None = None, offset_px: torch.Tensor | None = None, gradient: bool = False,
        check: bool = True, motion: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """Kernels (B, size, size) float32 for params (B, 4) = (v1, v2, v3, z0), normalised units,
        computed ``chunk`` kernels at a time (all at once by default). ``offset_px`` (B, 2): (x, y)
        shift of the path midpoint from the kernel origin, px (exact, applied before the kernel is
        sampled on the camera grid). With ``gradient``, (B, 7, size, size): the kernels and their
        derivatives by the x and y offsets (per px) and by v1, v2, v3, z0 (analytic: the sums over
        time steps carry the step's time and the table's slope along; a step count or table row
        that changes with the parameters is held); without ``motion`` (still paths, whose v1, v2, v3
        are held), (B, 4, size, size): the kernels and their derivatives by x, y and z0 alone.
        ``check``: :meth:`check` the params first."""
        params = torch.as_tensor(params, dtype=torch.float32, device=self.device).reshape(-1, 4)
        if check:
            self.check(params)
        offset = None if offset_px is None else torch.as_tensor(offset_px, dtype=torch.float32, device=self.device).reshape(-1, 2)
        steps = self.n_steps(params, step_factor)
        if self.max_steps is not None:  # static: every kernel in one pass, in its own place
            acc = self._kernels(params, steps, offset, self.max_steps * step_factor, gradient=gradient, motion=motion)
            return self._image(acc, offsets=True) if gradient else self._image(acc[:, None])[:, 0]
        out = torch.empty(params.shape[0], (7 if motion else 4) if gradient else 1, self.size, self.size, device=self.device)
        order = torch.argsort(steps, descending=True, stable=True)  # the loop below shrinks to the kernels still stepping
        for start in range(0, params.shape[0], chunk or max(1, params.shape[0])):
            idx = order[start : start + (chunk or params.shape[0])]
            acc = self._kernels(params[idx], steps[idx], None if offset is None else offset[idx], int(steps[idx[0]]), True, gradient, motion)
            out[idx] = self._image(acc, offsets=True) if gradient else self._image(acc[:, None])
        return out if gradient else out[:, 0]

    def _kernels(
        self, params: torch.Tensor, steps: torch.Tensor, offset: torch.Tensor | None, total: int, shrink: bool = False, gradient: bool = False,
        motion: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """Fine-grid OTF samples (B, support) of the kernels, shifted by ``offset`` (px), in
        ``total`` time steps; a kernel's steps beyond its own count read the table's zero row.
        ``shrink`` (params sorted by descending step count): each step touches only the kernels
        that still need it, whose numbers are read back to the host once. With ``gradient``,
        (B, 5, support): the kernel's and its derivatives' by v1, v2, v3, z0; without ``motion``
        (B, 2, support): the kernel's and its derivative by z0."""
        kf = steps.to(torch.float32)[:, None]
        d = params[:, :2] * self.scales.lateral_scale_px  # (dx, dy) px over the exposure
        a = d[:, :1] * self._fx + d[:, 1:2] * self._fy  # cycles of phase over the exposure
        ones = torch.ones_like(a)
        angle = -2 * math.pi * a * (0.5 / kf - 0.5)  # step 0, path midpoint = 0
        if offset is not None:  # the shift's phase ramp taken in at step 0: every sum below is linear in the phase
            angle -= 2 * math.pi * (offset[:, :1] * self._fx + offset[:, 1:2] * self._fy)
        phase = torch.polar(ones, angle)
        ratio = torch.polar(ones, -2 * math.pi * a / kf)
        acc = torch.zeros_like(phase)  # sum of OTF(z_k) * shift_k
        acc_slope = torch.zeros_like(phase)  # sum of dOTF/dz(z_k) * shift_k, per table row
        zero, last = self._table.shape[0] - 1, self._table.shape[0] - 3  # the zero row; the last row a step starts from
        # every step's table row and position between rows at once, (B, total)
        k = torch.arange(total, device=a.device)
        z = (params[:, 3:4] + params[:, 2:3] * (k + 0.5) / kf) * self.scales.axial_scale_um
        u = ((z - self.z_lo) / self.dz).clamp(0, last + 1)
        rows = torch.where(k < steps[:, None], u.floor().long().clamp(max=last), zero)
        within = (u - rows).to(torch.complex64)[..., None]
        timed_sums = gradient and motion
        if timed_sums:  # the same sums weighted by each step's time t_k (exposure units, 0 at the midpoint)
            acc_t, acc_slope_t = torch.zeros_like(phase), torch.zeros_like(phase)
            time = ((k + 0.5) / kf - 0.5).to(torch.complex64)[..., None]
        if shrink:  # kernels with more than k steps: one read for the whole loop
            active = (params.shape[0] - torch.cumsum(torch.bincount(steps, minlength=total + 1), 0)).tolist()
        for k in range(total):
            n = active[k] if shrink else params.shape[0]  # (all, when static)
            j = rows[:n, k]
            slope = self._slope.index_select(0, j)
            value = self._table.index_select(0, j).addcmul_(within[:n, k], slope)
            acc[:n].addcmul_(value, phase[:n])
            acc_slope[:n].addcmul_(slope, phase[:n])
            if timed_sums:
                timed = phase[:n] * time[:n, k]
                acc_t[:n].addcmul_(value, timed)
                acc_slope_t[:n].addcmul_(slope, timed)
            phase[:n].mul_(ratio[:n])
        rows_per_z = self.scales.axial_scale_um / self.dz  # table rows per unit of z0
        # Exact integral over each step of (OTF + slope * tau) * exp(-i 2 pi a tau), |tau| <= h/2.
        h = 1 / kf
        x = a * h
        small = x.abs() < 1e-3
        safe = torch.where(small, 1, x)
        sinc = torch.sinc(x)
        dsinc = torch.where(small, -(math.pi**2) * x / 3, (torch.cos(math.pi * x) - sinc) / safe)
        within_step = (1j * h**2 / (2 * math.pi)) * dsinc
        by_z0 = rows_per_z * acc_slope * (h * sinc) if gradient else None
        if timed_sums:  # d/da of the step integral, a the phase cycles; d/dz0 and d/dv3 through the table's slope
            d2sinc = torch.where(small, -(math.pi**2) / 3, -(math.pi**2) * sinc - 2 * dsinc / safe)
            rho = (params[:, 2] * rows_per_z).to(torch.complex64)[:, None]  # rows per exposure
            by_a = (
                -2j * math.pi * acc_t * (h * sinc)
                + acc * (h**2 * dsinc)
                + rho * (acc_slope_t * (h**2 * dsinc) + acc_slope * ((1j * h**3 / (2 * math.pi)) * d2sinc))
            )
            by_v3 = rows_per_z * ((acc_slope_t + 0.5 * acc_slope) * (h * sinc) + acc_slope * within_step)
        acc_slope.mul_((params[:, 2] * self.scales.axial_scale_um / self.dz).to(torch.complex64)[:, None])  # rows per exposure
        acc.mul_(h * sinc).addcmul_(acc_slope, within_step)
        if timed_sums:
            lateral = self.scales.lateral_scale_px
            acc = torch.stack([acc, by_a * (lateral * self._fx), by_a * (lateral * self._fy), by_v3, by_z0], 1)
        elif gradient:
            acc = torch.stack([acc, by_z0], 1)
        return acc

    def _image(self, acc: torch.Tensor, offsets: bool = False) -> torch.Tensor:
        """Images (B, M, size, size) on the camera grid from fine-grid OTF samples (B, M, support):
        each camera-grid frequency sums the fine samples that fold onto it (gathers added column by
        column of the fold index, in a fixed order: deterministic on every device, and 3x faster
        than one gather of all columns summed). With ``offsets``, (B, M + 2, size, size): after the
        first image, its derivatives by the x and y offsets (its samples weighted by -2 pi i f)."""
        b, m = acc.shape[:2]
        coarse = acc.new_zeros(b, m + 2 if offsets else m, self._fold.shape[0])
        for i, column in enumerate(self._fold.unbind(1)):
            part = acc[:, :, column]
            if offsets:
                coarse[:, 1].addcmul_(part[:, 0], self._rates[0, i])
                coarse[:, 2].addcmul_(part[:, 0], self._rates[1, i])
                coarse[:, 3:] += part[:, 1:]
            coarse[:, 0] += part[:, 0]
        coarse = coarse.reshape(b * coarse.shape[1], self.size, -1)
        return torch.fft.irfft2(coarse, s=(self.size, self.size)).reshape(b, -1, self.size, self.size)  # origin at size // 2: the table's signs


TABLE_BYTES = 2**28  # bytes of full-grid OTFs computed at once while MotionPSF builds its table


def _fold_index(bins: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(n_bins, m) indices into the samples whose bin is each bin (``bins``: the bin of each
    sample), padded with the index ``len(bins)`` (a sample 0 that the caller appends)."""
    order = torch.argsort(bins, stable=True)
    counts = torch.bincount(bins, minlength=n_bins)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(bins)) - first[bins[order]]
    index = torch.full((n_bins, int(counts.max())), len(bins), dtype=torch.long)
    index[bins[order], slot] = order
    return index
