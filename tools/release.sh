#!/usr/bin/env bash
# The shipped model's recipe (docs/model.md), from an empty results/: its stages in order, each
# trained by the workflow (snakemake ... results/model/model.pt) with its preset in
# workflow/presets/release/ and started from the previous stage's model, which this script keeps
# as results/release/STAGE.pt (its training log beside it, STAGE.log.csv). A stage whose model is
# there already is skipped, and a stage cut short resumes from results/model/checkpoint.pt: run it
# again to go on. Stage 5's last run (results/release/stage5c.pt) is the shipped model
# (models/blurflow.pt). About 14 h on 2 CPU cores.
#   bash tools/release.sh [CONFIG.yaml ...]     (CONFIG: overlays on every stage's preset, e.g. a test's budget;
#                                                PYTHON: the interpreter with snakemake, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
presets=workflow/presets/release
stages=(stage1 stage2 stage3 stage4 stage5a stage5b stage5c)
mkdir -p results/release
for stage in "${stages[@]}"; do
    if [[ -f results/release/$stage.pt ]]; then
        echo "release: $stage done (results/release/$stage.pt)"
        continue
    fi
    files=("$presets/$stage.yaml")
    if [[ $stage == stage5? ]]; then  # the runs of stage 5 share stage5.yaml
        files=("$presets/stage5.yaml" "${files[@]}")
    fi
    echo "release: $stage (${files[*]} $*)"
    "${PYTHON:-python3}" -m snakemake --cores all results/model/model.pt --configfile "${files[@]}" "$@"
    cp results/model/training_log.csv "results/release/$stage.log.csv"
    cp results/model/model.pt "results/release/$stage.pt.tmp"
    mv "results/release/$stage.pt.tmp" "results/release/$stage.pt"
done
echo "release: stage 5 is results/release/stage5c.pt"
