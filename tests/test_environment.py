"""Conda environments, execution profiles and the paper preset."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from blurflow import pipeline

ROOT = Path(__file__).resolve().parents[1]
IMPORT_TO_PACKAGE = {  # top-level module -> distribution name (conda-forge name where it differs)
    "numpy": "numpy", "scipy": "scipy", "h5py": "h5py", "skimage": "scikit-image",
    "matplotlib": "matplotlib", "pandas": "pandas", "pooch": "pooch", "requests": "requests",
    "tifffile": "tifffile", "zarr": "zarr", "tqdm": "tqdm", "torch": "torch", "yaml": "pyyaml",
    "segmentation_models_pytorch": "segmentation-models-pytorch", "PIL": "pillow", "jsonschema": "jsonschema",
}  # fmt: skip
CONDA_NAMES = {"torch": ("pytorch", "pytorch-gpu"), "matplotlib": ("matplotlib", "matplotlib-base")}
OPTIONAL = {  # module -> (distribution, extra): imported inside the functions that need it, or by the napari plugin only
    "trackpy": ("trackpy", "particles"), "napari": ("napari", "napari"), "magicgui": ("napari", "napari"),
}  # fmt: skip
STDLIB = set(sys.stdlib_module_names) | {"blurflow"}


def rule_blocks() -> dict[str, str]:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "workflow/rules").glob("*.smk")))
    return {
        m.group(1): m.group(2) for m in re.finditer(r"^[ ]*rule (\w+):\n(.*?)(?=^[ ]*rule |^else:|\Z)", text, re.DOTALL | re.MULTILINE)
    }  # rules in if/else too


def imported_packages() -> set[str]:
    modules = set()
    for path in (ROOT / "src/blurflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    third_party = modules - STDLIB - set(OPTIONAL)
    unknown = third_party - set(IMPORT_TO_PACKAGE)
    assert not unknown, f"map these imports to packages: {unknown}"
    return third_party


def env_packages(path: Path) -> set[str]:
    deps = yaml.safe_load(path.read_text())["dependencies"]
    return {re.split(r"[<>=!\s]", d)[0] for d in deps if isinstance(d, str)}


def test_every_rule_names_a_conda_env():
    blocks = rule_blocks()
    assert {"train", "synthesize_shard", "predict", "metrics"} <= set(blocks)
    missing = [name for name, body in blocks.items() if "conda:" not in body]
    assert not missing, f"rules without conda env: {missing}"
    for name, body in blocks.items():
        assert "log:" in body and "benchmark:" in body and "resources:" in body, name


@pytest.mark.parametrize("env", ["blurflow.yaml", "blurflow-cuda.yaml"])
def test_env_files_list_the_imported_packages(env):
    listed = env_packages(ROOT / "envs" / env)
    for module in imported_packages():
        names = CONDA_NAMES.get(module, (IMPORT_TO_PACKAGE[module],))
        assert any(n in listed for n in names), f"{env} lacks {names[0]} (imported as {module})"
    assert "pytorch-gpu" in listed if "cuda" in env else "pytorch" in listed


def test_pyproject_lists_the_imported_packages():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!\s\[]", d)[0].lower() for d in deps}
    for module in imported_packages():
        assert IMPORT_TO_PACKAGE[module] in names, module


def test_optional_packages_are_in_their_extra_and_missing_ones_are_one_line(monkeypatch):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (package, extra) in OPTIONAL.items():
        assert package in {re.split(r"[<>=!\s\[]", d)[0].lower() for d in extras[extra]}, (module, extra)
    import pandas as pd

    from blurflow.tracks import TracksError, link

    monkeypatch.setitem(sys.modules, "trackpy", None)  # as if not installed
    with pytest.raises(TracksError, match=r"needs trackpy: pip install 'blurflow\[particles\]'"):
        link(pd.DataFrame({"frame": [0, 1]}), 0.1, 0.01)


def test_the_slurm_profile_leaves_resources_to_the_rules_and_gpu_rules_ask_for_a_gpu():
    slurm = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["slurm-status-command"] == "squeue"
    assert not {"default-resources", "set-resources", "set-threads"} & set(slurm)  # no account placeholder, no fixed sizes
    for rule in ("train", "predict", "study_train"):
        assert "gpu=GPU_REQUEST" in rule_blocks()[rule].replace(" ", "")
    assert "gpu=0" in rule_blocks()["synthesize_shard"].replace(" ", "")
    cpu = yaml.safe_load((ROOT / "workflow/presets/cpu_nodes.yaml").read_text())
    assert pipeline.gpu_request(cpu) == 0 and pipeline.gpu_request({"train": {"device": "auto"}}) == 1
    local = yaml.safe_load((ROOT / "profiles/local/config.yaml").read_text())
    assert local["cores"] == "all" and "gpu=1" in local["resources"]


def test_paper_preset_builds_its_dag_quickly():
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "workflow/presets/paper.yaml"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", run.stdout, re.MULTILINE))
    assert stats["synthesize_shard"] == "410" and stats["train"] == "1" and stats["predict"] == "5"  # two-zone, cylinder, Table 1, beads, dense beads


def test_a_wheel_carries_the_shipped_model_and_predicts_out_of_the_box(tmp_path):
    """`pip wheel .` holds models/blurflow.pt and its log as package data (blurflow.models); the
    wheel installed on its own (here into a folder ahead of everything else on the path) predicts
    with the shipped model, no model given."""
    import zipfile

    import numpy as np
    import tifffile

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel"), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("blurflow-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"blurflow/models/blurflow.pt", "blurflow/models/blurflow.log.csv", "blurflow/config.schema.yaml"} <= set(names)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    tifffile.imwrite(tmp_path / "a.tif", (np.random.default_rng(0).random((64, 64)) * 1000).astype(np.uint16))
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "blurflow.cli", "predict", str(tmp_path / "a.tif"), "--no-dihedral"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"using the shipped model {tmp_path / 'site/blurflow/models/blurflow.pt'}" in run.stderr
    assert (tmp_path / "a_flow.tif").exists()
