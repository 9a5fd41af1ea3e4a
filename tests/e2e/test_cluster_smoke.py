"""Smoke tests of the local control plane: real API server, scheduler and garbage collector, kwok's fake NPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.components import COMPONENTS_BY_NAME
from tests.cluster.controlplane import REPO_ROOT, ClusterHandle, running_on
from tests.cluster.render import FAKE_NODE_ANNOTATION, NPU_RESOURCE
from tests.cluster.waiting import wait_for

MIN_FAKE_NODES = 4


@pytest.fixture(scope="module")
def core(cluster: ClusterHandle) -> client.CoreV1Api:
    return client.CoreV1Api(cluster.api_client())


def npu_pod(name: str, npus: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A pod that asks for `npus` Ascend 910 NPUs (requests and limits), as a training worker would."""
    quantity = str(npus)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "worker",
                    "image": "telechat2:test",
                    "resources": {"requests": {NPU_RESOURCE: quantity}, "limits": {NPU_RESOURCE: quantity}},
                }
            ],
        },
    }


def running_and_ready(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    pod = core.read_namespaced_pod(name, namespace)
    statuses = pod.status.container_statuses or []
    if pod.status.phase == "Running" and statuses and all(status.ready for status in statuses):
        return pod
    return None


def in_phase(core: client.CoreV1Api, namespace: str, name: str, phase: str) -> client.V1Pod | None:
    pod = core.read_namespaced_pod(name, namespace)
    return pod if pod.status.phase == phase else None


def test_version_reports_the_pinned_kubernetes(cluster: ClusterHandle) -> None:
    pinned = COMPONENTS_BY_NAME["kube-apiserver"].version()
    assert client.VersionApi(cluster.api_client()).get_code().git_version == pinned
    assert pinned.startswith("v1.")


def test_fake_ascend_nodes_have_eight_npus(cluster: ClusterHandle) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "--output=json").stdout)["items"]
    key, value = FAKE_NODE_ANNOTATION
    fake = [node for node in nodes if node["metadata"].get("annotations", {}).get(key) == value]
    assert len(fake) >= MIN_FAKE_NODES
    for node in fake:
        assert node["status"]["allocatable"][NPU_RESOURCE] == "8"
        assert node["status"]["capacity"][NPU_RESOURCE] == "8"
        assert node["metadata"]["labels"]["accelerator-type"] == "module-910b-8"
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"


def test_pod_with_eight_npus_runs_then_succeeds(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_pod(namespace, npu_pod("eight", 8))
    pod = wait_for(lambda: running_and_ready(core, namespace, "eight"), "pod `eight` Running and ready")
    assert pod.spec.node_name.startswith("ascend-node-")  # placed by the real scheduler, onto a kwok node
    assert pod.status.pod_ip
    scheduled = [c for c in pod.status.conditions if c.type == "PodScheduled"]
    assert scheduled and scheduled[0].status == "True"

    succeed = {"metadata": {"annotations": {"telechat.io/fake-phase": "Succeeded"}}}
    core.patch_namespaced_pod("eight", namespace, succeed)
    pod = wait_for(lambda: in_phase(core, namespace, "eight", "Succeeded"), "pod `eight` Succeeded")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")


def test_annotated_failure_reports_the_chosen_exit_code(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_pod(namespace, npu_pod("oom", 8))
    wait_for(lambda: running_and_ready(core, namespace, "oom"), "pod `oom` Running and ready")
    annotations = {"telechat.io/fake-phase": "Failed", "telechat.io/fake-exit-code": "137"}
    core.patch_namespaced_pod("oom", namespace, {"metadata": {"annotations": annotations}})
    pod = wait_for(lambda: in_phase(core, namespace, "oom", "Failed"), "pod `oom` Failed")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (137, "Error")


def test_pod_asking_for_nine_npus_is_unschedulable(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_pod(namespace, npu_pod("nine", 9))

    def unschedulable() -> client.V1PodCondition | None:
        pod = core.read_namespaced_pod("nine", namespace)
        conditions = [c for c in pod.status.conditions or [] if c.type == "PodScheduled"]
        return conditions[0] if conditions and conditions[0].status == "False" else None

    condition = wait_for(unschedulable, "pod `nine` marked unschedulable")
    assert condition.reason == "Unschedulable"
    assert NPU_RESOURCE in condition.message
    pod = core.read_namespaced_pod("nine", namespace)
    assert pod.status.phase == "Pending"
    assert not pod.spec.node_name


def test_deleting_an_owner_removes_what_it_owns(core: client.CoreV1Api, namespace: str) -> None:
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {"role": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "owned", "ownerReferences": [reference]}})
    owned_pod = npu_pod("owned-pod", 1)
    owned_pod["metadata"]["ownerReferences"] = [reference]
    core.create_namespaced_pod(namespace, owned_pod)
    wait_for(lambda: running_and_ready(core, namespace, "owned-pod"), "pod `owned-pod` Running")

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def gone() -> bool:
        config_maps = {item.metadata.name for item in core.list_namespaced_config_map(namespace).items}
        pods = {item.metadata.name for item in core.list_namespaced_pod(namespace).items}
        return "owned" not in config_maps and "owned-pod" not in pods

    wait_for(gone, "the garbage collector to delete the owned ConfigMap and pod")


def _cluster_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tests.cluster", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # a second control plane of its own (~5 s)
def test_down_stops_what_up_started_even_without_pids_json(tmp_path: Path) -> None:
    """The reported bug: `down --state-dir DIR` said "stopped 0 process(es)" and left the cluster running."""
    state_dir = tmp_path / "state"
    operator = None
    try:
        up = _cluster_cli("up", "--nodes=1", f"--state-dir={state_dir}")
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={state_dir}/kubeconfig" in up.stdout
        components = {process.name for process in running_on(state_dir)}
        assert components == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
        # As operator/deploy/dev-up.sh does: a background process known only by `operator.pid` beside the kubeconfig.
        operator = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        (state_dir / "operator.pid").write_text(f"{operator.pid}\n")
        (state_dir / "pids.json").unlink()

        down = _cluster_cli("down", f"--state-dir={state_dir}")
        assert down.returncode == 0, down.stderr
        assert "stopped 6 process(es)" in down.stderr
        assert running_on(state_dir) == []
        assert operator.wait(timeout=10) is not None
    finally:
        _cluster_cli("down", f"--state-dir={state_dir}")
        if operator is not None and operator.poll() is None:
            operator.kill()
            operator.wait()
