"""Both charts `helm install`ed into the local cluster, the operator running from its chart, and GitOps behaviour.

kwok runs no containers, so the chart's operator Deployment cannot do any work here. Instead the operator runs as
a local process with exactly the command line the chart's Deployment carries, authenticated as the chart's
ServiceAccount (a TokenRequest token in a kubeconfig of its own): every API call it makes goes through the
chart's RBAC, so a missing verb fails these tests. It then reconciles a TeleChatInference installed by the
telechat-inference chart to Ready, with its pods Running on the fake Ascend nodes.

GitOps: re-applying the same manifests with server-side apply changes nothing (`kubectl diff --server-side`
exits 0), the operator owns no field under spec (managedFields), and the Argo CD health script reads the live
object as Healthy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from tests.cluster.controlplane import ClusterHandle
from tests.cluster.render import FAKE_NODE_ANNOTATION, free_ports
from tests.cluster.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
OPERATOR_CHART = REPO / "charts" / "telechat-operator"
INFERENCE_CHART = REPO / "charts" / "telechat-inference"
HEALTH_DIR = REPO / "charts" / "argocd-health" / "telechat.io"
# The field manager a GitOps controller would apply with (Argo CD's server-side apply uses this name).
GITOPS_MANAGER = "argocd-controller"
TINY_VALUES = ["--set", "model=telechat2-tiny", "--set", "checkpoint.path=/data/telechat2-tiny"]


def get(cluster: ClusterHandle, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def condition(obj: dict[str, Any], condition_type: str) -> dict[str, Any] | None:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == condition_type), None)


def argo_health(obj: dict[str, Any]) -> str:
    """The Argo CD health script of the object's kind, run on the live object as Argo CD would."""
    runtime = lua51.LuaRuntime()
    runtime.globals().obj = runtime.table_from(json.loads(json.dumps(obj), parse_int=float), recursive=True)
    return runtime.execute((HEALTH_DIR / obj["kind"] / "health.lua").read_text())["status"]


