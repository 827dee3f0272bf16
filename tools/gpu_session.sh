#!/usr/bin/env bash
# The prepared command for a lent GPU (one device call of at most 10 minutes; docs/results.md):
# installs the wheels carried in wheels/ (the device machine has PyTorch but not these), then runs
# tools/gpu_train.py MINUTES OUTDIR CONFIG... (a profile, training, the validation and test sets),
# by default stage 5 trained on with workflow/presets/release/stage6_gpu.yaml. Make the wheels here first:
#   pip download --no-deps -d wheels segmentation-models-pytorch timm huggingface_hub safetensors \
#       pooch jsonschema jsonschema-specifications referencing rpds-py platformdirs
# then, through the device tool (carry: wheels):
#   bash tools/gpu_session.sh 6 "$OUT"
set -euo pipefail
usage="usage: tools/gpu_session.sh MINUTES OUTDIR [CONFIG.yaml ...]"
minutes=${1:?$usage}
out=${2:?$usage}
shift 2
cd "$(dirname "$0")/.."
configs=("$@")
if [[ ${#configs[@]} == 0 ]]; then
    configs=(workflow/presets/release/stage5.yaml workflow/presets/release/stage6_gpu.yaml)
fi
site=$(mktemp -d)
python3 -m pip install --quiet --no-deps --target "$site" wheels/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "gpu_session: no nvidia-smi (no GPU?)"
PYTHONPATH="$site:src" python3 tools/gpu_train.py "$minutes" "$out" "${configs[@]}"
