#!/usr/bin/env bash
# The main job on one CPU machine: build the bundled sample data (raw jsonl and images), turn it
# into indexed datasets with tools/preprocess_data.py, train m6-tiny on all five pretraining tasks
# from them, save a checkpoint, and caption held-out images with the caption accuracy.
# Every setting can be overridden from the environment, e.g. TRAIN_ITERS=100 bash ...
# NPROC=4 trains the same model with tensor x pipeline parallelism (TP2 x PP2) on this CPU:
# torchrun starts 4 gloo ranks; its checkpoint then captions on one process like any other.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/m6_sample}
INDEXED=${INDEXED:-data/m6_tiny}
SAVE=${SAVE:-checkpoints/m6_tiny}
TRAIN_ITERS=${TRAIN_ITERS:-1500}
NUM_WORKERS=${NUM_WORKERS:-1}
NPROC=${NPROC:-1}
SEED=${SEED:-1234}
TP=${TP:-2}
PP=${PP:-2}

if [ ! -f "$DATA/vocab.txt" ]; then
  echo "== building the sample data in $DATA"
  $PYTHON tools/prepare_sample_data.py --output-dir "$DATA"
fi

echo "== building indexed datasets in $INDEXED from the text and the training image-text pairs"
$PYTHON tools/preprocess_data.py --input "$DATA/text.jsonl" --output-prefix "$INDEXED/corpus" \
  --vocab-file "$DATA/vocab.txt" --append-eod --workers 2 --no-progress
$PYTHON tools/preprocess_data.py --input "$DATA/captions_train.jsonl" --output-prefix "$INDEXED/pairs" \
  --image-key image --image-size 96 --vocab-file "$DATA/vocab.txt" --workers 2 --no-progress

# A 400-iteration warm-up: with 30, some seeds and thread counts lost colour in the fresh ResNet in
# the first hundred steps and never learned it again (captions right but for the colour; 70-74/100,
# docs/PERFORMANCE.md); 200 kept it on every run measured until the corpus's deduplication rule
# changed (#14), when the default seed lost it too (37/100); 400 keeps it (99/100).
TRAIN_ARGS=(
  --preset m6-tiny \
  --data-path "$INDEXED/corpus_text_document" "$INDEXED/pairs_text_image" --split 98,2,0 \
  --vocab-file "$DATA/vocab.txt" \
  --task-weights text_denoising=1,prefix_lm=1,captioning=4,mm_denoising=1,mm_prefix_lm=1 \
  --train-iters "$TRAIN_ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 400 --lr-decay-style cosine --seed "$SEED" \
  --weight-decay 0.01 --clip-grad 1.0 \
  --log-interval 100 --eval-interval 500 --eval-iters 4 \
  --num-workers "$NUM_WORKERS" \
  --tensorboard-dir runs/m6_tiny
)

if [ "$NPROC" -gt 1 ]; then
  echo "== training m6-tiny for $TRAIN_ITERS iterations on $NPROC ranks: TP$TP x PP$PP"
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
  TRAIN_ARGS+=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
else
  echo "== training m6-tiny for $TRAIN_ITERS iterations (all five tasks mixed)"
  LAUNCH=("$PYTHON")
fi
rm -rf "$SAVE"
"${LAUNCH[@]}" -m megatron_m6.pretrain "${TRAIN_ARGS[@]}" --save "$SAVE"

echo "== captioning held-out images (never seen in training)"
$PYTHON tools/generate.py --load "$SAVE" --vocab-file "$DATA/vocab.txt" \
  --eval-captions "$DATA/captions_test.jsonl" --show 10

echo "== continuing a text prompt"
$PYTHON tools/generate.py --load "$SAVE" --vocab-file "$DATA/vocab.txt" --text "红色的圆形在" --max-new-tokens 16
