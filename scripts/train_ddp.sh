#!/usr/bin/env bash
# Multi-node training with torchrun. Run this same script on every node, e.g. 2 nodes x 8 GPUs:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/train_ddp.sh configs/star_d16_256.json --data.lmdb_dirs=[...] ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash scripts/train_ddp.sh configs/star_d16_256.json --data.lmdb_dirs=[...] ...
# Extra arguments are config overrides. Re-running the same command resumes from the newest valid checkpoint.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
config="${1:?usage: train_ddp.sh CONFIG.json [--key=value ...]}"; shift
NNODES="${NNODES:-1}" NODE_RANK="${NODE_RANK:-0}" MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-29500}"
GPUS="${GPUS_PER_NODE:-$("$VENV/bin/python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec "$VENV/bin/python" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$GPUS" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  "$REPO_ROOT/train.py" --config="$config" "$@"
