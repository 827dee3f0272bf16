#!/usr/bin/env bash
# The prepared GPU check of particle mode (issue 44: >= 10,000 isolated beads/s when a GPU is lent):
# installs the wheels carried in wheels/ (as tools/gpu_session.sh: the device machine has PyTorch but
# not jsonschema & co.), then times the isolated-bead fit on the GPU (benchmarks/particle_speed.py,
# BEADS beads, 3 timings after a warm-up) and prints its R² beside the CPU's numbers in docs/particles.md.
# Through the device tool (carry: wheels), about 2 minutes:
#   bash tools/gpu_particles.sh 20000
set -euo pipefail
beads=${1:-20000}
cd "$(dirname "$0")/.."
site=$(mktemp -d)
python3 -m pip install --quiet --no-deps --target "$site" wheels/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "gpu_particles: no nvidia-smi (no GPU?)"
PYTHONPATH="$site:src" python3 benchmarks/particle_speed.py --beads "$beads" --device cuda --threads 16
