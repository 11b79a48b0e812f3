#!/usr/bin/env bash
# Pretrain m6-base (24 layers x 1024, 0.35B parameters) on one node of 8 x H100 80GB: plain data
# parallelism (DP8, every GPU a full replica), no tensor, pipeline or expert parallelism.
#
#   sbatch examples/pretrain_m6_base.sh                      (from the repository root)
#   sbatch --nodes=2 examples/pretrain_m6_base.sh            (#SBATCH lines cannot read
#       environment variables: change the node count with sbatch --nodes; NODES follows it)
#   MICRO_BATCH=16 sbatch examples/pretrain_m6_base.sh       (any size below, from the environment)
#   bash examples/pretrain_m6_base.sh                        (inside an salloc allocation, or on
#       one 8-GPU machine without SLURM)
# Arguments after the script name are passed on to megatron_m6.pretrain and win over the ones here.
#
# Per-GPU memory of this layout (python -m megatron_m6.model_size --preset m6-base
#   --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 1
#   --world-size 8 --data-parallel-sharding replicate --micro-batch-size 32 --bf16):
#     m6-base: total parameters 0.350B (350,094,400)
#     m6-base: active parameters per token 0.350B (350,094,400)
#     m6-base: training FLOPs per token 2.09 GFLOP (forward + backward, sequence 512; 1.00x the 6N rule)
#     m6-base: per-GPU memory, TP1 PP1 EP1 DP8, sharding replicate, sequence parallel off, recompute none, micro-batch 32 x 512, bf16 (busiest pipeline stage):
#     m6-base:   params 0.65 GiB, grads 1.30 GiB, optimizer 3.91 GiB, activations 31.68 GiB (estimate), total 37.55 GiB
# (bf16 weights, fp32 gradients, fp32 master weights + Adam moments, all replicated, and the
# activations of one micro-batch through all layers and the ResNet; see
# megatron_m6/parallel/memory.py): well inside the 79 GiB an H100 80GB offers.
# tests/test_memory_model.py checks the defaults below against the same model.
#
#SBATCH --job-name=m6-base
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -eu  # no pipefail: `scontrol ... | head -n1` ends scontrol with SIGPIPE
# sbatch runs a copy of this script from SLURM's spool directory: then the repository is where
# the job was submitted from.
if [ -f "$(dirname "$0")/../megatron_m6/pretrain.py" ]; then cd "$(dirname "$0")/.."; else cd "$SLURM_SUBMIT_DIR"; fi

NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-0}
DP_SHARDING=${DP_SHARDING:-replicate}  # replicate | optimizer | full
RECOMPUTE=${RECOMPUTE:-}  # empty | selective | full
MICRO_BATCH=${MICRO_BATCH:-32}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-1e-5}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
DATA_PATH=${DATA_PATH:-}  # a folder made by the data tools; MOCK_DATA=1 trains on synthetic batches
MOCK_DATA=${MOCK_DATA:-0}
SAVE=${SAVE:-checkpoints/m6_base}
LOAD=${LOAD:-$SAVE}  # resumed from when it holds a checkpoint
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EXIT_INTERVAL=${EXIT_INTERVAL:-}  # save and stop at multiples of this (before --time runs out)
TENSORBOARD_DIR=${TENSORBOARD_DIR:-runs/m6_base}
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

ARGS=(--preset m6-base --bf16
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
