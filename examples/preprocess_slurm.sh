#!/usr/bin/env bash
# Build a large corpus as NUM_SHARDS shards, then merge them: a SLURM job array with one task
# per shard (WORKERS processes each) and a final job that runs once every shard succeeded.
#
#   INPUT="corpus/" OUTPUT_PREFIX=data/zh NUM_SHARDS=64 WORKERS=16 \
#     bash examples/preprocess_slurm.sh --split-sentences --append-eod
#   INPUT="pairs/*.tar" OUTPUT_PREFIX=data/pairs NUM_SHARDS=32 bash examples/preprocess_slurm.sh --image-key image
#   LOCAL=1 JOBS=2 ... bash examples/preprocess_slurm.sh ...   # no SLURM: JOBS shards at a time, then the merge
#
# Extra arguments go to tools/preprocess_data.py. Each shard is `preprocess_data.py --num-shards N
# --shard-index I` (docs/DATA.md, "Sharded runs"); the merge is `tools/merge_datasets.py --shards`,
# which refuses while a shard has no manifest. A failed or killed array is resubmitted as it was:
# shards already built are recognised by their manifests and skipped, and a shard killed midway
# continues from its last completed chunk (--resume; RESUME=0 starts such shards over, as it must
# after a change of settings). Text is deduplicated across all shards by the merge job, in
# DEDUP_MEMORY_GB (default 4) of memory, so the result equals a one-process run's.
# SLURM settings come from the environment: PARTITION, ACCOUNT, TIME (per shard), MAX_PARALLEL
# (array tasks at once), SBATCH_ARGS (anything else, e.g. "--gpus-per-node=0").
set -euo pipefail
# In a job, SLURM runs a copy of this file from its spool: the repository is the submit directory.
if [ -f "$(dirname "$0")/../tools/preprocess_data.py" ]; then cd "$(dirname "$0")/.."; else cd "$SLURM_SUBMIT_DIR"; fi
SCRIPT=examples/preprocess_slurm.sh

PYTHON=${PYTHON:-python3}
INPUT=${INPUT:?set INPUT: files, globs or folders for tools/preprocess_data.py --input}
OUTPUT_PREFIX=${OUTPUT_PREFIX:?set OUTPUT_PREFIX}
NUM_SHARDS=${NUM_SHARDS:?set NUM_SHARDS (at least 2)}
WORKERS=${WORKERS:-8}
MODE=${MODE:-submit}  # submit; or, inside the jobs: shard, merge
RESUME=${RESUME:-1}

build_shard() {  # $1: the shard index; the rest: preprocess_data.py flags
  local index=$1
  shift
  # shellcheck disable=SC2086  # INPUT may hold several paths or globs
  OMP_NUM_THREADS=1 $PYTHON tools/preprocess_data.py --input $INPUT --output-prefix "$OUTPUT_PREFIX" \
    --num-shards "$NUM_SHARDS" --shard-index "$index" --workers "$WORKERS" --no-progress \
    $([ "$RESUME" = 1 ] && echo --resume) "$@"
}

merge() {
  $PYTHON tools/merge_datasets.py --shards "$OUTPUT_PREFIX" --num-shards "$NUM_SHARDS" \
    --dedup-memory-gb "${DEDUP_MEMORY_GB:-4}"
}

case $MODE in
  shard) build_shard "${SLURM_ARRAY_TASK_ID:?not in a SLURM array}" "$@" ;;
  merge) merge ;;
  submit)
    if [ -n "${LOCAL:-}" ] || ! command -v sbatch > /dev/null; then
      echo "== $NUM_SHARDS shards on this machine, ${JOBS:-1} at a time"
      export -f build_shard
      export PYTHON INPUT OUTPUT_PREFIX NUM_SHARDS WORKERS RESUME
      seq 0 $((NUM_SHARDS - 1)) | xargs -P "${JOBS:-1}" -I{} bash -c 'build_shard "$@"' _ {} "$@"
      merge
      exit
    fi
    LOGS=${LOGS:-$(dirname "$OUTPUT_PREFIX")/slurm_logs}
    mkdir -p "$LOGS"
    COMMON=(--parsable --export=ALL ${PARTITION:+--partition="$PARTITION"} ${ACCOUNT:+--account="$ACCOUNT"})
    # shellcheck disable=SC2206  # SBATCH_ARGS is a list of flags
    COMMON+=(${SBATCH_ARGS:-})
    ARRAY=$(MODE=shard sbatch "${COMMON[@]}" --job-name=m6-preprocess --cpus-per-task="$WORKERS" \
      --time="${TIME:-24:00:00}" --array="0-$((NUM_SHARDS - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}" \
      --output="$LOGS/shard_%a.log" "$SCRIPT" "$@")
    ARRAY=${ARRAY%%;*}
    MERGE=$(MODE=merge sbatch "${COMMON[@]}" --job-name=m6-merge --cpus-per-task=1 \
      --dependency="afterok:$ARRAY" --output="$LOGS/merge.log" "$SCRIPT")
    MERGE=${MERGE%%;*}
    echo "submitted: shards = job array $ARRAY ($NUM_SHARDS tasks), merge = job $MERGE (after all succeed)"
    echo "logs: $LOGS/shard_*.log, $LOGS/merge.log"
    ;;
  *) echo "MODE is submit, shard or merge, not $MODE" >&2; exit 2 ;;
esac
