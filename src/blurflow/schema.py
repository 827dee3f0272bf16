"""The config's schema and defaults, the ground floor of the configuration (nothing of blurflow
imported here): ``config.schema.yaml`` (in this package) documents every key and holds every
default (:func:`defaults`); Snakemake validates config.yaml against it and fills the defaults, and
:func:`schema_error` words a violation in one line. The classes a section configures read it with
:func:`dataclass_values` (blurflow.optics.Optics and MotionScales, blurflow.synthesis.SynthesisConfig,
blurflow.train.TrainConfig): the schema's defaults for missing keys, ``ValueError`` for a key the
section does not have."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

TESTSETS = {  # the test sets (config sections testsets.<name>), in the order of their seed keys, and how each is scored
    "two_zone": "per_pixel",  # against its flow labels (rule metrics)
    "cylinder": "per_pixel",
    "table1": "per_case",  # the paper's Table 1: the network per case, its bead images fitted (rule particles_fit)
    "beads": "per_bead",  # the network and the particle fit (rules particles_fit, bead_metrics)
    "beads_dense": "per_bead",
}
RUNTIME_KEYS = ("threads", "workers", "compile")  # train keys that change the speed, never the result: read from the job's config
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
