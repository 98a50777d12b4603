#!/usr/bin/env bash
# Real-data check: the three recipes on ../shared/data/sid-mini with the real CLIP ViT-B/16.
#   bash benchmarks/sid_mini.sh [OUT_DIR]
# Needs the [train] extra and the weights from ../shared/fixtures/clip_vit_b16.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/sid-mini}
DATA=../shared/data/sid-mini
WEIGHTS=$(python ../shared/fixtures/clip_vit_b16.py)
COMMON=(--data "$DATA/train" --val "$DATA/val" --model ViT-B-16-quickgelu --pretrained "$WEIGHTS"
        --epochs "${EPOCHS:-3}" --batch-size 32 --workers 1 --seed 0)
declare -A RECIPE=(
  [a_univfd_baseline]="--baseline"
  [b_critical_layer_probe]="--rank 0"
  [c_i2p]="--rank 16"
)
for name in a_univfd_baseline b_critical_layer_probe c_i2p; do
  if [[ ! -f $OUT/$name/metrics.json ]]; then
    i2p train "${COMMON[@]}" ${RECIPE[$name]} --out "$OUT/$name"
  fi
  echo "== $name on $DATA/test (unseen generators)"
  i2p eval --ckpt "$OUT/$name/checkpoint.safetensors" --data "$DATA/test" --workers 1 | tee "$OUT/$name/test.txt"
  i2p eval --ckpt "$OUT/$name/checkpoint.safetensors" --data "$DATA/test" --workers 1 --json > "$OUT/$name/test.json"
done
