#!/usr/bin/env bash
# Pretrain m6-100b (m6-base's 24 x 1024 trunk with 512 experts, top-2, in every layer; 103.3B
# parameters, 0.56B active per token) on 8 nodes of 8 x H100 80GB: EP64, 8 experts of every
# layer per GPU, the dense 1024-wide trunk small enough to replicate (TP1) with its optimizer
# state sharded over DP64.
#
#   sbatch examples/pretrain_m6_100b.sh                      (from the repository root)
#   sbatch --nodes=16 examples/pretrain_m6_100b.sh           (#SBATCH lines cannot read
#       environment variables: change the node count with sbatch --nodes; NODES follows it;
#       DP grows with it and the expert optimizer state is sharded over DP / EP)
#   EP=32 MICRO_BATCH=4 sbatch examples/pretrain_m6_100b.sh  (any size below, from the environment)
#   bash examples/pretrain_m6_100b.sh                        (inside an salloc allocation)
# Arguments after the script name are passed on to megatron_m6.pretrain and win over the ones here.
#
# Per-GPU memory of this layout (python -m megatron_m6.model_size --preset m6-100b
#   --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 64
#   --world-size 64 --data-parallel-sharding optimizer --micro-batch-size 8 --bf16):
#     m6-100b: total parameters 103.303B (103,303,357,504)
#     m6-100b: active parameters per token 0.564B (564,126,784)
#     m6-100b: training FLOPs per token 3.38 GFLOP (forward + backward, sequence 512; 1.00x the 6N rule)
#     m6-100b: per-GPU memory, TP1 PP1 EP64 DP64, sharding optimizer, sequence parallel off, recompute none, micro-batch 8 x 512, bf16 (busiest pipeline stage):
#     m6-100b:   params 3.30 GiB, grads 6.60 GiB, optimizer 18.04 GiB, activations 11.30 GiB (estimate), total 39.24 GiB
# (bf16 weights, fp32 gradients, fp32 master weights + Adam moments sharded over DP for the
# trunk and over DP / EP = 1 for the experts, and the activations of one micro-batch through all
# layers with 2 x 1.25 expert picks per token; see megatron_m6/parallel/memory.py): well inside
# the 79 GiB an H100 80GB offers. tests/test_memory_model.py checks the defaults below against
# the same model.
#
#SBATCH --job-name=m6-100b
#SBATCH --nodes=8
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

NODES=${NODES:-${SLURM_JOB_NUM_NODES:-8}}
PRESET=${PRESET:-m6-100b}  # e.g. m6-tiny with MOCK_DATA=1 DEVICE=cpu BF16=0 to try the script on CPUs
GPUS_PER_NODE=${GPUS_PER_NODE:-8}  # processes per node: one per GPU (or CPU ranks with DEVICE=cpu)
DEVICE=${DEVICE:-cuda}  # cuda | cpu (gloo)
BF16=${BF16:-1}  # 1: bf16 mixed precision (--bf16); 0: fp32
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-64}
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-0}
DP_SHARDING=${DP_SHARDING:-optimizer}  # replicate | optimizer | full
RECOMPUTE=${RECOMPUTE:-}  # empty or none | selective | full
MICRO_BATCH=${MICRO_BATCH:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
LR=${LR:-1e-4}
MIN_LR=${MIN_LR:-1e-5}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
DATA_PATH=${DATA_PATH:-}  # indexed prefix or "W1 P1 W2 P2" (tools/preprocess_data.py); or MOCK_DATA=1
MOCK_DATA=${MOCK_DATA:-0}
SAVE=${SAVE-checkpoints/m6_100b}  # empty: no checkpoints (and no preemption handling)
LOAD=${LOAD-$SAVE}  # resumed from when it holds a checkpoint (empty: never)
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EXIT_INTERVAL=${EXIT_INTERVAL:-}  # save and stop at multiples of this (before --time runs out)
ASYNC_SAVE=${ASYNC_SAVE:-1}  # write checkpoints in the background while training goes on
KEEP_LAST=${KEEP_LAST-3}  # complete checkpoints kept under $SAVE (empty: all)
TENSORBOARD_DIR=${TENSORBOARD_DIR-runs/m6_100b}  # empty: no TensorBoard logs
NUM_WORKERS=${NUM_WORKERS:-2}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-10}  # a collective waiting longer fails and dumps NCCL's trace
DRY_RUN=${DRY_RUN:-0}  # 1: build rank DRY_RUN_RANK's layout of this job on the meta device, no GPUs

source examples/slurm_launch.sh "$@"
