# Sourced by the demo scripts: run `ner-gateway serve` (embedded Triton) in the background, stop it on exit.
# start_gateway REPOSITORY  -> sets ADDRESS and GATEWAY (pid); stop_gateway -> SIGTERM and wait.

start_gateway() {
  local port log
  port=$($BIN/python -c "from ner_gateway.net import free_port; print(free_port())")
  log=$(mktemp -t ner-gateway.XXXXXX.log)
  ADDRESS="127.0.0.1:$port"
  echo "== starting ner-gateway (embedded Triton) on $ADDRESS, log in $log"
  NER_METRICS_PORT=0 $BIN/ner-gateway serve --model-repository "$1" --port "$port" >"$log" 2>&1 &
  GATEWAY=$!
  trap 'kill -TERM $GATEWAY 2>/dev/null; wait $GATEWAY 2>/dev/null || true' EXIT
  if ! $BIN/ner-gateway health --address "$ADDRESS" --wait 120; then
    tail -n 40 "$log"
    exit 1
  fi
  $BIN/ner-gateway models --address "$ADDRESS"
}

stop_gateway() {
  echo "== stopping"
  kill -TERM "$GATEWAY"
  wait "$GATEWAY"
  trap - EXIT
  echo "== done"
}
