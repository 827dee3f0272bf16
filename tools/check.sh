#!/usr/bin/env bash
# The test command (README, .ci/run): ruff, a single-node SLURM where this machine can have one,
# Xvfb for the napari tests where it can be installed, then the pytest suite (arguments go to pytest;
# pytest-xvfb starts the display server).
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
# Xvfb for the napari tests (a display server for Qt): as root on Debian where it is missing
if ! command -v Xvfb >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    mkdir -p logs
    xvfb=(xvfb libxcb-cursor0 libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xinerama0
          libxcb-xinput0 libxcb-shape0 libxcb-randr0 libegl1 libgl1 libfontconfig1 libdbus-1-3)
    if { apt-get install -y -q --no-install-recommends "${xvfb[@]}" || { apt-get update -q && apt-get install -y -q --no-install-recommends "${xvfb[@]}"; }; } \
        > logs/xvfb_setup.log 2>&1; then
        echo "Xvfb installed for the napari tests (logs/xvfb_setup.log)"
    else
        echo "Xvfb could not be installed (logs/xvfb_setup.log): the napari tests are skipped"
    fi
fi
python -m pytest "$@"
