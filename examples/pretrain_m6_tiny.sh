#!/usr/bin/env bash
# The main job on one CPU machine: build the bundled sample data, train m6-tiny on all five
# pretraining tasks, save a checkpoint, and caption held-out images with the caption accuracy.
# Every setting can be overridden from the environment, e.g. TRAIN_ITERS=100 bash ...
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/m6_sample}
SAVE=${SAVE:-checkpoints/m6_tiny}
TRAIN_ITERS=${TRAIN_ITERS:-1000}
NUM_WORKERS=${NUM_WORKERS:-1}

if [ ! -f "$DATA/vocab.txt" ]; then
  echo "== building the sample data in $DATA"
  $PYTHON tools/prepare_sample_data.py --output-dir "$DATA"
fi

echo "== training m6-tiny for $TRAIN_ITERS iterations (all five tasks mixed)"
rm -rf "$SAVE"
$PYTHON -m megatron_m6.pretrain \
  --preset m6-tiny \
  --data-path "$DATA" \
  --task-weights text_denoising=1,prefix_lm=1,captioning=4,mm_denoising=1,mm_prefix_lm=1 \
  --train-iters "$TRAIN_ITERS" \
  --lr 2e-3 --min-lr 1e-4 --lr-warmup-iters 30 --lr-decay-style cosine \
  --weight-decay 0.01 --clip-grad 1.0 \
  --log-interval 100 --eval-interval 250 --eval-iters 4 \
  --num-workers "$NUM_WORKERS" \
  --save "$SAVE" --tensorboard-dir runs/m6_tiny

echo "== captioning held-out images (never seen in training)"
$PYTHON tools/generate.py --load "$SAVE" --vocab-file "$DATA/vocab.txt" \
  --eval-captions "$DATA/captions_test.jsonl" --show 10

echo "== continuing a text prompt"
$PYTHON tools/generate.py --load "$SAVE" --vocab-file "$DATA/vocab.txt" --text "红色的圆形在" --max-new-tokens 16
