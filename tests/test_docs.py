"""The documentation: a newcomer's README under 120 lines, and the docs site built from docs/ by
mkdocs in strict mode (a broken link or a missing page fails it)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"), "--site-dir", str(site)]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=600, env=env)


def test_the_readme_is_a_first_screen():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 120
    commands = ("pip install -e . && snakemake --cores all", 'pip install -e ".[test]" && bash tools/check.sh')
    for words in (*commands, "## What comes out", "## What people do next"):
        assert words in readme
    assert (ROOT / ".ci/run").read_text().strip().endswith('pip install -e ".[test]" && bash tools/check.sh')


def test_the_docs_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site/api/index.html").read_text().count("blurflow.tracks") > 0  # API pages from the docstrings
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copytree(ROOT / "src", copy / "src")
    with open(copy / "docs/guide.md", "a") as f:
        f.write("\nSee [the missing page](missing.md).\n")
    broken = build(copy, tmp_path / "site2")
    assert broken.returncode != 0 and "missing.md" in broken.stderr, broken.stderr[-3000:]
