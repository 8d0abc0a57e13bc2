#!/usr/bin/env bash
# Container entrypoint for DGX nodes: sane defaults for one process per GPU, then the given command.
set -euo pipefail
# Each rank drives one GPU; CPU threads per rank only feed it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# Required by megatron-core for overlapping TP communication with compute.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
exec "$@"
