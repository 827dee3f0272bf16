"""Which torch device a run uses: a name from the config or the command line (``auto``, ``cpu``,
``cuda``, ``cuda:N``) checked against this machine, and whether to compile there."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def parse_device(name: str) -> torch.device:
    """The device a name means (``cpu``, ``cuda`` or ``cuda:N``); ``ValueError`` for other names."""
    import torch  # here: the Snakefile imports this module, and every job reads the Snakefile

    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N")
    return device


def pick_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one) or a name for :func:`parse_device`; ``ValueError`` for a
    CUDA device this machine does not have."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            have = "has no CUDA GPU" if count == 0 else f"has {count} CUDA GPU(s)"
            raise ValueError(f"device {name!r} asked for, but this machine {have}; use auto or cpu")
    return device


def compile_enabled(setting: str | bool, device: torch.device) -> bool:
    """``train.compile``: ``auto`` compiles on CUDA only (on the CPU compilation costs more than it
    saves in the default run: docs/training.md), ``true`` / ``false`` force it."""
    return device.type == "cuda" if setting == "auto" else bool(setting)
