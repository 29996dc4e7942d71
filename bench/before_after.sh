#!/usr/bin/env bash
# The served path's own cost, before (a base commit) and after (this working tree), in interleaved runs:
#
#   bash bench/before_after.sh BASE_COMMIT OUT_DIR [ROUNDS]
#
# Each round runs this tree's bench/throughput.py on the near-free model (bench/near_free.py) at 1 and 16 clients
# x 1 text per call and at 4 clients x 32 texts per call, first against BASE_COMMIT's gateway and its builder's
# model, then against this tree's. OUT_DIR gets every run's JSON and summary.json (medians over the rounds).
set -euo pipefail
base=$1 out=$2 rounds=${3:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
old=$(mktemp -d)/base
git -C "$here" worktree add -q "$old" "$base"
cp -r "$here/gateway/ner_gateway/pb" "$old/gateway/ner_gateway/"  # generated at install, not committed
mkdir -p "$out"
out=$(cd "$out" && pwd)  # the runs write from either tree
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
# Each side's near-free model is built once by its own builder (its own Triton model.py); this tree's benchmark
# drives both and starts each side's gateway from that side's code (BENCH_GATEWAY_PYTHONPATH).
repos=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$old"; rm -rf "$repos"' EXIT
(cd "$old" && PYTHONPATH=$old/gateway:$old/builder "$py" "$here/bench/near_free.py" "$repos/before") > /dev/null 2>&1
(cd "$here" && "$py" bench/near_free.py "$repos/after") > /dev/null 2>&1
for round in $(seq "$rounds"); do
  for side in before after; do
    if [ "$side" = before ]; then served=$old/gateway:$old/builder; else served=$here/gateway:$here/builder; fi
    for shape in "1 --clients 1,16" "32 --clients 4 --texts-per-call 32"; do
      set -- $shape
      (cd "$here" && BENCH_GATEWAY_PYTHONPATH=$served "$py" bench/throughput.py --repository "$repos/$side" \
        --models near-free "${@:2}" --paths gateway --rounds 1 --duration 5 \
        --json-out "$out/$side-$1-$round.json" > "$out/$side-$1-$round.log" 2>&1)
    done
  done
done
after_commit=$(git -C "$here" rev-parse --short HEAD)$(git -C "$here" diff --quiet HEAD -- gateway builder || echo "+changes")
"$py" - "$out" "$(git -C "$here" rev-parse --short "$base")" "$after_commit" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
keys = ["sentences_per_s", "p50_ms", "p99_ms", "triton_avg_batch", "cpu_ms_per_sentence_clients",
        "cpu_ms_per_sentence_gateway", "cpu_ms_per_sentence_tritonserver", "cpu_ms_per_sentence_stubs", "cores_busy"]
summary = {"base": sys.argv[2], "after": sys.argv[3]}
for side in ("before", "after"):
    for shape, file, clients in (("1x1", "1", "1"), ("16x1", "1", "16"), ("4x32", "32", "4")):
        cells = [json.loads(p.read_text())["sweep"]["gateway:near-free"][clients]
                 for p in sorted(out.glob(f"{side}-{file}-*.json"))]
        summary[f"{side} {shape}"] = {k: round(statistics.median(c[k] for c in cells), 2) for k in keys} | {
            "sentences_per_s_range": [round(min(c["sentences_per_s"] for c in cells), 1),
                                      round(max(c["sentences_per_s"] for c in cells), 1)], "rounds": len(cells)}
for shape in ("1x1", "16x1", "4x32"):
    summary[f"after / before {shape}"] = round(summary[f"after {shape}"]["sentences_per_s"]
                                               / summary[f"before {shape}"]["sentences_per_s"], 2)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
