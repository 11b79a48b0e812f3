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
# Preemption and time limits: USR1 to the batch shell 10 minutes before the end; the ranks
# save and exit, and the job requeues itself and resumes (see slurm_launch.sh).
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
set -eu  # no pipefail: `scontrol ... | head -n1` ends scontrol with SIGPIPE
# sbatch runs a copy of this script from SLURM's spool directory: then the repository is where
# the job was submitted from.
if [ -f "$(dirname "$0")/../megatron_m6/pretrain.py" ]; then cd "$(dirname "$0")/.."; else cd "$SLURM_SUBMIT_DIR"; fi

NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
PRESET=${PRESET:-m6-base}  # e.g. m6-tiny with MOCK_DATA=1 DEVICE=cpu BF16=0 to try the script on CPUs
GPUS_PER_NODE=${GPUS_PER_NODE:-8}  # processes per node: one per GPU (or CPU ranks with DEVICE=cpu)
DEVICE=${DEVICE:-cuda}  # cuda | cpu (gloo)
BF16=${BF16:-1}  # 1: bf16 mixed precision (--bf16); 0: fp32
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}
SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-0}
DP_SHARDING=${DP_SHARDING:-replicate}  # replicate | optimizer | full
RECOMPUTE=${RECOMPUTE:-}  # empty or none | selective | full
MICRO_BATCH=${MICRO_BATCH:-32}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-1e-5}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
DATA_PATH=${DATA_PATH:-}  # indexed prefix or "W1 P1 W2 P2" (tools/preprocess_data.py); or MOCK_DATA=1
MOCK_DATA=${MOCK_DATA:-0}
SAVE=${SAVE-checkpoints/m6_base}  # empty: no checkpoints (and no preemption handling)
LOAD=${LOAD-$SAVE}  # resumed from when it holds a checkpoint (empty: never)
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EXIT_INTERVAL=${EXIT_INTERVAL:-}  # save and stop at multiples of this (before --time runs out)
ASYNC_SAVE=${ASYNC_SAVE:-1}  # write checkpoints in the background while training goes on
KEEP_LAST=${KEEP_LAST-3}  # complete checkpoints kept under $SAVE (empty: all)
TENSORBOARD_DIR=${TENSORBOARD_DIR-runs/m6_base}  # empty: no TensorBoard logs
NUM_WORKERS=${NUM_WORKERS:-2}
PYTHON=${PYTHON:-python3}
MASTER_PORT=${MASTER_PORT:-29500}
DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-10}  # a collective waiting longer fails and dumps NCCL's trace
DRY_RUN=${DRY_RUN:-0}  # 1: build rank DRY_RUN_RANK's layout of this job on the meta device, no GPUs

source examples/slurm_launch.sh "$@"
