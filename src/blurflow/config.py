"""The configuration, from config.yaml to the objects the library runs on, in one path:

1. ``config.schema.yaml`` (in this package) documents every key
   and holds every default (:func:`defaults`); Snakemake validates config.yaml against it and
   fills the defaults, and :func:`schema_error` words a violation in one line;
2. :func:`check` tests the constraints the schema cannot express (optics, ranges, sizes, sources),
   once, before any job runs;
3. :class:`Setup` is built once from the validated config: the microscope (``Optics``), the blur
   scales (``MotionScales``), the motion-PSF kernel, the synthesis ranges and the seed; synthesis,
   test sets, online training data and the study take it whole. The training settings are
   ``blurflow.train.TrainConfig``. Each of those classes reads its section with
   :func:`dataclass_values`: the schema's defaults for missing keys, ``ValueError`` for a key the
   schema's section does not have, keys of the section that other classes hold are skipped;
4. :func:`rule_params` gives each workflow rule the config values it reads, so that a rule runs
   again exactly when one of them changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import jsonschema
import yaml

if TYPE_CHECKING:
    import torch

    from blurflow.optics import MotionScales, Optics
    from blurflow.synthesis import SynthesisConfig

SCHEMA = "src/blurflow/config.schema.yaml"  # SCHEMA_FILE as the repository names it
SCHEMA_FILE = Path(__file__).with_name("config.schema.yaml")


@functools.cache
def schema() -> dict:
    """The config schema (JSON Schema as YAML)."""
    with open(SCHEMA_FILE) as f:
        return yaml.safe_load(f)


def _fill(node: Mapping) -> dict:
    out = {}
    for key, sub in node.get("properties", {}).items():
        if "properties" in sub:
            out[key] = _fill(sub)
        elif "default" in sub:
            out[key] = sub["default"]
    return out


def defaults(section: str | None = None) -> dict:
    """The schema's defaults: the whole config, or one top-level ``section`` (a fresh copy)."""
    filled = _fill(schema())
    return filled if section is None else filled[section]


def overlay(base: Mapping, top: Mapping) -> dict:
    """``top``'s values over ``base``'s, nested mappings merged key by key (as snakemake's
    --configfile overlays config files)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = overlay(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def load(paths: Iterable[str | Path]) -> dict:
    """The config of YAML files, later ones overlaying earlier ones, over the schema's defaults."""
    config = defaults()
    for path in paths:
        with open(path) as f:
            config = overlay(config, yaml.safe_load(f) or {})
    return config


def dataclass_values(cls: type, section: str, cfg: Mapping | None) -> dict:
    """The fields of dataclass ``cls`` from config section ``section``: ``cfg``'s values over the
    schema's defaults, YAML lists as tuples. ``ValueError`` for a key the schema's section does
    not have; keys of the section that ``cls`` does not hold are skipped (other classes hold them)."""
    cfg = dict(cfg or {})
    known = schema()["properties"][section]["properties"]
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)} (the keys are documented in {SCHEMA})")
    merged = {**defaults(section), **cfg}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items() if k in cls.__dataclass_fields__}


