"""The workflow configuration, checked before any job runs: one line naming the key for a schema
violation or for any constraint the library checks (optics, motion, synthesis ranges, sizes,
architecture, sources)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import jsonschema
import yaml

from blurflow.optics import MotionScales, Optics, required_kernel_px
from blurflow.synthesis import SynthesisConfig

SCHEMA = "workflow/schemas/config.schema.yaml"


def schema_error(config: Mapping, schema: str | Path) -> str:
    """One line for the most relevant violation of ``schema`` by ``config`` ('' if none)."""
    with open(schema) as f:
        validator = jsonschema.Draft202012Validator(yaml.safe_load(f))
    best = jsonschema.exceptions.best_match(validator.iter_errors(dict(config)))
    if best is None:
        return ""
    key = ".".join(str(p) for p in best.absolute_path)
    if best.validator == "additionalProperties":
        unknown = sorted(set(best.instance) - set(best.schema.get("properties", {})))
        names = ", ".join(f"{key}.{u}" if key else str(u) for u in unknown)
        return f"unknown config key {names} (the keys are documented in {SCHEMA})"
    return f"config key {key or '(top level)'}: {best.message}"


def check(config: Mapping) -> list[str]:
    """Check a config whose defaults are filled in; ``ValueError`` naming the key of the first
    violated constraint. Returns warnings (settings that work but are probably not meant)."""
    from blurflow.train import TrainConfig, parse_device

    optics = Optics.from_config(config["optics"])
    scales = MotionScales.from_config(config["motion"])
    syn = SynthesisConfig.from_config(config["synthesis"])
    TrainConfig.from_config(config["train"], seed=config["seed"])
    if config["train"]["device"] != "auto":  # only the name: whether the GPU exists is the job's node's business
        try:
            parse_device(config["train"]["device"])
        except ValueError as exc:
            raise ValueError(f"train.device: {exc}") from None
    src, tests = config["sources"], config["testsets"]
    sizes = (("synthesis.image_px", syn.image_px), ("testsets.image_px", tests["image_px"]), ("study.image_px", config["study"]["image_px"]))
    for key, size in sizes:
        if src["tile_px"] < size:
            raise ValueError(f"sources.tile_px ({src['tile_px']}) must be at least {key} ({size})")
    for kind_key, folder_key in (("kind", "folder"), ("test_kind", "test_folder")):
        kinds = [src[kind_key]] if isinstance(src[kind_key], str) else src[kind_key]
        if "folder" in kinds:
            if not src[folder_key]:
                raise ValueError(f"sources.{kind_key} 'folder' needs sources.{folder_key}")
            if not Path(src[folder_key]).is_dir():
                raise ValueError(f"sources.{folder_key}: {src[folder_key]} is not a folder")
    weights, encoder = config["train"]["pretrained_weights"], config["train"]["encoder"]
    if weights and Path(weights).as_posix() != f"resources/weights/{encoder}-imagenet.pth" and not Path(weights).is_file():
        raise ValueError(f"train.pretrained_weights: {weights} not found (resources/weights/{encoder}-imagenet.pth is downloaded)")
    if tests["two_zone"]["evaluated"] > tests["two_zone"]["count"]:
        raise ValueError(f"testsets.two_zone.evaluated ({tests['two_zone']['evaluated']}) exceeds testsets.two_zone.count ({tests['two_zone']['count']})")
    warnings = []
    v_max = math.hypot(*(max(abs(v) for v in syn.v_lateral),) * 2)
    depth_max = max(abs(syn.z0[0]), abs(syn.z0[1])) + max(abs(syn.v3[0]), abs(syn.v3[1]))
    need = required_kernel_px(optics, scales, v_max, depth_max)
    if config["motion"]["kernel_px"] < need:
        warnings.append(
            f"motion.kernel_px ({config['motion']['kernel_px']}) is smaller than the {need} px that hold the longest "
            f"streak and the widest defocus of the synthesis ranges: the blur of the fastest or deepest motions wraps around"
        )
    return warnings
