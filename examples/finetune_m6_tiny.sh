#!/usr/bin/env bash
# Fine-tune the tiny pretrained M6 on VQA and image-text matching, on one CPU machine.
#
# Starts from the pretraining demo's checkpoint (examples/pretrain_m6_tiny.sh, run first when the
# checkpoint is missing), writes the downstream sample sets, evaluates the pretrained model zero-
# shot, fine-tunes it on each task (keeping the best checkpoint by the validation metric), fine-
# tunes a text-only baseline that never sees the images, evaluates both on the held-out test sets
# and prints one table. Every setting can be overridden from the environment, e.g. EPOCHS=2 bash ...
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/m6_sample}
PRETRAINED=${PRETRAINED:-checkpoints/m6_tiny}
OUT=${OUT:-checkpoints/m6_tiny_finetune}
EPOCHS=${EPOCHS:-3}
NUM_WORKERS=${NUM_WORKERS:-1}
DOWN="$DATA/downstream"

if [ ! -f "$PRETRAINED/latest_checkpointed_iteration.txt" ]; then
  echo "== no pretrained checkpoint in $PRETRAINED: running the pretraining demo first"
  DATA="$DATA" SAVE="$PRETRAINED" bash examples/pretrain_m6_tiny.sh
fi
if [ ! -f "$DOWN/downstream.json" ]; then
  echo "== writing the downstream sample sets in $DOWN"
  $PYTHON tools/prepare_sample_data.py --output-dir "$DATA" --downstream \
    --caption-images 0 0 0 --vqa-images 600 100 300 --itm-images 800 100 200 --retrieval-images 100 \
    --text-generation-rows 0 0 0
fi

COMMON=(--preset m6-tiny --vocab-file "$DATA/vocab.txt" --lr 1e-3 --min-lr 1e-5 --lr-warmup-iters 10
        --weight-decay 0.01 --clip-grad 1.0 --epochs "$EPOCHS" --log-interval 50 --eval-interval 50
        --eval-iters 2 --num-workers "$NUM_WORKERS")

evaluate() {  # task checkpoint output [extra flags]
  local task=$1 load=$2 out=$3
  shift 3
  $PYTHON -m megatron_m6.evaluate --task "$task" --load "$load" --data "$DOWN/${task}_test.jsonl" \
    --vocab-file "$DATA/vocab.txt" --output-dir "$out" --max-new-tokens 8 --batch-size 64 "$@"
}
retrieval() {  # task: with itm, recall@k over the retrieval set too
  [ "$1" = itm ] && echo --retrieval-data "$DOWN/retrieval_test.jsonl" || true
}

finetune() {  # task save [extra flags]
  local task=$1 save=$2
  shift 2
  rm -rf "$save"
  $PYTHON -m megatron_m6.finetune "${COMMON[@]}" --task "$task" --pretrained-checkpoint "$PRETRAINED" \
    --train-data "$DOWN/${task}_train.jsonl" --valid-data "$DOWN/${task}_valid.jsonl" \
    --save "$save" --save-best "$@"
}

for task in vqa itm; do
  echo "== $task: zero-shot (the pretrained model as it is)"
  evaluate "$task" "$PRETRAINED" "$OUT/eval/$task/zero_shot" $(retrieval "$task")
  echo "== $task: fine-tuning for $EPOCHS epochs"
  finetune "$task" "$OUT/$task"
  evaluate "$task" "$OUT/$task/best" "$OUT/eval/$task/finetuned" $(retrieval "$task")
  echo "== $task: the text-only baseline (fine-tuned without the images)"
  finetune "$task" "$OUT/${task}_text_only" --text-only
  evaluate "$task" "$OUT/${task}_text_only/best" "$OUT/eval/$task/text_only" --text-only
done

echo "== results on the held-out test sets"
$PYTHON - "$OUT/eval" <<'EOF'
import json, os, sys
root = sys.argv[1]
rows = [("vqa", "accuracy"), ("itm", "accuracy"), ("itm", "i2t_R@1"), ("itm", "t2i_R@1"), ("itm", "t2i_R@5")]
print(f"| {'task':4} | {'metric':9} | {'zero-shot':>9} | {'fine-tuned':>10} | {'text-only':>9} |")
print(f"|{'-' * 6}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 11}|")
for task, metric in rows:
    value = lambda run: json.load(open(os.path.join(root, task, run, "metrics.json"))).get(metric, float("nan"))
    text_only = value("text_only")  # no retrieval: a model that never sees the image cannot rank images
    print(f"| {task:4} | {metric:9} | {value('zero_shot'):9.3f} | {value('finetuned'):10.3f} | {text_only:9.3f} |")
EOF
