#!/usr/bin/env bash
# Load (or reload) MODEL from the repository on every running Triton pod, then check on each pod that
# VERSION is READY (default: print the READY versions). Step 2 of the model rollout in docs/operations.md.
#   deploy/k8s/load-model.sh MODEL [VERSION]        environment: NAMESPACE (ner), KUBECTL (kubectl)
set -euo pipefail
model=${1:?usage: load-model.sh MODEL [VERSION]}
version=${2:-}
namespace=${NAMESPACE:-ner}
kubectl=${KUBECTL:-kubectl}

pods=$("$kubectl" -n "$namespace" get pods -l app.kubernetes.io/name=triton \
  --field-selector=status.phase=Running -o name)
if [[ -z "$pods" ]]; then
  echo "no running Triton pods in namespace $namespace" >&2
  exit 1
fi
for pod in $pods; do
  printf '%s: ' "$pod"
  # Triton's image has Python (for its Python backend) but no guarantee of curl.
  "$kubectl" -n "$namespace" exec -i "$pod" -c triton -- python3 - "$model" "$version" <<'PY'
import json
import os
import sys
import urllib.request

model, version = sys.argv[1], sys.argv[2]
base = os.environ.get("TRITON_HTTP_URL", "http://127.0.0.1:8000") + "/v2"
# The repository API is restricted (base/triton/deployment.yaml): it needs the key of the Secret
# triton-admin-key, which the container has as TRITON_ADMIN_KEY.
headers = {"Content-Type": "application/json", "admin-key": os.environ["TRITON_ADMIN_KEY"]}


def post(path):
    request = urllib.request.Request(base + path, data=b"{}", method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=900) as response:
        body = response.read()
    return json.loads(body) if body else None


post(f"/repository/models/{model}/load")
ready = sorted((e["version"] for e in post("/repository/index")
                if e.get("name") == model and e.get("state") == "READY"), key=int)
print(f"{model}: READY versions {', '.join(ready) or 'none'}")
if version and version not in ready:
    sys.exit(f"{model} version {version} is not READY")
PY
done
