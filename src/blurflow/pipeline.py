"""The Snakemake glue (the library never imports it): the checks of a config that the schema
cannot express (optics, ranges, sizes, sources), run once before any job; what each workflow rule
reads of the config (:func:`rule_params`), so that a rule runs again exactly when one of those
values changes; the resources a rule asks for; the training log beside a model file. Every
Snakemake job reads the Snakefile, which imports this module: the library (and torch) is imported
only by the functions that need it (the import takes 0.1 s instead of 4.7 s per job)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from blurflow.schema import RUNTIME_KEYS


def check(config: Mapping) -> list[str]:
    """Check a config whose defaults are filled in; ``ValueError`` naming the key of the first
    violated constraint. Returns warnings (settings that work but are probably not meant)."""
    from blurflow.devices import parse_device
    from blurflow.synthesis import Setup
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
# value, blurflow.pipeline.rule_params), so a rule runs again exactly when a value it reads changes,
# and snakemake's rerun reason names that value: before {'train.lr': 0.003} now {'train.lr': 0.001}.


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
