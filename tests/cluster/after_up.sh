#!/usr/bin/env bash
# Hook run by tests/up.sh once the local cluster is up (KUBECONFIG and PATH already point at it).
# The operator's part: install the CRDs, start the operator in the background and run the sample telechat2-tiny job
# to Succeeded (simulated: kwok only changes pod phases). See operator/deploy/dev-up.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bash operator/deploy/dev-up.sh
