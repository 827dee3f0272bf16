"""Measurability study: how well each component can be learned against the blur scale.

For every setting (L px of lateral motion and A um of axial motion per unit speed; a longer
exposure scales both), a network of the configured architecture is trained online on
``study.samples`` new images of ``study.image_px`` px with a kernel that holds the longest streak
and the widest defocus (blurflow.optics.required_kernel_px), and scored on a fixed validation set
of the same setting. Everything else (sources, ranges, camera, network, optimiser) is the
workflow's configuration, so the settings differ only in the blur scale.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pandas as pd

from blurflow.optics import COMPONENTS, MotionScales
from blurflow.synthesis import Setup


def setting_name(lateral_px: float, axial_um: float) -> str:
    return f"L{lateral_px:g}_A{axial_um:g}"


def setting_config(config: Mapping, lateral_px: float, axial_um: float) -> dict:
    """The workflow config of one study setting (train online on ``study.samples`` images)."""
    c = copy.deepcopy(dict(config))
    s, syn = c["study"], c["synthesis"]
    scales = MotionScales(lateral_px, axial_um)
    kernel = replace(Setup.from_config(c), scales=scales).required_kernel_px()
    c["motion"] = {**c["motion"], **scales.to_dict(), "kernel_px": kernel}
    per_epoch = math.ceil(s["samples"] / s["epochs"] / s["val_samples"])
    c["synthesis"] = {**syn, "image_px": s["image_px"], "samples_per_shard": s["val_samples"], "shards": {"train": per_epoch, "val": 1}}
    c["train"] = {**c["train"], "data": "online", "epochs": s["epochs"], "max_minutes": None, "pretrained_weights": None}
    return c


def summary(config: Mapping, logs: Mapping[tuple[float, float], str | Path]) -> pd.DataFrame:
    """One row per setting: scales, kernel, budget, speed and the final validation R^2."""
    rows = []
    for (lateral, axial), path in logs.items():
        last = pd.read_csv(path).iloc[-1]
        rows.append(
            {
                "lateral_scale_px": lateral,
                "axial_scale_um": axial,
                "kernel_px": setting_config(config, lateral, axial)["motion"]["kernel_px"],
                "samples": int(last["samples"]),
                "minutes": round(float(last["minutes"]), 1),
                "images_per_s": round(float(last["images_per_s"]), 1),
                **{f"r2_{c}": round(float(last[f"val_r2_{c}"]), 4) for c in COMPONENTS},
                "r2_mean": round(float(last["val_r2_mean"]), 4),
            }
        )
    return pd.DataFrame(rows)


def settings(config: Mapping) -> list[tuple[float, float]]:
    """The (L, A) pairs of ``study.settings``."""
    return [(float(lateral), float(axial)) for lateral, axial in config["study"]["settings"]]
