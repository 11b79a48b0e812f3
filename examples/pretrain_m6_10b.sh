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
# Preemption and time limits: USR1 to the batch shell 10 minutes before the end; the ranks
# save and exit, and the job requeues itself and resumes (see slurm_launch.sh).
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
set -eu  # no pipefail: `scontrol ... | head -n1` ends scontrol with SIGPIPE
# sbatch runs a copy of this script from SLURM's spool directory: then the repository is where
# the job was submitted from.
if [ -f "$(dirname "$0")/../megatron_m6/pretrain.py" ]; then cd "$(dirname "$0")/.."; else cd "$SLURM_SUBMIT_DIR"; fi

NODES=${NODES:-${SLURM_JOB_NUM_NODES:-4}}
PRESET=${PRESET:-m6-10b}  # e.g. m6-tiny with MOCK_DATA=1 DEVICE=cpu BF16=0 to try the script on CPUs
GPUS_PER_NODE=${GPUS_PER_NODE:-8}  # processes per node: one per GPU (or CPU ranks with DEVICE=cpu)
DEVICE=${DEVICE:-cuda}  # cuda | cpu (gloo)
BF16=${BF16:-1}  # 1: bf16 mixed precision (--bf16); 0: fp32
TP=${TP:-4}
PP=${PP:-1}
EP=${EP:-1}
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-1}
DP_SHARDING=${DP_SHARDING:-optimizer}  # replicate | optimizer | full
RECOMPUTE=${RECOMPUTE:-selective}  # selective | full | none
MICRO_BATCH=${MICRO_BATCH:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
LR=${LR:-1e-4}
MIN_LR=${MIN_LR:-1e-5}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
DATA_PATH=${DATA_PATH:-}  # indexed prefix or "W1 P1 W2 P2" (tools/preprocess_data.py); or MOCK_DATA=1
MOCK_DATA=${MOCK_DATA:-0}
SAVE=${SAVE-checkpoints/m6_10b}  # empty: no checkpoints (and no preemption handling)
LOAD=${LOAD-$SAVE}  # resumed from when it holds a checkpoint (empty: never)
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EXIT_INTERVAL=${EXIT_INTERVAL:-}  # save and stop at multiples of this (before --time runs out)
ASYNC_SAVE=${ASYNC_SAVE:-1}  # write checkpoints in the background while training goes on
KEEP_LAST=${KEEP_LAST-3}  # complete checkpoints kept under $SAVE (empty: all)
TENSORBOARD_DIR=${TENSORBOARD_DIR-runs/m6_10b}  # empty: no TensorBoard logs
NUM_WORKERS=${NUM_WORKERS:-2}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-10}  # a collective waiting longer fails and dumps NCCL's trace
DRY_RUN=${DRY_RUN:-0}  # 1: build rank DRY_RUN_RANK's layout of this job on the meta device, no GPUs

source examples/slurm_launch.sh "$@"
