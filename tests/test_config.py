"""The config's keys: config.yaml and the schema agree, the test sets are one list."""

from pathlib import Path

import yaml

from blurflow import schema
from blurflow.pipeline import flatten
from blurflow.testsets import TESTSET_KEYS

ROOT = Path(__file__).resolve().parents[1]


def test_config_yaml_repeats_the_schema_defaults_and_nothing_else():
    """config.yaml is the default run written out: each of its values is the schema's default (a
    default changed in one place only fails here), and it leaves out only the keys that select
    another run (a model file, an initial model, a download address)."""
    written, default = flatten(yaml.safe_load((ROOT / "config.yaml").read_text())), flatten(schema.defaults())
    assert {k: (v, default.get(k, "not in the schema")) for k, v in written.items() if default.get(k, "not in the schema") != v} == {}
    assert sorted(set(default) - set(written)) == ["train.init_model", "train.model_file", "train.weights_url"]


def test_the_test_sets_are_the_schemas_sections_and_keep_their_seed_keys():
    """schema.TESTSETS is the one list the rules read (wildcards, targets); each is a section of
    the schema's ``testsets``, and their seed keys are those the recorded test sets were made with."""
    sections = {k for k, v in schema.schema()["properties"]["testsets"]["properties"].items() if v.get("type") == "object"}
    assert set(schema.TESTSETS) == sections
    assert TESTSET_KEYS == {"two_zone": 10, "cylinder": 11, "table1": 12, "beads": 13, "beads_dense": 14}
    lines = [line for p in [ROOT / "Snakefile", *sorted((ROOT / "workflow/rules").glob("*.smk"))] for line in p.read_text().splitlines()]
    assert not [line for line in lines if sum(f'"{n}' in line or f"|{n}" in line or f"{n}|" in line for n in schema.TESTSETS) > 1]  # no list written out
