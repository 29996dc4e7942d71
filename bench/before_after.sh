#!/usr/bin/env bash
# The served path's own cost, before (a base commit) and after (this working tree), in interleaved runs:
#
#   bash bench/before_after.sh BASE_COMMIT OUT_DIR [ROUNDS]
#
# Each round runs bench/throughput.py --near-free (this tree's benchmark, in both trees) at 1 and 16 clients x
# 1 text per call and at 4 clients x 32 texts per call, first against BASE_COMMIT's gateway, builder and Triton
# model, then against this tree's. OUT_DIR gets every run's JSON and summary.json (medians over the rounds).
set -euo pipefail
base=$1 out=$2 rounds=${3:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
old=$(mktemp -d)/base
git -C "$here" worktree add -q "$old" "$base"
trap 'git -C "$here" worktree remove --force "$old"' EXIT
cp -r "$here/gateway/ner_gateway/pb" "$old/gateway/ner_gateway/"  # generated at install, not committed
# The base measures with its own benchmark when it has the near-free mode (this tree's may import modules the base
# does not have); an older base gets this tree's.
if grep -q -- "--near-free" "$old/bench/throughput.py" 2>/dev/null; then
  cp "$old/bench/throughput.py" "$old/bench/throughput_now.py"
else
  cp "$here/bench/throughput.py" "$old/bench/throughput_now.py"
  cp "$here/bench/near_free.py" "$old/bench/near_free.py"
fi
mkdir -p "$out"
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
for round in $(seq "$rounds"); do
  for side in before after; do
    if [ "$side" = before ]; then dir=$old script=bench/throughput_now.py path=$old/gateway:$old/builder
    else dir=$here script=bench/throughput.py path=; fi
    (cd "$dir" && PYTHONPATH=$path "$py" "$script" --near-free --clients 1,16 --paths gateway --rounds 1 \
      --duration 5 --json-out "$out/$side-1-$round.json" > "$out/$side-1-$round.log" 2>&1)
    (cd "$dir" && PYTHONPATH=$path "$py" "$script" --near-free --clients 4 --texts-per-call 32 --paths gateway \
      --rounds 1 --duration 5 --json-out "$out/$side-32-$round.json" > "$out/$side-32-$round.log" 2>&1)
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
