"""The camera's noise model: photon counts of a blurred image, apart from the optics that blur it.

Units: the signal is in source intensity units (a sharp source lies in 0..1), ``photons`` is the
expected photon count per pixel at intensity 1, ``quantum_efficiency`` the share detected, the
background a half-normal offset of scale ``background_sigma`` counts. Counts are camera units
(photo-electrons, gain 1), rounded and clipped to the uint16 range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["CameraNoise", "generator"]


def generator(key: Sequence[int] | int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from an integer key (e.g. (seed, split, step)):
    the same key gives the same draws on one device type."""
    seed = np.random.SeedSequence(list(np.atleast_1d(key).tolist())).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(seed))


class CameraNoise(torch.nn.Module):
    """Counts (B, H, W) float32 integers in 0..65535: ``Poisson(quantum_efficiency * photons *
    signal) + |N(0, background_sigma^2)|``, one Poisson and one normal draw for the whole batch."""

    def forward(
        self, signal: torch.Tensor, photons: torch.Tensor, quantum_efficiency: torch.Tensor, background_sigma: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``signal`` (B, H, W) in source units; ``photons``, ``quantum_efficiency`` and
        ``background_sigma`` (B,), per image."""
        scale = (quantum_efficiency * photons)[:, None, None]
        expected = scale * signal.clamp(min=0)
        background = torch.randn(expected.shape, generator=generator, device=expected.device, dtype=expected.dtype).abs_()
        counts = torch.poisson(expected, generator=generator) + background * background_sigma[:, None, None]
        return counts.round_().clamp_(0, 65535)
