"""One benchmark on two source trees, alternating in one run: the old code against this one.

Runs ``SCRIPT ARGS`` (a benchmark of this folder that prints JSON) ``--repeats`` times with
``PYTHONPATH=OLD/src`` and with this tree's ``src``, alternating, reads ``--key`` of each run's
JSON and prints min and median per tree and the ratio new / old of the medians. The machines
here are noisy: only ratios measured this way, in one run, are quoted in the docs.

    git worktree add /tmp/old ec4be71
    python benchmarks/side_by_side.py /tmp/old --key images_per_s -- benchmarks/synthesis_speed.py --images 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, command: list[str], key: str) -> float:
    """``key`` of the JSON that ``command`` prints (its last JSON object) with ``tree``'s sources."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return float(json.loads(out[out.index("{") :])[key])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path, help="the other tree (e.g. a git worktree of an earlier commit)")
    ap.add_argument("--key", required=True, help="the number to compare in the benchmark's JSON")
    ap.add_argument("--repeats", type=int, default=3)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = ap.parse_args(argv[:split]), argv[split + 1 :]
    if not command:
        ap.error("give the benchmark after --: -- SCRIPT ARGS")
    values: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for name, tree in (("old", args.old), ("new", ROOT)):
            values[name].append(run(tree, command, args.key))
    medians = {k: statistics.median(v) for k, v in values.items()}
    result = {k: {"min": min(v), "median": medians[k], "all": v} for k, v in values.items()}
    print(json.dumps({"key": args.key, "command": command, **result, "ratio_new_over_old": round(medians["new"] / medians["old"], 3)}, indent=2))


if __name__ == "__main__":
    main()