def service_account_kubeconfig(cluster: ClusterHandle, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount with a TokenRequest token, nothing else."""
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server_entry = admin["clusters"][0]["cluster"]
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=2h").stdout.strip()
    cluster_entry = {"server": server_entry["server"]}
    for key in ("certificate-authority-data", "certificate-authority"):
        if key in server_entry:
            value = server_entry[key]
            if key == "certificate-authority":
                value = str((cluster.kubeconfig.parent / value).resolve())
            cluster_entry[key] = value
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster_entry}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "local", "user": account, "namespace": namespace}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class OperatorFromChart:
    namespace: str
    release: str
    service_account: str
    kubeconfig: Path
    process: subprocess.Popen[bytes]
    log: Path
    liveness_url: str

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def chart_container(manifest: str) -> dict[str, Any]:
    deployment = next(doc for doc in yaml.safe_load_all(manifest) if doc and doc["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def local_command(container: dict[str, Any], liveness_port: int, metrics_port: int) -> list[str]:
    """The chart's command line, with the ports moved to free local ones (pods have their own network)."""
    executable = shutil.which(container["command"][0], path=str(Path(sys.executable).parent))
    assert executable, f"{container['command'][0]} is not installed (pip install -e .)"
    args = []
    for arg in container["args"]:
        if arg.startswith("--liveness="):
            arg = f"--liveness=http://127.0.0.1:{liveness_port}/healthz"
        elif arg.startswith("--metrics-port="):
            arg = f"--metrics-port={metrics_port}"
        args.append(arg)
    return [executable, *container["command"][1:], *args]


@pytest.fixture(scope="module")
def operator(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorFromChart]:
    namespace = f"chart-{uuid.uuid4().hex[:6]}"
    release = "tco"
    cluster.kubectl("create", "namespace", namespace)
    # Namespace scope: the Role is what the operator gets. --take-ownership: earlier tests may have applied crds/.
    cluster.helm(
        *("install", release, str(OPERATOR_CHART), "--namespace", namespace, "--take-ownership"),
        *("--set", "scope=namespace", "--set", "operator.logFormat=plain"),
    )
    manifest = cluster.helm("get", "manifest", release, "--namespace", namespace).stdout
    account = next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "ServiceAccount")["metadata"]["name"]
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")

    workdir = tmp_path_factory.mktemp("operator-from-chart")
    kubeconfig = service_account_kubeconfig(cluster, namespace, account, workdir / "kubeconfig")
    liveness_port, metrics_port = free_ports(2)
    command = local_command(chart_container(manifest), liveness_port, metrics_port)
    log = workdir / "operator.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update({"KUBECONFIG": str(kubeconfig), "TELECHAT_OPERATOR_BACKOFF_BASE_SECONDS": "1"})
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    running = OperatorFromChart(
        namespace, release, account, kubeconfig, process, log, f"http://127.0.0.1:{liveness_port}/healthz"
    )
    try:
        wait_for(lambda: liveness_ok(running), "the operator's liveness endpoint", timeout=90)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout=60s", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def liveness_ok(operator: OperatorFromChart) -> bool:
    assert operator.process.poll() is None, f"the operator exited:\n{operator.log_tail()}"
    try:
        with urllib.request.urlopen(operator.liveness_url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def install_inference(cluster: ClusterHandle, operator: OperatorFromChart, release: str, *values: str) -> None:
    cluster.helm("install", release, str(INFERENCE_CHART), "--namespace", operator.namespace, *TINY_VALUES, *values)


def wait_ready(cluster: ClusterHandle, operator: OperatorFromChart, name: str, replicas: int) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        assert operator.process.poll() is None, f"the operator exited:\n{operator.log_tail()}"
        obj = get(cluster, "telechatinference", name, "-n", operator.namespace)
        status = obj.get("status") or {}
        ready_condition = condition(obj, "Ready")
        if (
            ready_condition
            and ready_condition["status"] == "True"
            and ready_condition.get("observedGeneration") == obj["metadata"]["generation"]
            and status.get("readyReplicas") == replicas
        ):
            return obj
        return None

    try:
        return wait_for(ready, f"TeleChatInference {name} Ready with {replicas} replicas", timeout=120)
    except AssertionError as error:
        raise AssertionError(f"{error}\noperator log:\n{operator.log_tail()}") from None


def serving_pods(cluster: ClusterHandle, operator: OperatorFromChart, name: str) -> list[dict[str, Any]]:
    selector = f"telechat.io/inference-name={name}"
    return get(cluster, "pods", "-n", operator.namespace, "-l", selector)["items"]


def fake_ascend_nodes(cluster: ClusterHandle) -> set[str]:
    key, value = FAKE_NODE_ANNOTATION
    nodes = get(cluster, "nodes")["items"]
    return {n["metadata"]["name"] for n in nodes if n["metadata"].get("annotations", {}).get(key) == value}


def test_operator_chart_installs_its_objects_and_says_what_to_do_next(
    cluster: ClusterHandle, operator: OperatorFromChart
) -> None:
    status = cluster.helm("status", operator.release, "--namespace", operator.namespace, "--show-resources").stdout
    assert "STATUS: deployed" in status
    assert "kubectl wait --for=condition=Succeeded" in status, "NOTES.txt tells the user the next step"
    role = get(cluster, "role", f"{operator.release}-telechat-operator", "-n", operator.namespace)
    assert role["rules"]
    crd = get(cluster, "crd", "telechatinferences.telechat.io")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == operator.release


def test_service_account_gets_exactly_the_chart_rbac(cluster: ClusterHandle, operator: OperatorFromChart) -> None:
    subject = f"system:serviceaccount:{operator.namespace}:{operator.service_account}"

    def can(verb: str, resource: str, namespace: str | None = operator.namespace, subresource: str = "") -> bool:
        scope = ["-n", namespace] if namespace else []
        scope += [f"--subresource={subresource}"] if subresource else []
        result = cluster.kubectl("auth", "can-i", verb, resource, f"--as={subject}", *scope, check=False)
        return result.stdout.strip() == "yes"

    assert can("watch", "telechatinferences.telechat.io")
    # The operator writes status only, through the status subresource (the unused patch grant on the resource
    # itself was trimmed, issue 13 item 7; tests/unit/test_operator_rbac.py proves each grant is used).
    assert can("patch", "telechatinferences.telechat.io", namespace=operator.namespace, subresource="status")
    assert not can("patch", "telechatinferences.telechat.io", namespace=operator.namespace)
    assert can("create", "pods")
    assert not can("update", "telechatinferences.telechat.io"), "replacing the resource could rewrite its spec"
    assert not can("get", "secrets"), "the operator never reads Secrets (the API key is a secretKeyRef)"
    assert not can("create", "pods", namespace="default"), "namespace scope grants nothing outside its namespace"
    assert not can("list", "nodes", namespace=None)


@pytest.fixture(scope="module")
def served(cluster: ClusterHandle, operator: OperatorFromChart) -> dict[str, Any]:
    """A tiny-model TeleChatInference installed by its chart and reconciled to Ready by the operator."""
    install_inference(cluster, operator, "tiny")
    return wait_ready(cluster, operator, "tiny", replicas=1)


def test_operator_from_chart_serves_an_inference_on_fake_ascend_nodes(
    cluster: ClusterHandle, operator: OperatorFromChart, served: dict[str, Any]
) -> None:
    assert served["status"]["endpoint"] == f"http://tiny.{operator.namespace}.svc:1025"
    pods = serving_pods(cluster, operator, "tiny")
    assert pods, "no serving pods"
    fake_nodes = fake_ascend_nodes(cluster)
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["nodeName"] in fake_nodes
    service = get(cluster, "service", "tiny", "-n", operator.namespace)
    assert any(port["port"] == 1025 for port in service["spec"]["ports"])
    assert argo_health(served) == "Healthy"


def test_reapplying_the_same_manifests_changes_nothing(
    cluster: ClusterHandle, operator: OperatorFromChart, served: dict[str, Any]
) -> None:
    manifests = cluster.helm(
        "template", "tiny", str(INFERENCE_CHART), "--namespace", operator.namespace, *TINY_VALUES
    ).stdout
    result = cluster.kubectl("diff", "--server-side", "--force-conflicts", "-f", "-", input=manifests, check=False)
    assert result.returncode == 0, f"re-applying the chart's manifests would change:\n{result.stdout}{result.stderr}"


def test_gitops_apply_converges_and_the_operator_never_writes_spec(
    cluster: ClusterHandle, operator: OperatorFromChart
) -> None:
    """As Argo CD does it: render, server-side apply, let the operator reconcile, apply again: no diff."""
    manifests = cluster.helm(
        *("template", "gitops", str(INFERENCE_CHART), "--namespace", operator.namespace, *TINY_VALUES),
        *("--set", "replicas=2"),
    ).stdout
    apply = ("--server-side", f"--field-manager={GITOPS_MANAGER}", "-f", "-")
    cluster.kubectl("apply", *apply, input=manifests)
    live = wait_ready(cluster, operator, "gitops", replicas=2)
    time.sleep(2)  # let any trailing reconcile land before diffing
    diff = cluster.kubectl("diff", *apply, input=manifests, check=False)
    assert diff.returncode == 0, f"the operator changed what GitOps applied:\n{diff.stdout}{diff.stderr}"

    live = get(cluster, "telechatinference", "gitops", "-n", operator.namespace, "--show-managed-fields")
    entries = live["metadata"]["managedFields"]
    spec_owners = {entry["manager"] for entry in entries if "f:spec" in entry.get("fieldsV1", {})}
    assert spec_owners == {GITOPS_MANAGER}, f"spec fields owned by {spec_owners}"
    status_writers = {entry["manager"] for entry in entries if entry.get("subresource") == "status"}
    assert status_writers - {GITOPS_MANAGER}, "the operator wrote no status (the check above would prove nothing)"
    assert live["metadata"]["generation"] == 1, "the spec was never changed after the apply"
    assert argo_health(live) == "Healthy"


def test_scaling_through_the_chart_rolls_to_ready_and_health_follows(
    cluster: ClusterHandle, operator: OperatorFromChart, served: dict[str, Any]
) -> None:
    cluster.helm(
        *("upgrade", "tiny", str(INFERENCE_CHART), "--namespace", operator.namespace, *TINY_VALUES),
        *("--set", "replicas=2"),
    )
    live = get(cluster, "telechatinference", "tiny", "-n", operator.namespace)
    assert live["metadata"]["generation"] == served["metadata"]["generation"] + 1
    ready = wait_ready(cluster, operator, "tiny", replicas=2)
    assert argo_health(ready) == "Healthy"
    assert len([p for p in serving_pods(cluster, operator, "tiny") if p["status"]["phase"] == "Running"]) >= 2


def test_inference_chart_uninstall_removes_the_resource_and_its_children(
    cluster: ClusterHandle, operator: OperatorFromChart
) -> None:
    install_inference(cluster, operator, "gone")
    wait_ready(cluster, operator, "gone", replicas=1)
    cluster.helm("uninstall", "gone", "--namespace", operator.namespace, "--wait", "--timeout=60s")
    wait_for(
        lambda: not cluster.kubectl(
            "get", "telechatinference", "gone", "-n", operator.namespace, check=False
        ).stdout.strip(),
        "the TeleChatInference to be deleted",
    )
    # Children carry owner references: the garbage collector removes them.
    wait_for(lambda: not serving_pods(cluster, operator, "gone"), "the serving pods to be garbage-collected", 60)


def test_chart_hpa_reaches_the_inference_through_its_scale_subresource(
    cluster: ClusterHandle, operator: OperatorFromChart
) -> None:
    """The HPA controller reads the TeleChatInference's scale subresource (spec.replicas, status.selector)."""
    install_inference(
        cluster, operator, "auto", "--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=2"
    )
    inference = get(cluster, "telechatinference", "auto", "-n", operator.namespace)
    assert "replicas" not in inference["spec"] or inference["spec"]["replicas"] == 1, (
        "the chart leaves replicas to the HPA"
    )

    def able_to_scale() -> dict[str, Any] | None:
        hpa = get(cluster, "hpa", "auto", "-n", operator.namespace)
        found = condition(hpa, "AbleToScale")
        return found if found and found["status"] == "True" else None

    found = wait_for(able_to_scale, "the HPA to read the TeleChatInference's scale subresource", timeout=60)
    assert found["reason"] == "SucceededGetScale"
    cluster.helm("uninstall", "auto", "--namespace", operator.namespace, "--wait", "--timeout=60s")
