"""install_operator_chart() against the real API server: the chart's Deployment names the local image with
pullPolicy Never and becomes available, and a Deployment that cannot become available gives an error saying why.

The fake kwok nodes run nothing, so here the pod only has to be scheduled and marked running (the real nodes of
tests/e2e_real run the image itself); the nodeSelector is pointed at the kwok nodes for that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster import images
from tests.cluster.controlplane import ClusterHandle
from tests.cluster.errors import ClusterError

pytestmark = pytest.mark.e2e

REF = images.ImageRef("operator", "localhost/telechat-operator:0123456789ab", "0" * 64, Path("/unused.tar"))
# Namespace scope and no CRDs: nothing cluster-wide that other tests' releases own.
ISOLATED = {"scope": "namespace", "crds": {"enabled": False}}


def test_the_operator_chart_runs_the_local_image(cluster: ClusterHandle, namespace: str) -> None:
    on_kwok = {**ISOLATED, "nodeSelector": {"kubernetes.io/arch": "arm64", "type": "kwok"}}
    installed = images.install_operator_chart(cluster, REF, on_kwok, release="tco-img", namespace=namespace)
    assert installed == images.OperatorRelease("tco-img", namespace, REF.ref)
    deployment = json.loads(
        cluster.kubectl("get", "deployment", "tco-img-telechat-operator", "-n", namespace, "-o", "json").stdout
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == REF.ref
    assert container["imagePullPolicy"] == "Never"
    assert deployment["status"].get("availableReplicas") == 1
    # Idempotent: a second install is an upgrade of the same release.
    images.install_operator_chart(cluster, REF, on_kwok, release="tco-img", namespace=namespace)
    history = cluster.helm("history", "tco-img", "-n", namespace, "-o", "json").stdout
    assert [entry["status"] for entry in json.loads(history)][-1] == "deployed"
    images.uninstall_operator_chart(cluster, installed)
    assert cluster.helm("list", "-n", namespace, "-q").stdout.strip() == ""


def test_a_deployment_that_cannot_start_is_explained(cluster: ClusterHandle, namespace: str) -> None:
    nowhere = {**ISOLATED, "nodeSelector": {"kubernetes.io/arch": "riscv64"}}
    with pytest.raises(ClusterError) as failure:
        images.install_operator_chart(cluster, REF, nowhere, release="tco-nowhere", namespace=namespace, timeout=20)
    message = str(failure.value)
    assert message.startswith("operator chart: `helm install tco-nowhere` with image localhost/telechat-operator")
    assert "Pending" in message, message  # the pods' state
    assert "FailedScheduling" in message, message  # the namespace's events
    images.uninstall_operator_chart(cluster, images.OperatorRelease("tco-nowhere", namespace, REF.ref))
