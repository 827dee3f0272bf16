"""The Snakemake workflow: lint-clean, formatted, config validated, builds end to end on a copy."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from blurflow.data import ShardDataset
from blurflow.model import load_model

ROOT = Path(__file__).resolve().parents[1]


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("workflow", "envs"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "tests/config/tiny.yaml", tmp_path / "tiny.yaml")
    return tmp_path


def test_dry_run_and_lint_are_clean():
    dry = snakemake("-n", cwd=ROOT)
    assert dry.returncode == 0, dry.stderr
    lint = snakemake("--lint", cwd=ROOT)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr


def test_snakefmt_is_clean():
    pytest.importorskip("snakefmt")
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr


def test_bad_config_is_rejected_before_any_job(workdir):
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["optics"]["na"] = -0.3
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    run = snakemake("-n", cwd=workdir)
    assert run.returncode != 0
    assert "exclusiveMinimum" in run.stderr + run.stdout and "na" in run.stderr + run.stdout


FIGURES = (
    "psf_gallery", "training_samples", "training_curve", "fig2_two_zone", "fig3_cylinder_sketch",
    "fig4_cylinder", "table1", "scatter_two_zone", "scatter_cylinder",
)  # fmt: skip


def test_pipeline_builds_end_to_end_on_the_tiny_config(workdir):
    run = snakemake("--configfile", "tiny.yaml", cwd=workdir)
    assert run.returncode == 0, run.stderr
    results = workdir / "results"
    for figure in FIGURES:
        with Image.open(results / f"figures/{figure}.png") as im:
            assert im.size[0] > 400 and im.size[1] > 200, figure
    train = ShardDataset(sorted((results / "shards/train").glob("shard-*.h5")))
    val = ShardDataset(sorted((results / "shards/val").glob("shard-*.h5")))
    assert len(train) == 32 and len(val) == 16 and train[0]["image"].shape == (1, 64, 64)
    log = pd.read_csv(results / "model/training_log.csv")
    assert list(log["epoch"]) == [1] and np.isfinite(log["train_loss"]).all()
    model, meta = load_model(results / "model/model.pt")
    assert meta["image_px"] == 64 and meta["scales"]["axial_scale_um"] == 10
    for name, paper in (("two_zone", 0.92), ("cylinder", 0.91)):
        metrics = json.loads((results / f"metrics/{name}.json").read_text())
        assert metrics["paper_r2"] == paper and metrics["pixels"] > 0
        assert -1 <= metrics["r2_pearson"]["v3"] <= 1
        table = pd.read_csv(results / f"metrics/{name}.csv")
        assert list(table["component"]) == ["v1", "v2", "v3", "z0", "mean"]
    with h5py.File(results / "predictions/two_zone.h5") as f:
        assert f["pred"].shape == (3, 5, 64, 64)  # `evaluated` of the 4 generated
    table1 = pd.read_csv(results / "tables/table1.csv")
    assert list(table1["case"]) == list("abcde") and table1[["pred_v1", "pred_v3"]].notna().all().all()
    assert (results / "tables/table1.md").read_text().startswith("| case")
    assert (workdir / "logs/train.log").exists() and (results / "benchmarks/train.tsv").exists()
    assert not list(workdir.glob("results/**/.*tmp*"))  # nothing half-written left behind
    rerun = snakemake("--configfile", "tiny.yaml", "-n", cwd=workdir)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
    report = snakemake("--configfile", "tiny.yaml", "--report", "report.html", cwd=workdir)
    assert report.returncode == 0 and "ERROR" not in report.stderr, report.stderr
    assert (workdir / "report.html").stat().st_size > 100_000
