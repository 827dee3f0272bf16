#!/usr/bin/env bash
# Train the paper-regime model (workflow/presets/gpu.yaml) online on one GPU for MINUTES of
# training, then make the test sets, predict and score: a copy of the workflow runs in
# OUTDIR/run, and the model, its learning curve and its scores are copied flat into OUTDIR
# (model.pt, training_log.csv, training_curve.png, two_zone.json, cylinder.json, table1.md).
# Extra config files (applied after the preset) may follow, e.g. tests/config/tiny.yaml for a
# CPU check. Wall time: MINUTES plus about 2-3 minutes of sources, test sets and inference.
#   tools/gpu_run.sh 5 /tmp/gpu
set -euo pipefail
usage="usage: tools/gpu_run.sh MINUTES OUTDIR [CONFIG.yaml ...]"
minutes=${1:?$usage}
out=${2:?$usage}
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
extra=()
for config in "$@"; do extra+=("$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"); done
run="$out/run"
mkdir -p "$run"
cp "$root/Snakefile" "$root/config.yaml" "$run/"
for folder in workflow envs profiles; do rm -rf "${run:?}/$folder" && cp -r "$root/$folder" "$run/"; done
printf 'train:\n  max_minutes: %s\n' "$minutes" >"$run/minutes.yaml"
cd "$run"
python3 -m snakemake --cores all --configfile workflow/presets/gpu.yaml "${extra[@]}" minutes.yaml
cp results/model/model.pt results/model/training_log.csv results/figures/training_curve.png \
    results/metrics/two_zone.json results/metrics/cylinder.json results/tables/table1.md "$out/"
echo "gpu_run: wrote $(cd "$out" && ls model.pt training_log.csv training_curve.png two_zone.json cylinder.json table1.md | tr '\n' ' ')to $out"
