#!/usr/bin/env bash
# The operator on the local simulated cluster (called by tests/cluster/after_up.sh; KUBECONFIG and PATH point at
# the cluster). Installs the CRDs, starts the operator in the background (log and pidfile beside the kubeconfig),
# applies the sample telechat2-tiny job and, because kwok never runs a container (pods only change phase when
# annotated), drives the sample's pods to Succeeded so it goes Running -> Merging -> Succeeded like a real job.
#   bash operator/deploy/dev-up.sh          start (again), sample included
#   bash operator/deploy/dev-up.sh stop     stop the background operator
# Environment: TELECHAT_DEV_SAMPLE=0 skips the sample; TELECHAT_DEV_SIMULATE=0 leaves its pods Running.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
state_dir="$(dirname "${KUBECONFIG:?KUBECONFIG must point at the local cluster}")"
pidfile="$state_dir/operator.pid"
logfile="$state_dir/operator.log"
sample="$repo/operator/deploy/samples/telechatfinetune-tiny.yaml"
job=telechat2-tiny-sample

stop_operator() {
  if [ -f "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "dev-up: stopped the operator (pid $pid)"
    fi
    rm -f "$pidfile"
  fi
}

if [ "${1:-}" = "stop" ]; then
  stop_operator
  exit 0
fi

# With Helm's ownership metadata: `helm install telechat-operator charts/telechat-operator --namespace telechat`
# adopts them later (see install-crds.sh).
bash "$repo/operator/deploy/install-crds.sh"
echo "dev-up: CRDs installed"

stop_operator
# The samples keep their data on a hostPath volume under /mnt/telechat: allow exactly that on the local cluster.
TELECHAT_OPERATOR_ALLOWED_HOSTPATHS="${TELECHAT_OPERATOR_ALLOWED_HOSTPATHS:-/mnt/telechat}" \
  nohup "$repo/.venv/bin/telechat-operator" run --all-namespaces --log-format plain --metrics-port 0 --liveness "" \
  >>"$logfile" 2>&1 &
echo $! >"$pidfile"
echo "dev-up: operator running (pid $(cat "$pidfile"), log $logfile; stop: bash operator/deploy/dev-up.sh stop)"

[ "${TELECHAT_DEV_SAMPLE:-1}" = "0" ] && exit 0
kubectl delete telechatfinetune "$job" --ignore-not-found --wait=true >/dev/null
kubectl apply --filename="$sample" >/dev/null
echo "dev-up: applied $sample"
[ "${TELECHAT_DEV_SIMULATE:-1}" = "0" ] && exit 0

# Simulated cluster only: play the part of the training and merge processes.
wait_state() {
  for _ in $(seq 150); do
    [ "$(kubectl get telechatfinetune "$job" -o jsonpath='{.status.state}')" = "$1" ] && return 0
    sleep 0.2
  done
  echo "dev-up: $job did not reach $1 (see $logfile)" >&2
  return 1
}
wait_state Running
kubectl annotate pods -l "telechat.io/job-name=$job,telechat.io/role=worker" telechat.io/fake-phase=Succeeded >/dev/null
wait_state Merging
kubectl wait --for=jsonpath='{.status.phase}'=Running --timeout=30s pod -l "telechat.io/job-name=$job,telechat.io/role=merge" >/dev/null
kubectl annotate pods -l "telechat.io/job-name=$job,telechat.io/role=merge" telechat.io/fake-phase=Succeeded >/dev/null
kubectl wait --for=condition=Succeeded --timeout=30s "telechatfinetune/$job" >/dev/null
echo "dev-up: $job Succeeded on the simulated cluster (pods only changed phase; nothing really trained):"
kubectl get telechatfinetune "$job"
