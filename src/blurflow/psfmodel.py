"""PSF model files: a 3D PSF as a table of planes, measured from a bead z-stack
(blurflow.particles.calibrate) or computed from the ideal optics, written as self-describing HDF5
and served to :class:`blurflow.optics.MotionPSF` as a PSF source.

The table (Z, S, S) float32 holds, at depths ``z_um`` (uniform, increasing; z = 0 is the plane of
the sharpest mean image for a measured PSF, the focal plane for the optics), the PSF integrated
over a camera pixel centred on each sample, sampled at ``pixel_um / oversample`` um with its origin
at index S // 2, divided by oversample^2 (as blurflow.optics.psf3d): a plane sums to the share
of the light that falls in the table's window (1 for the ideal optics; less for a measured PSF
far from focus, whose light spreads beyond the beads' windows).
Between planes the model is the cubic spline through them (in depth); laterally the band-limited
interpolation of the samples (the motion PSF is built from their Fourier transform). Units: um
in the sample, as in blurflow.optics.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from blurflow.files import atomic_path
from blurflow.optics import Optics, psf3d

FORMAT, VERSION = "blurflow-psf", 1
SYMMETRY_TOL = 0.1  # relative L2 difference of the planes at +z and -z below which a model is symmetric in depth
PIXEL_TOL = 1e-3  # relative difference of pixel sizes within which a model serves an image's optics
ENERGY_TOL = 0.05  # a plane may hold up to 1 + ENERGY_TOL of the light (noise of a measured PSF)


class PSFModelError(ValueError):
    """A PSF model file that cannot be read or does not serve the images (one line)."""


@dataclass(frozen=True, eq=False)
class PSFModel:
    """A 3D PSF table (module docstring) and what it was made from: ``optics`` (as given: pixel
    size, magnification, NA), ``beads`` averaged (0 for the ideal optics), ``source`` (how it was
    made), ``stack_sha256`` (of the calibration stack's pixels), ``residual`` (Z, S, S): the rms
    over the beads of their difference from the model (the table's units), ``extra``: any other
    record of the calibration (JSON-able), ``sign_gap``: the log-likelihood (per unit of
    dispersion) by which a fit's mirror image in depth must lose for its sign to count as
    measured, found on the calibration's own beads (blurflow.particles.calibrate; inf: their signs
    did not come out right at any gap, so the sign is not measured; None: not checked)."""

    table: np.ndarray
    z_um: np.ndarray
    optics: Optics
    oversample: int = 1
    beads: int = 0
    source: str = "ideal optics"
    stack_sha256: str = ""
    residual: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    sign_gap: float | None = None

    def __post_init__(self) -> None:
        table, z = np.asarray(self.table, np.float32), np.asarray(self.z_um, np.float64)
        if table.ndim != 3 or table.shape[1] != table.shape[2] or table.shape[1] < 4:
            raise PSFModelError(f"PSF table must be (Z, S, S) with S >= 4, got shape {table.shape}")
        if z.shape != (table.shape[0],) or len(z) < 4:
            raise PSFModelError(f"PSF table needs >= 4 planes with one depth each, got {table.shape[0]} planes and {z.shape} depths")
        steps = np.diff(z)
        if not (np.isfinite(z).all() and (steps > 0).all() and np.allclose(steps, steps[0], rtol=1e-3)):
            raise PSFModelError("PSF table depths must be finite, increasing and evenly spaced")
        if not np.isfinite(table).all():
            raise PSFModelError("PSF table planes must be finite")
        if not (isinstance(self.oversample, int) and self.oversample >= 1):
            raise PSFModelError(f"oversample must be a positive integer, got {self.oversample!r}")
        sums = table.sum((1, 2))  # the share of a bead's light in each plane's window
        if not ((sums > 0) & (sums < 1 + ENERGY_TOL)).all():
            raise PSFModelError(f"PSF table planes must hold a share of the light in (0, 1], got {sums.min():.3g}..{sums.max():.3g}")
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "z_um", z)

    # --- what MotionPSF reads (blurflow.optics.PSFSource) -------------------------------------

    @property
    def pixel_um(self) -> float:
        return self.optics.pixel_um

    @property
    def axial_step_um(self) -> float:
        """The axial Nyquist pitch of the optics given (um): the depth over which the PSF changes."""
        return self.optics.axial_nyquist_um

    @property
    def support_per_px(self) -> float:
        """Radius of the OTF's support (cycles per camera px): the band limit 2 NA / wavelength of
        the optics as given (beyond it a measured OTF holds only noise), within the table's grid."""
        return min(2 * self.optics.cutoff * self.optics.pixel_um, self.oversample / 2 * math.sqrt(2))

    @property
    def z_step_um(self) -> float:
        return float(self.z_um[1] - self.z_um[0])

    @property
    def z_range_um(self) -> tuple[float, float]:
        return float(self.z_um[0]), float(self.z_um[-1])

    @cached_property
    def asymmetry(self) -> float:
        """Relative L2 difference between the planes at +z and -z over the depths both sides cover
        (the cubic spline at the mirrored depths): 0 for a PSF that images +z and -z alike."""
        reach = min(-self.z_um[0], self.z_um[-1])
        if reach <= 0:
            return math.inf
        z = np.linspace(0, reach, 16)
        plus, minus = self._spline(z), self._spline(-z)
        return float(np.linalg.norm(plus - minus) / np.linalg.norm(plus + minus) * 2)

    @property
    def symmetric(self) -> bool:
        """Whether +z and -z image alike within SYMMETRY_TOL, or the calibration beads' signs did
        not come out right (``sign_gap`` inf): then the depth's sign is not measured."""
        return self.asymmetry < SYMMETRY_TOL or self.sign_gap == math.inf

    @cached_property
    def _spline(self):
        from scipy.interpolate import make_interp_spline

        return make_interp_spline(self.z_um, self.table.astype(np.float64), k=3, axis=0)

    def planes(self, z_um: np.ndarray) -> np.ndarray:
        """(B, S, S) float64: the model at depths ``z_um`` (B,) (cubic spline in depth; depths
        outside the table take its nearest plane)."""
        return self._spline(np.clip(np.asarray(z_um, np.float64), self.z_um[0], self.z_um[-1]))

    def otf(self, z_um: torch.Tensor, m: int) -> torch.Tensor:
        """(B, m, m) complex128 OTFs at depths ``z_um`` (B,) on an m x m fine grid (FFT order;
        at DC the plane's share of the light): the planes padded (or cropped) about their origin,
        Fourier transformed."""
        planes = torch.from_numpy(self.planes(torch.as_tensor(z_um).cpu().numpy()))
        s = planes.shape[-1]
        grid = planes.new_zeros(len(planes), m, m)
        lo, hi = max(0, s // 2 - m // 2), min(s, s // 2 - m // 2 + m)  # the table's rows/cols that fit
        at = lo - (s // 2 - m // 2)
        grid[:, at : at + hi - lo, at : at + hi - lo] = planes[:, lo:hi, lo:hi]
        otf = torch.fft.fft2(torch.fft.ifftshift(grid, dim=(-2, -1)))
        return otf.to(torch.as_tensor(z_um).device)

    # --- files -------------------------------------------------------------------------------

    @classmethod
    def from_optics(cls, optics: Optics, z_range_um: tuple[float, float], size_px: int = 64, z_step_um: float | None = None) -> PSFModel:
        """The ideal PSF of ``optics`` as a table: ``size_px`` camera px wide, at the optics'
        smallest unaliased oversampling, planes every ``z_step_um`` (default: an eighth of the
        axial Nyquist pitch) over ``z_range_um`` (widened to a whole number of steps)."""
        step = z_step_um or optics.axial_nyquist_um / 8
        lo, hi = z_range_um
        n_lo, n_hi = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        z = np.arange(n_lo, n_hi + 1) * step  # a plane at z = 0
        table = psf3d(optics, torch.from_numpy(z), size_px, optics.min_oversample).numpy()
        return cls(table, z, optics, optics.min_oversample, source="ideal optics (blurflow.optics.psf3d)")

    def write(self, path: str | Path) -> Path:
        """Write the model as HDF5 (atomically): datasets ``psf`` (Z, S, S), ``z_um`` (Z,),
        ``residual`` (Z, S, S) and attributes naming the format, units and provenance."""
        import h5py

        from blurflow import __version__

        path = Path(path)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            psf = f.create_dataset("psf", data=self.table, compression="gzip")
            psf.attrs["description"] = (
                "PSF integrated over a camera pixel centred on each sample / oversample^2: a plane sums to the share of a bead's light "
                "in the window (1 when all of it); origin at index S // 2"
            )
            f.create_dataset("z_um", data=self.z_um).attrs["description"] = "depth of each plane (um); z = 0 the plane of the sharpest mean image"
            residual = np.zeros_like(self.table) if self.residual is None else self.residual
            f.create_dataset("residual", data=np.asarray(residual, np.float32), compression="gzip").attrs["description"] = (
                "rms over the calibration beads of their difference from the model, per sample (the psf's units)"
            )
            f.attrs.update({
                "format": FORMAT, "version": VERSION, "software": f"blurflow {__version__}", "optics": json.dumps(self.optics.to_dict()),
                "pixel_um": self.pixel_um, "sample_pitch_um": self.pixel_um / self.oversample, "oversample": self.oversample,
                "z_step_um": self.z_step_um, "z_range_um": self.z_range_um, "z_zero": "the plane of the sharpest mean image",
                "beads": self.beads, "source": self.source, "stack_sha256": self.stack_sha256, "asymmetry": self.asymmetry,
                "symmetric": self.symmetric, "extra": json.dumps(self.extra),
            })  # fmt: skip
            if self.sign_gap is not None:
                f.attrs["sign_gap"] = self.sign_gap
        return path

    @classmethod
    def read(cls, path: str | Path) -> PSFModel:
        """Read a model file written by :meth:`write`; PSFModelError (one line) for a file that is
        missing, not HDF5, truncated, of another format or inconsistent."""
        import h5py

        path = Path(path)
        if not path.is_file():
            raise PSFModelError(f"{path}: no such PSF model file")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise PSFModelError(f"{path}: not a blurflow PSF model file (no format attribute {FORMAT!r})")
                if int(f.attrs["version"]) > VERSION:
                    raise PSFModelError(f"{path}: PSF model format version {int(f.attrs['version'])} is newer than this blurflow's {VERSION}")
                optics = Optics.from_config(json.loads(f.attrs["optics"]))
                return cls(
                    f["psf"][()], f["z_um"][()], optics, int(f.attrs["oversample"]), int(f.attrs["beads"]), str(f.attrs["source"]),
                    str(f.attrs["stack_sha256"]), f["residual"][()], json.loads(f.attrs.get("extra", "{}")),
                    float(f.attrs["sign_gap"]) if "sign_gap" in f.attrs else None,
                )  # fmt: skip
        except PSFModelError as exc:
            raise PSFModelError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
        except (OSError, KeyError, ValueError, TypeError) as exc:  # not HDF5, truncated, a dataset or attribute missing
            raise PSFModelError(f"{path}: cannot read PSF model ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None

    def check_pixel(self, optics: Optics) -> None:
        """PSFModelError unless the model's sample pixel is that of ``optics`` (within PIXEL_TOL)."""
        if abs(self.pixel_um - optics.pixel_um) > PIXEL_TOL * optics.pixel_um:
            raise PSFModelError(
                f"the PSF model's pixel is {self.pixel_um:.4g} um in the sample, the images' optics give {optics.pixel_um:.4g} um "
                "(camera pixel / magnification): calibrate with the images' optics"
            )


def stack_hash(stack: np.ndarray) -> str:
    """SHA-256 of a stack's pixels (its dtype and shape included)."""
    digest = hashlib.sha256(f"{stack.dtype.str}{stack.shape}".encode())
    digest.update(np.ascontiguousarray(stack).tobytes())
    return digest.hexdigest()
