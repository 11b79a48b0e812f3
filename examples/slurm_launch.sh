# Shared by the SLURM scripts pretrain_m6_{base,10b,100b}.sh, which set PRESET and the layout
# variables (TP, PP, EP, ... see any of them) and then source this file from the repository root:
# it sets NCCL defaults, assembles the megatron_m6.pretrain arguments and starts one torchrun
# per node (or one standalone torchrun on a single node outside SLURM).

# NCCL and PyTorch: settings already in the environment (e.g. the cluster's NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA) win; srun passes the environment to every node.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^docker,lo}  # any interface but loopback/docker
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail, not hang
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP communication overlap
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

ARGS=(--preset "$PRESET" --bf16
      --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
      --expert-model-parallel-size "$EP" --data-parallel-sharding "$DP_SHARDING"
      --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
      --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS"
      --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0
      --tensorboard-dir "$TENSORBOARD_DIR"
      --log-interval 10 --eval-interval 1000 --eval-iters 10 --num-workers "$NUM_WORKERS")
if [ "$SEQUENCE_PARALLEL" = 1 ]; then ARGS+=(--sequence-parallel); fi
if [ -n "$RECOMPUTE" ]; then ARGS+=(--recompute-granularity "$RECOMPUTE"); fi
if [ -n "$EXIT_INTERVAL" ]; then ARGS+=(--exit-interval "$EXIT_INTERVAL"); fi
if [ -n "$SAVE" ]; then ARGS+=(--save "$SAVE" --save-interval "$SAVE_INTERVAL"); fi
if [ -n "$SAVE" ] && [ "${ASYNC_SAVE:-0}" = 1 ]; then ARGS+=(--async-save); fi
if [ -n "$SAVE" ] && [ -n "${KEEP_LAST:-}" ]; then ARGS+=(--keep-last "$KEEP_LAST"); fi
if [ -n "$LOAD" ] && [ -f "$LOAD/latest_checkpointed_iteration.txt" ]; then ARGS+=(--load "$LOAD"); fi
if [ "$MOCK_DATA" = 1 ]; then
  ARGS+=(--mock-data)
else  # one indexed-dataset prefix, or a blend "W1 PREFIX1 W2 PREFIX2 ..."
  read -ra BLEND <<< "${DATA_PATH:?set DATA_PATH (indexed datasets from tools/preprocess_data.py) or MOCK_DATA=1}"
  ARGS+=(--data-path "${BLEND[@]}")
fi

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