def config_hash(*sections: Any) -> str:
    """Short stable hash of config sections (JSON, sorted keys)."""
    text = json.dumps(sections, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_device(name: str) -> torch.device:
    """The device a name means (``cpu``, ``cuda`` or ``cuda:N``); ``ValueError`` for other names."""
    import torch

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
        from blurflow.optics import MotionScales, Optics
        from blurflow.synthesis import SynthesisConfig

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
        from blurflow.optics import required_kernel_px

        return required_kernel_px(self.optics, self.scales, self.speed_max, self.depth_max)


def schema_error(config: Mapping) -> str:
    """One line for the most relevant violation of the schema by ``config`` ('' if none)."""
    validator = jsonschema.Draft202012Validator(schema())
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
    from blurflow.train import TrainConfig, init_weights

    setup = Setup.from_config(config)
    syn = setup.synthesis
    train_cfg = TrainConfig.from_config(config["train"], seed=config["seed"])
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
    if config["train"]["model_file"]:
        check_model_file(config, config["train"]["model_file"])
        if train_cfg.init_model:
            raise ValueError("train.init_model and train.model_file both set: a model file is used as it is, nothing is trained")
    elif train_cfg.init_model:
        init_weights(train_cfg)
    if tests["two_zone"]["evaluated"] > tests["two_zone"]["count"]:
        raise ValueError(f"testsets.two_zone.evaluated ({tests['two_zone']['evaluated']}) exceeds testsets.two_zone.count ({tests['two_zone']['count']})")
    warnings = []
    need = setup.required_kernel_px()
    if setup.kernel_px < need:
        warnings.append(
            f"motion.kernel_px ({config['motion']['kernel_px']}) is smaller than the {need} px that hold the longest "
            f"streak and the widest defocus of the synthesis ranges: the blur of the fastest or deepest motions wraps around"
        )
    return warnings


# What each workflow rule reads of the config, and nothing else, as its ``params`` (one param per
# value, blurflow.config.rule_params), so a rule runs again exactly when a value it reads changes,
# and snakemake's rerun reason names that value: before {'train.lr': 0.003} now {'train.lr': 0.001}.
RUNTIME_KEYS = ("threads", "workers", "compile")  # train keys that change the speed, never the result: read from the job's config


def _without(section: Mapping, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in section.items() if k not in keys}


def for_sources(config: Mapping, split: str) -> dict:
    """The ``sources`` keys that the sources of ``split`` ('train', 'val', 'test') depend on."""
    src = config["sources"]
    if split == "test":
        return {"test_kind": src["test_kind"], "test_folder": src["test_folder"], "tile_px": src["tile_px"],
                "phantom": {"test_count": src["phantom"]["test_count"], "size_px": src["phantom"]["size_px"]}}  # fmt: skip
    return {**_without(src, ("test_kind", "test_folder")), "phantom": _without(src["phantom"], ("test_count",))}


def for_synthesis(config: Mapping) -> dict:
    """What one synthesised image depends on: seed, optics, motion and the synthesis ranges (not
    the number of shards, which only adds or removes shards)."""
    return {"seed": config["seed"], "optics": config["optics"], "motion": config["motion"], "synthesis": _without(config["synthesis"], ("shards",))}


def for_training(config: Mapping) -> dict:
    """What a trained model depends on: the training sources, the synthesis (shard count and size
    included) and the ``train`` section without its speed-only keys (RUNTIME_KEYS)."""
    return {
        **for_synthesis(config), "sources": for_sources(config, "train"), "synthesis": config["synthesis"],
        "train": _without(config["train"], RUNTIME_KEYS),
    }  # fmt: skip


def for_testset(config: Mapping, name: str) -> dict:
    """What test set ``name`` (two_zone, cylinder, table1, beads) depends on."""
    tests = config["testsets"]
    return {**for_synthesis(config), "testsets": {"image_px": tests["image_px"], name: tests[name]}}


PREFIX = "config."


def flatten(section: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 0.003, ...}: one entry per value of a nested config (a mapping with other
    than string keys, such as optics.zernike, or an empty one, is one value)."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def rule_params(select: Callable[[Any], Mapping], wildcard_sets: Iterable[Mapping] = ({},)) -> dict[str, Callable]:
    """A rule's ``params``: for each config value that ``select(wildcards)`` returns for any of
    ``wildcard_sets`` (all the rule's wildcard values), a param ``config.<key>`` whose value is
    ``{key: value}`` (``{}`` for a job that does not read it). Snakemake compares params by their
    values only: the key in the value makes every value distinct and names it in a rerun reason."""
    names = dict.fromkeys(n for w in wildcard_sets for n in flatten(select(SimpleNamespace(**w))))

    def param(name: str) -> Callable[[Any], dict]:
        def value(wildcards) -> dict:
            values = flatten(select(wildcards))
            return {name: values[name]} if name in values else {}

        return value

    return {PREFIX + name: param(name) for name in names}


def unflatten(params: Iterable[tuple[str, Any]]) -> dict:
    """The nested config of a rule's params (:func:`rule_params`; other params are skipped)."""
    out: dict = {}
    for name, value in params:
        if name.startswith(PREFIX):
            for key, leaf in value.items():
                *path, last = key.split(".")
                node = out
                for part in path:
                    node = node.setdefault(part, {})
                node[last] = leaf
    return out


def evaluated(config: Mapping, testset: str) -> dict:
    """``{two_zone: {evaluated: N}}`` for the two-zone test set (how many of its images are
    predicted and scored), ``{}`` for the others."""
    return {"two_zone": {"evaluated": config["testsets"]["two_zone"]["evaluated"]}} if testset == "two_zone" else {}


def gpu_request(config: Mapping) -> int:
    """GPUs a GPU rule (train, predict, study_train) asks the scheduler for: 1, or 0 with
    ``train.device: cpu`` (workflow/presets/cpu_nodes.yaml), for clusters without GPUs."""
    return 0 if config["train"]["device"] == "cpu" else 1


def train_mem_mb(config: Mapping) -> int:
    """Memory (MB) a training job asks for, from the config: 2,000 for PyTorch and the model, 1,000
    per DataLoader worker, and 2 KB per pixel of a batch for activations and gradients (the default
    config asks for 3,500 and peaked at 1,600 resident)."""
    train, px = config["train"], config["synthesis"]["image_px"]
    return 2000 + 1000 * train["workers"] + math.ceil(train["batch_size"] * px * px * 2048 / 2**20)


def model_log(model_file: str | Path) -> str:
    """The training log shipped beside a model file: ``MODEL.log.csv`` (models/blurflow.log.csv)."""
    return str(Path(model_file).with_suffix(".log.csv"))


def check_model_file(config: Mapping, path: str | Path) -> None:
    """``ValueError`` unless ``path`` is a model file with its training log beside it, trained for
    the config's optics and blur scales (the test sets are synthesised with those)."""
    from blurflow.modelfile import load_model
    from blurflow.optics import Optics

    try:
        _, meta = load_model(path)
    except ValueError as exc:
        raise ValueError(f"train.model_file: {exc}") from None
    if not Path(model_log(path)).is_file():
        raise ValueError(f"train.model_file: its training log {model_log(path)} is missing")
    if Optics.from_config(meta["optics"]) != Optics.from_config(config["optics"]):
        raise ValueError(f"train.model_file: {path} was trained for other optics ({meta['optics']}) than the config's optics section")
    scales = {k: float(config["motion"][k]) for k in ("lateral_scale_px", "axial_scale_um")}
    if {k: float(v) for k, v in meta["scales"].items()} != scales:
        raise ValueError(f"train.model_file: {path} was trained for blur scales {meta['scales']}, the config's motion section has {scales}")
