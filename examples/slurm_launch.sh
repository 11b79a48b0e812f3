# Shared by the SLURM scripts pretrain_m6_{base,10b,100b}.sh, which set PRESET and the layout
# variables (TP, PP, EP, ... see any of them) and then source this file from the repository root:
# it sets NCCL defaults, assembles the megatron_m6.pretrain arguments and starts one torchrun
# per node (or one standalone torchrun on a single node outside SLURM, or with DRY_RUN=1 one
# process that builds rank DRY_RUN_RANK's layout on the meta device).
#
# Preemption and time limits: the scripts ask SLURM for USR1 at this shell ahead of the time
# limit (#SBATCH --signal=B:USR1@...). The trap below passes it on to every process of the
# training step (scancel signals them all); torchrun forwards it to its ranks as well, and the
# ranks (--exit-signal-handler) finish their step, save a checkpoint and exit. Then this shell
# requeues the job (#SBATCH --requeue), which resumes from that checkpoint. USR1, because SLURM
# sends SIGTERM of its own at the time limit and on scancel; data loader workers ignore both
# (megatron_m6/data/dataset.py: they died of SIGTERM before, failing the rank before it could
# save). torchrun handles USR1 from torch 2.9 on (TORCHELASTIC_SIGNALS_TO_HANDLE); an older one
# would be killed by it.

# NCCL and PyTorch: settings already in the environment (e.g. the cluster's NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA) win; srun passes the environment to every node.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^docker,lo}  # any interface but loopback/docker
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail, not hang
# NCCL's flight recorder: a collective that times out (--distributed-timeout-minutes) dumps the
# last collectives of every rank to files, which show which rank stopped where. These names are
# read by every torch since 2.3; newer ones prefer TORCH_FR_* and warn once per rank.
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
TRACE_DIR=${TENSORBOARD_DIR:-runs/$PRESET}/nccl_trace
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$TRACE_DIR/job_${SLURM_JOB_ID:-local}_rank_}
mkdir -p "$(dirname "$TORCH_NCCL_DEBUG_INFO_TEMP_FILE")"
# Gloo (the background checkpoint writer's process group) takes exact interface names, no
# "^exclusion" or prefixes: it follows NCCL_SOCKET_IFNAME when that names existing interfaces
# ("ib0" or "=ib0,ib1"), else it uses the interface of the hostname. Set it to override.
exact_interfaces() {  # prints $1 without a leading "=" when it lists only existing interfaces
  local list=${1#=} name
  [ -n "$list" ] && [ "${list#^}" = "$list" ] || return 1
  for name in ${list//,/ }; do [ -e "/sys/class/net/$name" ] || return 1; done
  echo "$list"
}
if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && IFNAMES=$(exact_interfaces "$NCCL_SOCKET_IFNAME"); then
  export GLOO_SOCKET_IFNAME=$IFNAMES
fi
# No CUDA_DEVICE_MAX_CONNECTIONS=1: it serves Megatron's TP communication/compute overlap, which
# this code does not have (megatron_m6/parallel: DTensor TP, FSDP2, bucketed DP all-reduce), and
# one hardware queue would serialise FSDP2's all-gather/reduce-scatter streams with compute.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1  # log lines reach the job's output as they happen, also when killed
# torchrun passes USR1 on to its ranks and waits this long for them to save and exit before it
# kills them: inside the lead time of the scripts' #SBATCH --signal (600 s).
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-480}

ARGS=(--preset "$PRESET" --device "$DEVICE"
      --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
      --expert-model-parallel-size "$EP" --data-parallel-sharding "$DP_SHARDING"
      --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
      --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP_ITERS"
      --lr-decay-style cosine --weight-decay 0.01 --clip-grad 1.0
      --distributed-timeout-minutes "$DIST_TIMEOUT_MINUTES"
      --log-interval 10 --eval-interval 1000 --eval-iters 10 --num-workers "$NUM_WORKERS")
if [ "$BF16" = 1 ]; then ARGS+=(--bf16); fi
if [ -n "$TENSORBOARD_DIR" ]; then ARGS+=(--tensorboard-dir "$TENSORBOARD_DIR"); fi
if [ "$SEQUENCE_PARALLEL" = 1 ]; then ARGS+=(--sequence-parallel); fi
if [ -n "$RECOMPUTE" ] && [ "$RECOMPUTE" != none ]; then ARGS+=(--recompute-granularity "$RECOMPUTE"); fi
if [ -n "$EXIT_INTERVAL" ]; then ARGS+=(--exit-interval "$EXIT_INTERVAL"); fi
if [ -n "$SAVE" ]; then ARGS+=(--save "$SAVE" --save-interval "$SAVE_INTERVAL" --exit-signal-handler); fi
if [ -n "$SAVE" ] && [ "${ASYNC_SAVE:-0}" = 1 ]; then ARGS+=(--async-save); fi
if [ -n "$SAVE" ] && [ -n "${KEEP_LAST:-}" ]; then ARGS+=(--keep-last "$KEEP_LAST"); fi
if [ -n "$LOAD" ] && [ -f "$LOAD/latest_checkpointed_iteration.txt" ]; then ARGS+=(--load "$LOAD"); fi
if [ "$MOCK_DATA" = 1 ]; then
  ARGS+=(--mock-data)
else  # one indexed-dataset prefix, or a blend "W1 PREFIX1 W2 PREFIX2 ..."
  read -ra BLEND <<< "${DATA_PATH:?set DATA_PATH (indexed datasets from tools/preprocess_data.py) or MOCK_DATA=1}"
  ARGS+=(--data-path "${BLEND[@]}")
fi

latest_iteration() { cat "$SAVE/latest_checkpointed_iteration.txt" 2>/dev/null || echo none; }

if [ "$DRY_RUN" = 1 ]; then
  exec "$PYTHON" -m megatron_m6.pretrain --dry-run --world-size $((NODES * GPUS_PER_NODE)) \
    --rank "${DRY_RUN_RANK:-0}" "${ARGS[@]}" "$@"
elif [ -n "${SLURM_JOB_ID:-}" ]; then
  # One torchrun per node; they meet at a c10d rendezvous hosted on the first node.
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  BEFORE=$(latest_iteration)
  PREEMPTED=0
  trap 'PREEMPTED=1; echo "received SIGUSR1: asking the ranks to save and exit"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
  # In the background: the shell runs a trap only between commands, or while it waits.
  srun --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-16}" --kill-on-bad-exit=1 \
    "$PYTHON" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
      -m megatron_m6.pretrain "${ARGS[@]}" "$@" &
  SRUN=$!
  while kill -0 "$SRUN" 2>/dev/null; do wait "$SRUN" || true; done  # a trap ends one wait early
  wait "$SRUN" && STATUS=0 || STATUS=$?
  # Preempted and a new checkpoint is there: run again from it (torchrun exits non-zero after a
  # signal, whatever its ranks did). A save that failed leaves the job failed instead.
  if [ "$PREEMPTED" = 1 ] && [ -n "$SAVE" ] && [ "$(latest_iteration)" != "$BEFORE" ]; then
    echo "requeueing job $SLURM_JOB_ID to resume from iteration $(latest_iteration)"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$STATUS"
elif [ "$NODES" = 1 ]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$GPUS_PER_NODE" \
    -m megatron_m6.pretrain "${ARGS[@]}" "$@"
else
  echo "error: $NODES nodes need a SLURM allocation (sbatch, or bash inside salloc)" >&2
  exit 1
fi
