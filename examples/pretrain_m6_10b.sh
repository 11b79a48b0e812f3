#!/usr/bin/env bash
# Pretrain m6-10b (dense, 48 layers x 4096, 9.79B parameters) on 4 nodes of 8 x H100 80GB:
# TP4 inside a node with sequence parallelism, DP8 with the optimizer state sharded, selective
# recomputation. TP8 would fit too but is not needed: TP4 halves the tensor-parallel traffic per
# GPU and keeps the per-rank matrix multiplies twice as wide.
#
#   sbatch examples/pretrain_m6_10b.sh                       (from the repository root)
#   sbatch --nodes=8 --time=96:00:00 examples/pretrain_m6_10b.sh   (#SBATCH lines cannot read
#       environment variables: change the node count with sbatch --nodes; NODES follows it)
#   TP=8 MICRO_BATCH=8 sbatch examples/pretrain_m6_10b.sh     (any size below, from the environment)
#   bash examples/pretrain_m6_10b.sh                          (inside an salloc allocation)
# Arguments after the script name are passed on to megatron_m6.pretrain and win over the ones here.
#
# Per-GPU memory of this layout (python -m megatron_m6.model_size --preset m6-10b
#   --tensor-model-parallel-size 4 --pipeline-model-parallel-size 1 --expert-model-parallel-size 1
#   --sequence-parallel --world-size 32 --data-parallel-sharding optimizer
#   --recompute-granularity selective --micro-batch-size 16 --bf16):
#     m6-10b: total parameters 9.787B (9,786,848,320)
#     m6-10b: active parameters per token 9.787B (9,786,848,320)
#     m6-10b: training FLOPs per token 59.71 GFLOP (forward + backward, sequence 512; 1.02x the 6N rule)
#     m6-10b: per-GPU memory, TP4 PP1 EP1 DP8, sharding optimizer, sequence parallel on, recompute selective, micro-batch 16 x 512, bf16 (busiest pipeline stage):
#     m6-10b:   params 4.61 GiB, grads 9.21 GiB, optimizer 3.45 GiB, activations 14.04 GiB (estimate), total 31.31 GiB
# (bf16 weights, fp32 gradients, fp32 master weights + Adam moments sharded over DP, and the
# activations of one micro-batch through all layers; see megatron_m6/parallel/memory.py): well
# inside the 79 GiB an H100 80GB offers, with room for communication buffers and fragmentation.
# tests/test_memory_model.py checks the defaults below against the same model.
#
#SBATCH --job-name=m6-10b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -eu  # no pipefail: `scontrol ... | head -n1` ends scontrol with SIGPIPE
# sbatch runs a copy of this script from SLURM's spool directory: then the repository is where
# the job was submitted from.
if [ -f "$(dirname "$0")/../megatron_m6/pretrain.py" ]; then cd "$(dirname "$0")/.."; else cd "$SLURM_SUBMIT_DIR"; fi

NODES=${NODES:-${SLURM_JOB_NUM_NODES:-4}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-4}
PP=${PP:-1}
EP=${EP:-1}
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-1}
DP_SHARDING=${DP_SHARDING:-optimizer}  # replicate | optimizer | full
RECOMPUTE=${RECOMPUTE:-selective}  # empty | selective | full
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
LR=${LR:-1e-4}
MIN_LR=${MIN_LR:-1e-5}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
DATA_PATH=${DATA_PATH:-}  # a folder made by the data tools; MOCK_DATA=1 trains on synthetic batches
MOCK_DATA=${MOCK_DATA:-0}
SAVE=${SAVE:-checkpoints/m6_10b}
LOAD=${LOAD:-$SAVE}  # resumed from when it holds a checkpoint
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EXIT_INTERVAL=${EXIT_INTERVAL:-}  # save and stop at multiples of this (before --time runs out)
TENSORBOARD_DIR=${TENSORBOARD_DIR:-runs/m6_10b}
NUM_WORKERS=${NUM_WORKERS:-2}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}

# NCCL and PyTorch: settings already in the environment (e.g. the cluster's NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA) win; srun passes the environment to every node.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^docker,lo}  # any interface but loopback/docker
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail, not hang
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP communication overlap
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

ARGS=(--preset m6-10b --bf16
      --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
      --expert-model-parallel-size "$EP" --data-parallel-sharding "$DP_SHARDING"
      --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
      --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS"
      --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0
      --save "$SAVE" --save-interval "$SAVE_INTERVAL" --tensorboard-dir "$TENSORBOARD_DIR"
      --log-interval 10 --eval-interval 1000 --eval-iters 10 --num-workers "$NUM_WORKERS")
if [ "$SEQUENCE_PARALLEL" = 1 ]; then ARGS+=(--sequence-parallel); fi
if [ -n "$RECOMPUTE" ]; then ARGS+=(--recompute-granularity "$RECOMPUTE"); fi
if [ -n "$EXIT_INTERVAL" ]; then ARGS+=(--exit-interval "$EXIT_INTERVAL"); fi
if [ -f "$LOAD/latest_checkpointed_iteration.txt" ]; then ARGS+=(--load "$LOAD"); fi
if [ "$MOCK_DATA" = 1 ]; then ARGS+=(--mock-data); else ARGS+=(--data-path "${DATA_PATH:?set DATA_PATH or MOCK_DATA=1}"); fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
  # One torchrun per node; they meet at a c10d rendezvous hosted on the first node.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  srun --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-16}" --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
      -m megatron_m6.pretrain "${ARGS[@]}" "$@"
elif [ "$NODES" = 1 ]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$GPUS_PER_NODE" \
    -m megatron_m6.pretrain "${ARGS[@]}" "$@"
else
  echo "error: $NODES nodes need a SLURM allocation (sbatch, or bash inside salloc)" >&2
  exit 1
fi
