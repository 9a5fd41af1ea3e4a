"""`helm template` output of both charts accepted by the real apiserver (server-side dry run), and bad values
rejected by the charts' schemas before anything reaches the cluster.

Server-side dry run runs admission for real: the CRDs' OpenAPI and CEL rules, RBAC object validation, the
Deployment, Service, HPA and Ingress schemas of the pinned Kubernetes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cluster.controlplane import ClusterHandle

REPO = Path(__file__).resolve().parents[2]
OPERATOR_CHART = REPO / "charts" / "telechat-operator"
INFERENCE_CHART = REPO / "charts" / "telechat-inference"


def server_dry_run(cluster: ClusterHandle, manifests: str) -> str:
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifests, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def crds_installed(cluster: ClusterHandle) -> None:
    """The inference chart renders a custom resource: its CRD must exist for the apiserver to validate it."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


@pytest.fixture(scope="module")
def chart_crd_folder_installed(cluster: ClusterHandle) -> None:
    """What `helm install` does before rendering: the chart's crds/ folder (kopf's peering CRDs) is applied first."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(OPERATOR_CHART / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")


@pytest.mark.parametrize(
    "values",
    [[], ["-f", str(OPERATOR_CHART / "ci" / "namespace-scope-values.yaml")], ["--set", "peering.enabled=true"]],
    ids=["cluster-scope", "namespace-scope", "peering"],
)
def test_operator_chart_is_accepted_by_the_apiserver(
    cluster: ClusterHandle, namespace: str, chart_crd_folder_installed: None, values: list[str]
) -> None:
    manifests = cluster.helm("template", "tco", str(OPERATOR_CHART), "--namespace", namespace, *values).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(manifests) if doc}
    assert {"ServiceAccount", "Deployment"} <= kinds
    # A Role lives in the watched namespace (telechat-jobs in the ci values): it must exist to be accepted.
    watched = {d["metadata"]["namespace"] for d in yaml.safe_load_all(manifests) if d and d["kind"] == "Role"}
    created = [
        n for n in watched - {namespace} if cluster.kubectl("create", "namespace", n, check=False).returncode == 0
    ]
    try:
        output = server_dry_run(cluster, manifests)
    finally:
        for name in created:
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
    assert "deployment.apps/tco-telechat-operator created (server dry run)" in output


@pytest.mark.parametrize("values", sorted((INFERENCE_CHART / "ci").glob("*.yaml")), ids=lambda p: p.name)
def test_inference_chart_is_accepted_by_the_apiserver(
    cluster: ClusterHandle, namespace: str, crds_installed: None, values: Path
) -> None:
    manifests = cluster.helm("template", "tc7b", str(INFERENCE_CHART), "--namespace", namespace, "-f", str(values))
    output = server_dry_run(cluster, manifests.stdout)
    assert "telechatinference.telechat.io/tc7b created (server dry run)" in output


def test_apiserver_still_rejects_what_the_chart_schema_cannot_see(
    cluster: ClusterHandle, namespace: str, crds_installed: None
) -> None:
    """The chart leaves cross-field rules to the CRD: maxInputTokenLen >= maxSeqLen passes helm, fails admission."""
    manifests = cluster.helm(
        *("template", "tc7b", str(INFERENCE_CHART), "--namespace", namespace),
        *("-f", str(INFERENCE_CHART / "ci" / "minimal-values.yaml")),
        *("--set", "maxSeqLen=1024", "--set", "maxInputTokenLen=2048"),
    ).stdout
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifests, check=False)
    assert result.returncode != 0
    assert "maxInputTokenLen" in result.stderr


def test_install_with_an_unknown_value_is_rejected_before_touching_the_cluster(
    cluster: ClusterHandle, namespace: str, tmp_path: Path
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("model: telechat2-tiny\ncheckpoint:\n  path: /data/tiny\nreplica: 2\n")
    result = cluster.helm(
        "install", "typo", str(INFERENCE_CHART), "--namespace", namespace, "-f", str(values), check=False
    )
    assert result.returncode != 0
    assert "replica" in result.stderr and "additional properties" in result.stderr.lower()
    assert cluster.helm("list", "--namespace", namespace, "-q").stdout.strip() == ""
    assert cluster.kubectl("get", "telechatinferences", "-n", namespace, "-o", "name").stdout.strip() == ""
