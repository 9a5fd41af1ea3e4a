"""`helm install charts/telechat-operator` on a cluster whose CRDs were applied with kubectl (tests/up.sh does that).

Helm refuses to install over objects it does not own ("invalid ownership metadata"). operator/deploy/install-crds.sh
(what dev-up.sh, and so tests/up.sh, runs) stamps the CRDs with the ownership metadata of the release expected to
take them over, so the README's plain `helm install` works; `--take-ownership` covers any other release.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from tests.cluster.controlplane import ClusterHandle

REPO = Path(__file__).resolve().parents[2]
OPERATOR_CHART = REPO / "charts" / "telechat-operator"
CRDS = ("crd/telechatfinetunes.telechat.io", "crd/telechatinferences.telechat.io")


def plain_kubectl_apply(cluster: ClusterHandle) -> None:
    """The CRDs as `kubectl apply -f crds/` leaves them: no Helm ownership (earlier tests may have left some)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", f"--filename={REPO / 'crds'}")
    cluster.kubectl("label", *CRDS, "app.kubernetes.io/managed-by-", check=False)  # absent: a warning only
    cluster.kubectl("annotate", *CRDS, "meta.helm.sh/release-name-", "meta.helm.sh/release-namespace-", check=False)


def install_crds_script(cluster: ClusterHandle, release: str, namespace: str) -> None:
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "PATH": f"{cluster.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "TELECHAT_HELM_RELEASE": release,
        "TELECHAT_HELM_NAMESPACE": namespace,
    }
    subprocess.run(["bash", str(REPO / "operator" / "deploy" / "install-crds.sh")], env=env, check=True, timeout=120)


def test_helm_takes_over_crds_installed_by_up_sh(cluster: ClusterHandle) -> None:
    release, namespace = f"tko{uuid.uuid4().hex[:4]}", f"takeover-{uuid.uuid4().hex[:6]}"
    install = ("install", release, str(OPERATOR_CHART), "--namespace", namespace, "--create-namespace")
    try:
        plain_kubectl_apply(cluster)
        refused = cluster.helm(*install, check=False)
        assert refused.returncode != 0 and "invalid ownership metadata" in refused.stderr, refused.stderr

        install_crds_script(cluster, release, namespace)  # what tests/up.sh runs (through dev-up.sh)
        cluster.helm(*install)  # verbatim: no --take-ownership needed
        manifest = cluster.helm("get", "manifest", release, "--namespace", namespace).stdout
        assert "telechatinferences.telechat.io" in manifest and "telechatfinetunes.telechat.io" in manifest
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout=60s")
        # crds.keep: the CRDs (and every custom resource) stay after the release is gone.
        cluster.kubectl("get", *CRDS)

        # Any other release takes them over with --take-ownership.
        plain_kubectl_apply(cluster)
        cluster.helm(*install, "--take-ownership")
    finally:
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout=60s", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
