#!/usr/bin/env bash
# Single-node launch: one process per GPU (or per CPU slot), each running `seqtrain train`.
#   launch/torchrun.sh NPROC CONFIG [--set key=value ...] [--run-dir DIR]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node.
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC CONFIG [train args...]}
shift
if [[ "${NNODES:-1}" -gt 1 ]]; then
  exec torchrun --nnodes="$NNODES" --node_rank="${NODE_RANK:?}" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:?}:${MASTER_PORT:-29500}" \
    -m trainer train "$@"
fi
exec torchrun --standalone --nproc_per_node="$nproc" -m trainer train "$@"
