"""The Snakemake workflow: lint-clean, formatted, config validated, builds end to end on a copy."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from blurflow.data import ShardDataset

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


def test_pipeline_builds_end_to_end_on_the_tiny_config(workdir):
    run = snakemake("--configfile", "tiny.yaml", cwd=workdir)
    assert run.returncode == 0, run.stderr
    for figure in ("psf_gallery", "training_samples"):
        with Image.open(workdir / f"results/figures/{figure}.png") as im:
            assert im.size[0] > 600 and im.size[1] > 400
    train = ShardDataset(sorted((workdir / "results/shards/train").glob("shard-*.h5")))
    val = ShardDataset(sorted((workdir / "results/shards/val").glob("shard-*.h5")))
    assert len(train) == 32 and len(val) == 16
    assert train[0]["image"].shape == (1, 64, 64)
    assert (workdir / "results/sources/test.h5").exists()
    assert (workdir / "logs/psf_gallery.log").exists()
    assert (workdir / "results/benchmarks/psf_gallery.tsv").exists()
    assert not list(workdir.glob("results/**/.*tmp*"))  # nothing half-written left behind
    rerun = snakemake("--configfile", "tiny.yaml", "-n", cwd=workdir)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr
