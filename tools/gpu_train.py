"""One lent GPU's session, without Snakemake (the device machine has PyTorch but not the workflow's
tools), everything written to OUTDIR:

1. a profile (``benchmarks/gpu_step.py``: synthesis alone, network alone, both, ``--profile-steps``
   steps at each of ``--profile-batches``) -> OUTDIR/profile.json (skipped with ``--no-profile``;
   stopped after ``--profile-seconds``);
2. training for MINUTES from config files (config.yaml, then the given files on top;
   train.max_minutes = MINUTES; train.data must be online): sources in OUTDIR/sources (unless they
   are there already, from the same sources config and seed: checked), then model.pt,
   training_log.csv and checkpoint.pt (a second call resumes);
3. scores (``--no-score`` skips them) of the new model and ``--baseline`` (the shipped model) on the
   six validation sets that choose shipped models and on the default run's test sets
   (``tools/validation_sets.py`` with workflow/presets/release/stage1.yaml's validation sources and
   config.yaml's test sources, built in OUTDIR) -> OUTDIR/validation_sets/scores.csv.

    python tools/gpu_train.py 6 /tmp/gpu workflow/presets/release/stage5.yaml workflow/presets/release/stage6_gpu.yaml
"""

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import torch

from blurflow import pipeline, schema, sources, train

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("gpu_train")


def source_file(split: str, config: dict, path: Path) -> Path:
    """The sources of ``split`` of ``config`` at ``path``: built unless there, refused if built from another config."""
    cfg = pipeline.for_sources(config, split)
    if not path.exists():
        sources.write_split(split, cfg, config["seed"], ROOT / "resources", path)
    elif sources.recorded_hash(path) != schema.config_hash(cfg, config["seed"]):
        sys.exit(f"gpu_train: {path} was built from another sources config or seed: remove it or choose another OUTDIR")
    return path


def run(command: list[str], seconds: float | None, what: str) -> None:
    """A helper script of this repository in a subprocess; its failure or timeout is logged, not fatal."""
    try:
        done = subprocess.run([sys.executable, *command], cwd=ROOT, timeout=seconds, check=False)
        if done.returncode:
            log.warning("%s failed (exit status %d)", what, done.returncode)
    except subprocess.TimeoutExpired:
        log.warning("%s stopped after %.0f s", what, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("minutes", type=float, help="training time (train.max_minutes)")
    parser.add_argument("outdir", type=Path)
    parser.add_argument("configs", nargs="*", type=Path, help="config files over config.yaml, later ones on top")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-batches", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--profile-steps", type=int, default=50)
    parser.add_argument("--profile-seconds", type=float, default=150)
    parser.add_argument("--score", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--baseline", type=Path, default=ROOT / "models/blurflow.pt", help="the model to score beside the new one")
    parser.add_argument("--score-images", type=int, default=64, help="images per validation set (64: the shipping rule's sets)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = [ROOT / "config.yaml", *args.configs]
    config = schema.load(files)
    config["train"]["max_minutes"] = args.minutes
    error = schema.schema_error(config)
    if error:
        sys.exit(f"gpu_train: bad config: {error}")
    if config["train"]["data"] != "online":
        sys.exit("gpu_train: needs train.data: online (images are synthesised on the training device; shards need the workflow)")
    for warning in pipeline.check(config):
        log.warning(warning)
    if not torch.cuda.is_available() and not str(config["train"]["device"]).startswith("cpu"):
        log.warning("no GPU here (torch.cuda.is_available() is False): training runs on the CPU, far slower than on the lent GPU this tool is for")
    torch.set_num_threads(config["train"]["threads"])
    out = args.outdir
    split_files = {split: source_file(split, config, out / "sources" / f"{split}.h5") for split in ("train", "val")}
    if args.profile:
        profile = ["benchmarks/gpu_step.py", "--config", *map(str, files), "--batches", *map(str, args.profile_batches)]
        run(
            [*profile, "--steps", str(args.profile_steps), "--repeats", "1", "--no-counts", "--out", str(out / "profile.json")],
            args.profile_seconds,
            "the profile",
        )
    rows = train.run_config(
        pipeline.for_training(config), config["train"], [split_files["train"]], [split_files["val"]],
        out / "model.pt", out / "training_log.csv", out / "checkpoint.pt",
    )  # fmt: skip
    last = rows[-1]
    print(f"gpu_train: {last['samples']} images in {last['minutes']:.1f} min, validation R2 {last['val_r2_mean']:.3f}: wrote {out / 'model.pt'}", flush=True)
    if args.score and (out / "model.pt").exists():
        release = ROOT / "workflow/presets/release/stage1.yaml"
        val = source_file("val", schema.load([ROOT / "config.yaml", release]), out / "release_sources" / "val.h5")
        test = source_file("test", schema.load([ROOT / "config.yaml"]), out / "release_sources" / "test.h5")
        score = ["tools/validation_sets.py", str(out / "model.pt"), str(args.baseline), "--sources", str(val), "--test-sources", str(test)]
        run(
            [*score, "--config", str(ROOT / "config.yaml"), str(release), "--sets", str(out / "validation_sets"), "--images", str(args.score_images)],
            None,
            "the scores",
        )


if __name__ == "__main__":
    main()
