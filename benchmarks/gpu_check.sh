#!/usr/bin/env bash
# The Transformer Engine GPU check (benchmarks/gpu_check.py) on one GPU, stopped after GPU_CHECK_TIMEOUT_S
# seconds (default 480). Exit status: the script's (0 pass, 1 a check failed, 2 cannot run here), 124 on timeout.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]        # PYTHON=... picks the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
# From a checkout without `pip install -e .` as well.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# megatron-core and Transformer Engine warn about defaults at import; none of it is actionable here.
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"
limit="${GPU_CHECK_TIMEOUT_S:-480}"
status=0
timeout "$limit" "${PYTHON:-python3}" benchmarks/gpu_check.py "$@" || status=$?
if [ "$status" -eq 124 ]; then
  echo "gpu_check: error: did not finish within $limit s" >&2
fi
exit "$status"
