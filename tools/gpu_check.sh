#!/bin/bash
# The GPU check on a lent device machine, in one call (tools/gpu_check.py says what it measures).
# That machine has torch, transformers, tokenizers, accelerate and safetensors but no network and
# no DeepSpeed, hjson or pydantic: fetch their wheels here first with
#   ../shared/recipes/gpu-wheels.sh          (fills .whl/, kept out of git)
# then run, through the device tool, with .whl in its carry list:
#   bash tools/gpu_check.sh                  (results: $OUT/gpu_check.json, or runs/gpu-check/)
# Tracking stays off (MLflow is not carried). Stops at 7 + 1.5 minutes whatever happens.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export DS_BUILD_OPS=0 PYTHONUNBUFFERED=1 SEQTRAIN_CACHE="${SEQTRAIN_CACHE:-/tmp/seqtrain-cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout 420 "${PYTHON:-python3}" -m tools.gpu_check --out "${OUT:-runs/gpu-check}" "$@"
rc=$?
# The gpu-marked tests (CUDA generator round trip, pinned async buffers, device memory figures),
# where pytest came with the wheels; their report beside the JSON.
if "${PYTHON:-python3}" -c "import pytest" 2>/dev/null; then
  timeout 90 "${PYTHON:-python3}" -m pytest -q -m gpu -p no:cacheprovider tests/ \
    > "${OUT:-runs/gpu-check}/gpu_tests.txt" 2>&1; echo "gpu tests: exit $? (gpu_tests.txt)"
fi
exit $rc
