#!/usr/bin/env bash
# The test command (README, .ci/run): ruff, a single-node SLURM where this machine can have one,
# then the pytest suite (arguments go to pytest).
# SLURM: as root on Debian where no SLURM answers, tools/slurm_single_node.sh installs slurm-wlm + munge
# and starts them (no systemd; log in logs/slurm_setup.log), so that the test of profiles/slurm
# runs; elsewhere, or with BLURFLOW_NO_SLURM=1, that test is skipped and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
if [[ -z ${BLURFLOW_NO_SLURM:-} && $(id -u) == 0 ]] && command -v apt-get >/dev/null \
    && ! timeout 20 sinfo -h -o %a 2>/dev/null | grep -q up; then
    mkdir -p logs
    if bash tools/slurm_single_node.sh > logs/slurm_setup.log 2>&1; then
        echo "single-node SLURM started (logs/slurm_setup.log)"
    else
        echo "SLURM could not be set up (logs/slurm_setup.log): its test is skipped"
    fi
fi
python -m pytest "$@"
