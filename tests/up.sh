#!/usr/bin/env bash
# README's first command: bring the local simulated Ascend cluster up (building what it must) and say how to use it.
#   bash tests/up.sh [--nodes N] [--real [N]] [--state-dir DIR]
#   stop it with: .venv/bin/python -m tests.cluster down [--state-dir DIR]
# --real adds N (default 2) real nodes that run pods (containerd + kubelet, CNI bridge, kube-proxy, CoreDNS; root),
# then installs the operator in-cluster with its Helm chart and trains a real tiny sample job on those nodes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/cluster/lib.sh
real=""
for arg in "$@"; do
  if [ "$arg" = "--real" ]; then real="--real"; fi
done
[ -z "$real" ] || ensure_debian_packages
ensure_go_on_path
ensure_venv
.venv/bin/python -m tests.cluster build $real >/dev/null
exports="$(.venv/bin/python -m tests.cluster up "$@")"
eval "$exports" # KUBECONFIG and PATH for the hook below
state_dir="$(dirname "$KUBECONFIG")"
hook_status=0
hook="tests/cluster/after_up.sh"
if [ -n "$real" ]; then
  # Real nodes run everything for real: the operator in-cluster from its image (Helm chart) and a tiny
  # TeleChatFinetune trained on the real nodes (tests/cluster/real_sample.py), instead of the simulated job.
  hook="tests/cluster/real_sample.py"
  .venv/bin/python -m tests.cluster.real_sample --state-dir "$state_dir" || hook_status=$?
elif [ -f "$hook" ]; then
  bash "$hook" || hook_status=$?
fi
kubectl_bin="$state_dir/bin/kubectl"
state_arg="" # `down` and `status` must name the state dir `up` used, or they look at .cluster/
[ "$state_dir" = "$PWD/.cluster" ] || state_arg=" --state-dir $state_dir"
"$kubectl_bin" get nodes \
  --output=custom-columns='NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,NPU:.status.allocatable.huawei\.com/Ascend910,ACCELERATOR:.metadata.labels.accelerator-type'
cat <<MSG

The local Ascend cluster is up. Point kubectl at it:
$exports
  kubectl get nodes
or without touching your shell's PATH:
  alias kubectl='$kubectl_bin --kubeconfig=$KUBECONFIG'
Stop it (cluster and operator):  .venv/bin/python -m tests.cluster down$state_arg
Status:  .venv/bin/python -m tests.cluster status$state_arg
MSG
if [ "$hook_status" -ne 0 ]; then
  echo "error: $hook failed (exit $hook_status); the cluster itself is up" >&2
  exit "$hook_status"
fi
