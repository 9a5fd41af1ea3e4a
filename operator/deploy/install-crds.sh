#!/usr/bin/env bash
# Install (or upgrade) the TeleChatFinetune and TeleChatInference CRDs from crds/ with kubectl, stamped with the
# ownership metadata Helm checks, so that a later `helm install <release> charts/telechat-operator --namespace
# <namespace>` adopts them instead of failing with "invalid ownership metadata" (the chart installs the same CRDs).
# Used by dev-up.sh (tests/up.sh). KUBECONFIG and PATH (kubectl) must point at the cluster.
#   bash operator/deploy/install-crds.sh
# Environment: TELECHAT_HELM_RELEASE (default telechat-operator) and TELECHAT_HELM_NAMESPACE (default telechat)
# name the release expected to take the CRDs over: the README's `helm install telechat-operator
# charts/telechat-operator --namespace telechat --create-namespace` then works verbatim. For a release of another
# name, set them, or install with `helm install ... --take-ownership` (Helm >= 3.17).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
release="${TELECHAT_HELM_RELEASE:-telechat-operator}"
namespace="${TELECHAT_HELM_NAMESPACE:-telechat}"
kubectl apply --server-side --force-conflicts --filename="$repo/crds/" >/dev/null
crds=(crd/telechatfinetunes.telechat.io crd/telechatinferences.telechat.io)
kubectl wait --for=condition=Established --timeout=60s "${crds[@]}" >/dev/null
kubectl label --overwrite "${crds[@]}" app.kubernetes.io/managed-by=Helm >/dev/null
kubectl annotate --overwrite "${crds[@]}" "meta.helm.sh/release-name=$release" \
  "meta.helm.sh/release-namespace=$namespace" >/dev/null
echo "install-crds: CRDs installed (ready to be adopted by Helm release $release in namespace $namespace)"
