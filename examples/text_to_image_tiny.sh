#!/usr/bin/env bash
# Text-to-image on one CPU machine: M6 learns to draw the sample scenes from their captions.
#
# Starts from the pretraining demo's checkpoint (examples/pretrain_m6_tiny.sh, run first when it is
# missing). Writes the text-to-image sample set, whose test captions name attribute combinations no
# training caption names; turns its training pairs into an image-text indexed dataset; trains the
# VQ-VAE image tokenizer on those images; writes every pair as [caption, image codes]; grows the
# pretrained checkpoint by [BOI], [EOI] and the code tokens (and the positions an image needs);
# fine-tunes it to write the codes of a caption; and for every held-out caption samples candidates,
# reranks them by the pretrained M6's likelihood of the caption as their caption, and scores them
# with the sample data's drawing rules. Writes SAMPLES/index.html, SAMPLES/grid.png and one table.
# Every setting can be overridden from the environment, e.g. T2I_ITERS=1000 bash ...
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA=${DATA:-data/m6_sample}
PRETRAINED=${PRETRAINED:-checkpoints/m6_tiny}
WORK=${WORK:-data/m6_t2i}
VQ=${VQ:-checkpoints/vq_sample}
SAVE=${SAVE:-checkpoints/m6_tiny_t2i}
SAMPLES=${SAMPLES:-samples}
VQ_ITERS=${VQ_ITERS:-1000}
VQ_BATCH=${VQ_BATCH:-8}
DOWNSAMPLE=${DOWNSAMPLE:-8}  # 96 px images, 12x12 codes: 2x2 codes per quarter of a grid cell, one shape
T2I_ITERS=${T2I_ITERS:-850}  # 1000: all four 0.897 instead of 0.810, one more minute
NUM_SAMPLES=${NUM_SAMPLES:-8}
TOP_K=${TOP_K:-0}  # 0: no top-k cut
TOP_P=${TOP_P:-0.9}  # the nucleus: a background code's stray alternatives are never drawn
SEQ=${SEQ:-160}  # [CLS], a caption of up to 12 tokens, [SEP], [PAD]s, [BOI], 12x12 codes, [EOI]
DOWN="$DATA/downstream"
start=$(date +%s)

if [ ! -f "$PRETRAINED/latest_checkpointed_iteration.txt" ]; then
  echo "== no pretrained checkpoint in $PRETRAINED: running the pretraining demo first"
  DATA="$DATA" SAVE="$PRETRAINED" bash examples/pretrain_m6_tiny.sh
fi
if [ ! -f "$DOWN/text_to_image.json" ]; then
  echo "== writing the text-to-image sample set in $DOWN"
  $PYTHON tools/prepare_sample_data.py --output-dir "$DATA" --text-to-image
fi

echo "== the training and validation pairs as image-text indexed datasets"
for split in train valid; do
  $PYTHON tools/preprocess_data.py --input "$DOWN/text_to_image_$split.jsonl" --output-prefix "$WORK/$split" \
    --json-keys caption --image-key image --image-size 96 --vocab-file "$DATA/vocab.txt" --workers 2 \
    --no-dedup --no-progress > /dev/null
done

echo "== training the image tokenizer for $VQ_ITERS iterations"
rm -rf "$VQ"
$PYTHON tools/train_image_tokenizer.py --data "$WORK/train_caption_image" --preset vq-sample \
  --downsample "$DOWNSAMPLE" --train-iters "$VQ_ITERS" --batch-size "$VQ_BATCH" --lr 2e-3 --log-interval 200 --save "$VQ" --tensorboard-dir runs/vq_sample

echo "== the pairs as [caption, image codes]"
for split in train valid; do
  $PYTHON tools/encode_image_codes.py --input "$WORK/${split}_caption_image" --output-prefix "$WORK/codes_$split" \
    --image-tokenizer "$VQ" --vocab-file "$DATA/vocab.txt"
done

echo "== growing $PRETRAINED by the image-code tokens"
rm -rf "$WORK/grown" "$SAVE"
$PYTHON tools/checkpoint/convert.py grow --load "$PRETRAINED" --output "$WORK/grown" --image-tokenizer "$VQ" \
  --max-position-embeddings "$SEQ"

echo "== fine-tuning text-to-image for $T2I_ITERS iterations"
$PYTHON -m megatron_m6.finetune --task text_to_image --preset m6-tiny --vocab-file "$DATA/vocab.txt" \
  --image-tokenizer "$VQ" --train-data "$WORK/codes_train" --valid-data "$WORK/codes_valid" \
  --pretrained-checkpoint "$WORK/grown" --seq-length "$SEQ" --max-position-embeddings "$SEQ" \
  --train-iters "$T2I_ITERS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 50 --weight-decay 0.01 --clip-grad 1.0 \
  --log-interval 100 --eval-interval 500 --eval-iters 2 --save "$SAVE" --tensorboard-dir runs/m6_tiny_t2i

echo "== drawing every held-out caption $NUM_SAMPLES times, reranked by the pretrained captioner"
rm -rf "$SAMPLES"
$PYTHON -m megatron_m6.evaluate --task text_to_image --load "$SAVE" --data "$DOWN/text_to_image_test.jsonl" \
  --num-samples "$NUM_SAMPLES" --top-k "$TOP_K" --top-p "$TOP_P" --rerank-load "$PRETRAINED" --batch-size 64 \
  --output-dir "$SAMPLES" > /dev/null

$PYTHON - "$SAMPLES/metrics.json" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"\n{m['prompts']} held-out captions (attribute combinations no training caption names), "
      f"{m['samples_per_prompt']} samples each")
print("| image | colour | shape | count | position | all |")
print("|---|---|---|---|---|---|")
for name, label in (("reranked", "generated, reranked"), ("first_sample", "generated, first sample"),
                    ("reconstruction", "tokenizer reconstruction"), ("reference", "reference drawing")):
    print(f"| {label} | " + " | ".join(f"{m[f'{name}_{a}']:.3f}" for a in
                                     ("colour", "shape", "count", "position", "all")) + " |")
print(f"\nreconstruction PSNR {m['reconstruction_psnr']:.1f} dB, codes used by the references "
      f"{m['codes_used']} (perplexity {m['codebook_perplexity']:.1f})")
print(f"FID (M6's ResNet features; reference drawings against): reranked {m['fid_reranked']:.2f}, "
      f"first sample {m['fid_first_sample']:.2f}, reconstructions {m['fid_reconstruction']:.2f}")
print(f"wall time of this script: {int(sys.argv[2]) // 60} min {int(sys.argv[2]) % 60} s")
EOF
echo "== samples: $SAMPLES/index.html and $SAMPLES/grid.png"
