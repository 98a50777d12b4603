#!/usr/bin/env bash
# i2p-detect images/s of this checkout against an earlier commit, side by side on the same machine:
# the same 1,000 generated images (JPEG baseline/progressive and PNG, 200-700 px), the same artifact
# (tests/fixtures/v1, readable by both), --workers 2, alternated 5 times; the summary's images/s (the
# steady state) and the command's wall time (start-up included). Each version gets a lean venv (numpy,
# Pillow, onnxruntime, click: no torch), so neither borrows the other's code.
#   bash benchmarks/detect_vs_commit.sh [BASE_COMMIT]   (default: 8cc50c3, before issue 22's checks)
set -euo pipefail
BASE=${1:-8cc50c3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/i2p-detect-vs-XXXXXX)
git -C "$ROOT" worktree add -q -f "$WORK/base" "$BASE"
trap 'git -C "$ROOT" worktree remove -f "$WORK/base"; rm -rf "$WORK"' EXIT
for v in base head; do
  python3 -m venv "$WORK/$v-venv"
  "$WORK/$v-venv/bin/pip" install -q numpy pillow onnxruntime click
done
"$WORK/base-venv/bin/pip" install -q --no-deps "$WORK/base"
"$WORK/head-venv/bin/pip" install -q --no-deps "$ROOT"
"$WORK/head-venv/bin/python" - "$WORK/imgs" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng, root = np.random.default_rng(0), Path(sys.argv[1])
root.mkdir()
for i in range(1000):
    w, h = (int(v) for v in rng.integers(200, 700, 2))
    img = Image.fromarray(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize((w, h))
    img.save(root / f"{i:04d}.png") if i % 3 == 0 else img.save(root / f"{i:04d}.jpg", quality=90, progressive=bool(i % 2))
PY
for rep in 1 2 3 4 5; do
  for v in base head; do
    rm -f "$WORK/$v.csv"
    start=$(date +%s.%N)
    summary=$("$WORK/$v-venv/bin/i2p" detect "$WORK/imgs" --model "$ROOT/tests/fixtures/v1/artifact" \
      --csv "$WORK/$v.csv" --workers 2 --json 2>&1 | tail -1)
    end=$(date +%s.%N)
    echo "$v $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["images_per_s"])' "$summary") $(echo "$end - $start" | bc)"
  done
done | python3 -c '
import statistics as st, sys
rows = [line.split() for line in sys.stdin]
for v in ("base", "head"):
    ips = [float(r[1]) for r in rows if r[0] == v]; wall = [float(r[2]) for r in rows if r[0] == v]
    print(f"{v}: images/s {ips} median {st.median(ips):.1f}; wall s median {st.median(wall):.2f}")
b = st.median(float(r[1]) for r in rows if r[0] == "base"); h = st.median(float(r[1]) for r in rows if r[0] == "head")
print(f"head/base images/s: {h / b:.3f}")'
