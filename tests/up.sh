#!/usr/bin/env bash
# README's first command: bring the local simulated Ascend cluster up (building what it must) and say how to use it.
#   bash tests/up.sh [--nodes N] [--state-dir DIR]      stop it with: .venv/bin/python -m tests.cluster down
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/cluster/lib.sh
ensure_go_on_path
ensure_venv
.venv/bin/python -m tests.cluster build >/dev/null
exports="$(.venv/bin/python -m tests.cluster up "$@")"
eval "$exports" # KUBECONFIG and PATH for the hook below
hook_status=0
if [ -f tests/cluster/after_up.sh ]; then
  bash tests/cluster/after_up.sh || hook_status=$?
fi
kubectl_bin="$(dirname "$KUBECONFIG")/bin/kubectl"
"$kubectl_bin" get nodes \
  --output=custom-columns='NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,NPU:.status.allocatable.huawei\.com/Ascend910,ACCELERATOR:.metadata.labels.accelerator-type'
cat <<MSG

The local Ascend cluster is up. Point kubectl at it:
$exports
  kubectl get nodes
or without touching your shell's PATH:
  alias kubectl='$kubectl_bin --kubeconfig=$KUBECONFIG'
Stop it:  .venv/bin/python -m tests.cluster down    Status: .venv/bin/python -m tests.cluster status
MSG
if [ "$hook_status" -ne 0 ]; then
  echo "error: tests/cluster/after_up.sh failed (exit $hook_status); the cluster itself is up" >&2
  exit "$hook_status"
fi
