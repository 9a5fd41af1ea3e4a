"""TeleChatInference end to end: the real operator process against the local cluster (kwok runs the pods).

kwok marks a pod bound to a fake Ascend node Running and Ready without running its container or probes; the real
controller-manager runs Deployments and ReplicaSets and the real scheduler places pods by `huawei.com/Ascend910`.
So everything up to "the server answers" is real: admission, defaulting, the operator's reconcile, rollouts, the
scale subresource, garbage collection. A TeleChatFinetune is driven to Succeeded through the same operator by
annotating its pods (`telechat.io/fake-phase`), never by patching its status.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ClusterHandle
from tests.cluster.waiting import wait_for
from tests.e2e.finetune_harness import OperatorProcess, install, service_account_kubeconfig

NAMESPACE_PREFIX = "tcinf-e2e-"
GITOPS_MANAGER = "gitops"  # the field manager a GitOps tool applies with


class Operator:
    """The operator process of `finetune_harness` (under the RBAC of operator/deploy/rbac.yaml, so a verb the
    inference reconciler uses but the manifest lacks fails these tests)."""

    def __init__(self, process: OperatorProcess) -> None:
        self.process = process

    def alive(self) -> None:
        assert self.process.process is not None
        assert self.process.process.poll() is None, f"the operator exited:\n{self.process.log_tail(60)}"


@pytest.fixture(scope="module")
def operator(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    install(cluster)
    cluster.kubectl("wait", "--for=condition=Established", "crd/telechatinferences.telechat.io", "--timeout=60s")
    workdir = tmp_path_factory.mktemp("inference-operator")
    process = OperatorProcess(service_account_kubeconfig(cluster, workdir / "kubeconfig"), workdir / "operator.log")
    process.start()
    try:
        yield Operator(process)
    finally:
        process.stop()


@pytest.fixture
def ns(cluster: ClusterHandle, operator: Operator) -> Iterator[str]:
    name = f"{NAMESPACE_PREFIX}{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# --- helpers ---------------------------------------------------------------------------------------------------


def inference(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "telechat2-tiny",
        "image": "telechat-runtime:0.1.0",
        "checkpoint": {"path": "/models/telechat2-tiny/telechat2.ckpt"},
        **spec,
    }
    return {"apiVersion": "telechat.io/v1alpha1", "kind": "TeleChatInference", "metadata": {"name": name}, "spec": body}


def apply(cluster: ClusterHandle, ns: str, *objects: dict[str, Any], manager: str = GITOPS_MANAGER) -> None:
    text = yaml.safe_dump_all(objects)
    cluster.kubectl("apply", "--server-side", f"--field-manager={manager}", "-n", ns, "-f", "-", input=text)


def get(cluster: ClusterHandle, ns: str, *what: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *what, "-n", ns, "-o", "json").stdout)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def wait_ready(cluster: ClusterHandle, operator: Operator, ns: str, name: str, replicas: int) -> dict[str, Any]:
    """Ready=True for the object's current generation with `replicas` ready replicas."""

    def ready() -> dict[str, Any] | None:
        operator.alive()
        obj = get(cluster, ns, "telechatinference", name)
        status = obj.get("status") or {}
        cond = condition(obj, "Ready")
        done = (
            cond.get("status") == "True"
            and cond.get("observedGeneration") == obj["metadata"]["generation"]
            and status.get("readyReplicas") == replicas
        )
        return obj if done else None

    return wait_for(ready, f"TeleChatInference {ns}/{name} Ready with {replicas} replica(s)", timeout=60)


def serving_pods(cluster: ClusterHandle, ns: str, name: str) -> list[dict[str, Any]]:
    selector = f"telechat.io/inference-name={name},telechat.io/serving=true"
    return get(cluster, ns, "pods", "-l", selector)["items"]


def events(cluster: ClusterHandle, ns: str, name: str) -> list[str]:
    items = get(cluster, ns, "events", f"--field-selector=involvedObject.name={name}")["items"]
    return [item["reason"] for item in items]


# --- tests -----------------------------------------------------------------------------------------------------


def test_apply_scale_and_roll_a_single_node_inference(cluster: ClusterHandle, operator: Operator, ns: str) -> None:
    apply(cluster, ns, inference("chat"))
    obj = wait_ready(cluster, operator, ns, "chat", replicas=1)
    assert obj["status"]["endpoint"] == f"http://chat.{ns}.svc:1025"
    assert obj["status"]["selector"] == "telechat.io/inference-name=chat,telechat.io/serving=true"
    assert {c["type"]: c["status"] for c in obj["status"]["conditions"]} == {
        "Available": "True",
        "Progressing": "False",
        "Ready": "True",
    }

    deployment = get(cluster, ns, "deployment", "chat")
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "TeleChatInference"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["huawei.com/Ascend910"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    service = get(cluster, ns, "service", "chat")
    assert service["spec"]["selector"] == {"telechat.io/inference-name": "chat", "telechat.io/serving": "true"}
    assert service["spec"]["ports"][0]["port"] == 1025
    config = yaml.safe_load(get(cluster, ns, "configmap", "chat-serving-config")["data"]["predict.yaml"])
    assert config["load_checkpoint"] == "/models/telechat2-tiny/telechat2.ckpt"
    (pod,) = serving_pods(cluster, ns, "chat")
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"].startswith("ascend-node")  # scheduled by NPUs onto a fake Ascend node
    endpoints = get(cluster, ns, "endpoints", "chat")
    assert [a["ip"] for s in endpoints["subsets"] for a in s["addresses"]] == [pod["status"]["podIP"]]

    # `kubectl scale` goes through the scale subresource (what an HPA uses).
    cluster.kubectl("scale", "telechatinference/chat", "--replicas=2", "-n", ns)
    scale = json.loads(
        cluster.kubectl(
            "get", "--raw", f"/apis/telechat.io/v1alpha1/namespaces/{ns}/telechatinferences/chat/scale"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 2
    assert scale["status"]["selector"] == "telechat.io/inference-name=chat,telechat.io/serving=true"
    wait_ready(cluster, operator, ns, "chat", replicas=2)
    assert len(serving_pods(cluster, ns, "chat")) == 2

    # A spec change changes the pod template: the Deployment rolls every replica onto it.
    old_pods = {p["metadata"]["name"] for p in serving_pods(cluster, ns, "chat")}
    cluster.kubectl(
        "patch", "telechatinference", "chat", "-n", ns, "--type=merge",
        "-p", json.dumps({"spec": {"image": "telechat-runtime:0.2.0", "maxSeqLen": 60, "maxInputTokenLen": 40}}),
    )  # fmt: skip
    wait_ready(cluster, operator, ns, "chat", replicas=2)
    pods = wait_for(
        lambda: [p for p in serving_pods(cluster, ns, "chat") if not p["metadata"].get("deletionTimestamp")],
        "the rolled pods",
    )
    assert {p["metadata"]["name"] for p in pods}.isdisjoint(old_pods)
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {"telechat-runtime:0.2.0"}
    command = pods[0]["spec"]["containers"][0]["command"]
    assert command[command.index("--max-seq-len") + 1] == "60"
    assert "Ready" in events(cluster, ns, "chat")

    # Deleting the resource removes everything it owns (the garbage collector runs).
    cluster.kubectl("delete", "telechatinference", "chat", "-n", ns)
    wait_for(
        lambda: cluster.kubectl("get", "deployment,service,configmap", "chat", "chat-serving-config", "-n", ns,
                                "--ignore-not-found", "-o", "name").stdout.strip() == ""
        or None,
        "the children to be garbage-collected",
    )  # fmt: skip


def test_reapplying_changes_nothing_and_the_operator_never_writes_spec(
    cluster: ClusterHandle, operator: Operator, ns: str
) -> None:
    manifest = inference("gitops", replicas=1, service={"type": "NodePort", "annotations": {"team": "nlp"}})
    apply(cluster, ns, manifest)
    before = wait_ready(cluster, operator, ns, "gitops", replicas=1)
    text = yaml.safe_dump(manifest)
    for _ in range(2):
        diff = cluster.kubectl(
            "diff", "--server-side", f"--field-manager={GITOPS_MANAGER}", "-n", ns, "-f", "-", input=text, check=False
        )
        assert diff.returncode == 0, f"re-applying the same manifest would change the object:\n{diff.stdout}"
        dry_run = json.loads(
            cluster.kubectl(
                "apply", "--server-side", "--dry-run=server", f"--field-manager={GITOPS_MANAGER}",
                "-n", ns, "-f", "-", "-o", "json", input=text,
            ).stdout
        )  # fmt: skip
        assert dry_run["metadata"]["generation"] == before["metadata"]["generation"] == 1
        assert dry_run["spec"] == before["spec"]
    live = get(cluster, ns, "telechatinference", "gitops", "--show-managed-fields")
    assert live["metadata"]["generation"] == 1  # the operator's status writes never touched spec
    spec_managers = {
        entry["manager"]
        for entry in live["metadata"]["managedFields"]
        if "f:spec" in (entry.get("fieldsV1") or {}) and entry.get("subresource") != "status"
    }
    assert spec_managers == {GITOPS_MANAGER}
    status_managers = {e["manager"] for e in live["metadata"]["managedFields"] if e.get("subresource") == "status"}
    assert status_managers, "the operator writes status through the status subresource"
    assert get(cluster, ns, "service", "gitops")["metadata"]["annotations"]["team"] == "nlp"


def finetune(name: str) -> dict[str, Any]:
    """A one-node telechat2-tiny job whose output lives on a hostPath volume (kwok runs nothing)."""
    return {
        "apiVersion": "telechat.io/v1alpha1",
        "kind": "TeleChatFinetune",
        "metadata": {"name": name},
        "spec": {
            "model": "telechat2-tiny",
            "image": "telechat-runtime:0.1.0",
            "nodes": 1,
            "devicesPerNode": 1,
            "parallel": {"dataParallel": 1, "modelParallel": 1, "pipelineStage": 1, "microBatchNum": 1},
            "dataset": {"path": "/mnt/telechat/data/sample.mindrecord"},
            "output": {"path": f"/mnt/telechat/output/{name}"},
            "volumes": [{"name": "shared", "hostPath": {"path": "/mnt/telechat", "type": "DirectoryOrCreate"}}],
            "volumeMounts": [{"name": "shared", "mountPath": "/mnt/telechat"}],
        },
    }


def running_pods(cluster: ClusterHandle, ns: str, selector: str, count: int) -> list[str]:
    """Wait until exactly `count` pods match and run; their names."""

    def running() -> list[str] | None:
        items = get(cluster, ns, "pods", "-l", selector)["items"]
        names = [p["metadata"]["name"] for p in items if p["status"].get("phase") == "Running"]
        return names if len(names) == count else None

    return wait_for(running, f"{count} running pod(s) {selector}")


def succeed(cluster: ClusterHandle, ns: str, names: list[str]) -> None:
    """kwok moves annotated pods to Succeeded (exit code 0)."""
    cluster.kubectl("annotate", "pod", *names, "-n", ns, "telechat.io/fake-phase=Succeeded")


def test_from_finetune_waits_then_serves_the_merged_checkpoint(
    cluster: ClusterHandle, operator: Operator, ns: str
) -> None:
    apply(cluster, ns, inference("served", checkpoint={"fromFinetune": "ft"}))
    waiting = wait_for(
        lambda: (obj := get(cluster, ns, "telechatinference", "served"))
        and condition(obj, "Progressing").get("reason") == "WaitingForFinetune"
        and obj,
        "Progressing/WaitingForFinetune before the finetune exists",
    )
    assert condition(waiting, "Ready")["status"] == "False"

    apply(cluster, ns, finetune("ft"))
    succeed(cluster, ns, running_pods(cluster, ns, "telechat.io/job-name=ft,telechat.io/role=worker", 1))
    merge_pod = running_pods(cluster, ns, "telechat.io/job-name=ft,telechat.io/role=merge", 1)
    # Training done but the checkpoint not merged yet: still waiting, still no serving pod.
    obj = get(cluster, ns, "telechatinference", "served")
    assert condition(obj, "Progressing")["reason"] == "WaitingForFinetune"
    assert get(cluster, ns, "pods", "-l", "telechat.io/inference-name=served")["items"] == []
    succeed(cluster, ns, merge_pod)

    def succeeded() -> dict[str, Any] | None:
        job = get(cluster, ns, "telechatfinetune", "ft")
        return job if condition(job, "Succeeded").get("status") == "True" else None

    done = wait_for(succeeded, "the TeleChatFinetune to succeed")
    checkpoint = done["status"]["checkpoint"]
    served = wait_ready(cluster, operator, ns, "served", replicas=1)
    assert served["status"]["checkpoint"] == checkpoint
    template = get(cluster, ns, "deployment", "served")["spec"]["template"]
    command = template["spec"]["containers"][0]["command"]
    assert command[command.index("--load_checkpoint") + 1] == checkpoint
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["telechat-finetune-output"]["hostPath"]["path"] == "/mnt/telechat"
    mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["telechat-finetune-output"] == {
        "name": "telechat-finetune-output",
        "mountPath": "/mnt/telechat",
        "readOnly": True,
    }
    assert template["metadata"]["annotations"]["telechat.io/from-finetune"] == "ft"
    assert "WaitingForFinetune" in events(cluster, ns, "served")


def test_no_pods_while_waiting_for_a_finetune(cluster: ClusterHandle, operator: Operator, ns: str) -> None:
    apply(cluster, ns, finetune("slow"), inference("later", checkpoint={"fromFinetune": "slow"}))
    wait_for(
        lambda: condition(get(cluster, ns, "telechatinference", "later"), "Progressing").get("reason")
        == "WaitingForFinetune",
        "WaitingForFinetune",
    )
    wait_for(lambda: get(cluster, ns, "pods", "-l", "telechat.io/job-name=slow")["items"], "the finetune's rank pod")
    assert get(cluster, ns, "pods", "-l", "telechat.io/inference-name=later")["items"] == []
    assert cluster.kubectl("get", "deployment", "later", "-n", ns, "--ignore-not-found", "-o", "name").stdout == ""


def test_multi_node_group_is_recreated_whole_when_one_pod_fails(
    cluster: ClusterHandle, operator: Operator, ns: str
) -> None:
    apply(cluster, ns, inference("big", model="telechat2-7b", devicesPerReplica=8, nodesPerReplica=2))
    wait_ready(cluster, operator, ns, "big", replicas=1)
    pods = {p["metadata"]["name"]: p for p in get(cluster, ns, "pods", "-l", "telechat.io/inference-name=big")["items"]}
    assert set(pods) == {"big-g0-0", "big-g0-1"}
    assert len({p["spec"]["nodeName"] for p in pods.values()}) == 2  # 8 NPUs each: one node per pod
    leader, worker = pods["big-g0-0"], pods["big-g0-1"]
    assert leader["metadata"]["labels"]["telechat.io/serving"] == "true"
    assert "telechat.io/serving" not in worker["metadata"]["labels"]
    command = worker["spec"]["containers"][0]["command"]
    assert command[:2] == ["telechat2", "launch"]
    assert command[command.index("--master_addr") + 1] == f"big-g0-0.big-g0.{ns}.svc"
    assert command[command.index("--node_rank") + 1] == "1"
    assert get(cluster, ns, "service", "big-g0")["spec"]["clusterIP"] == "None"
    assert cluster.kubectl("get", "deployment", "big", "-n", ns, "--ignore-not-found", "-o", "name").stdout == ""
    uids = {name: p["metadata"]["uid"] for name, p in pods.items()}

    cluster.kubectl("annotate", "pod", "big-g0-1", "-n", ns, "telechat.io/fake-phase=Failed")

    def recreated() -> dict[str, Any] | None:
        operator.alive()
        live = get(cluster, ns, "pods", "-l", "telechat.io/inference-name=big")["items"]
        fresh = {p["metadata"]["name"]: p["metadata"]["uid"] for p in live if p["status"].get("phase") == "Running"}
        return fresh if set(fresh) == set(uids) and not set(fresh.values()) & set(uids.values()) else None

    wait_for(recreated, "both pods of the group recreated with new UIDs", timeout=60)
    obj = wait_ready(cluster, operator, ns, "big", replicas=1)
    assert obj["status"]["groupRestarts"] == 1
    assert "GroupRecreated" in events(cluster, ns, "big")

    # Back to one node per replica: the groups and their Services go, a Deployment takes over.
    cluster.kubectl(
        "patch", "telechatinference", "big", "-n", ns, "--type=merge",
        "-p", json.dumps({"spec": {"nodesPerReplica": 1, "devicesPerReplica": 1}}),
    )  # fmt: skip
    wait_ready(cluster, operator, ns, "big", replicas=1)
    wait_for(
        lambda: not get(cluster, ns, "pods,services", "-l", "telechat.io/inference-name=big,telechat.io/group-index")[
            "items"
        ],
        "the group pods and Services to go",
    )
    assert get(cluster, ns, "deployment", "big")["status"]["readyReplicas"] == 1


def test_operator_killed_mid_rollout_resumes_without_duplicates(
    cluster: ClusterHandle, operator: Operator, ns: str
) -> None:
    apply(
        cluster,
        ns,
        inference("solo", replicas=2),
        inference("pair", devicesPerReplica=1, nodesPerReplica=2),
    )
    wait_for(lambda: get(cluster, ns, "pods", "-l", "telechat.io/inference-name")["items"], "the first pods")
    operator.process.kill()  # SIGKILL in the middle of creating children
    cluster.kubectl("scale", "telechatinference/solo", "--replicas=1", "-n", ns)  # changed while nobody watched
    operator.process.start()
    wait_ready(cluster, operator, ns, "solo", replicas=1)
    wait_ready(cluster, operator, ns, "pair", replicas=1)
    pods = get(cluster, ns, "pods", "-l", "telechat.io/inference-name=pair")["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == ["pair-g0-0", "pair-g0-1"]
    assert len(get(cluster, ns, "deployments", "-l", "telechat.io/inference-name=solo")["items"]) == 1
    assert len(get(cluster, ns, "services", "-l", "telechat.io/inference-name=pair")["items"]) == 2  # main + group


# --- issue 10/13: refusals, model checks, strict fields ---------------------------------------------------------


def refusal_count(obj: dict[str, Any]) -> int:
    """N from the condition's "(refused N time(s) in a row; ...)", 0 without one."""
    message = condition(obj, "Ready").get("message") or ""
    marker = "(refused "
    return int(message.split(marker)[1].split(" ")[0]) if marker in message else 0


def test_a_finetune_of_another_model_size_is_refused_not_served(
    cluster: ClusterHandle, operator: Operator, ns: str
) -> None:
    wrong = inference("wrong", model="telechat2-7b", checkpoint={"fromFinetune": "tiny-ft"})
    apply(cluster, ns, finetune("tiny-ft"), wrong)

    def mismatch() -> dict[str, Any] | None:
        operator.alive()
        obj = get(cluster, ns, "telechatinference", "wrong")
        return obj if condition(obj, "Ready").get("reason") == "ModelMismatch" else None

    obj = wait_for(mismatch, "Ready False / ModelMismatch", timeout=30)
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and "telechat2-tiny" in ready["message"] and "telechat2-7b" in ready["message"]
    assert condition(obj, "Progressing")["status"] == "False"  # nothing will change without a spec change
    assert get(cluster, ns, "pods", "-l", "telechat.io/inference-name=wrong")["items"] == []
    assert "ModelMismatch" in events(cluster, ns, "wrong")


def test_a_missing_priority_class_is_a_condition_naming_it_for_deployments(
    cluster: ClusterHandle, operator: Operator, ns: str
) -> None:
    """Single-node replicas: the Deployment is accepted, its ReplicaSet's pods are refused by admission."""
    apply(cluster, ns, inference("prio", priorityClassName="missing-class"))

    def refused() -> dict[str, Any] | None:
        operator.alive()
        obj = get(cluster, ns, "telechatinference", "prio")
        return obj if condition(obj, "Progressing").get("reason") == "ReplicaFailure" else None

    obj = wait_for(refused, "Progressing/ReplicaFailure naming the PriorityClass", timeout=60)
    message = condition(obj, "Progressing")["message"]
    assert "PriorityClass" in message and "missing-class" in message and "Deployment prio" in message
    assert condition(obj, "Ready")["status"] == "False"


def test_refused_group_pods_are_a_condition_with_backoff_until_the_priority_class_exists(
    cluster: ClusterHandle, operator: Operator, ns: str
) -> None:
    """Multi-node groups: the operator's own pod creates are refused (403); it says so and retries with backoff."""
    priority_class = f"tcinf-{uuid.uuid4().hex[:6]}"
    group = inference("prio-group", devicesPerReplica=1, nodesPerReplica=2, priorityClassName=priority_class)
    apply(cluster, ns, group)
    seen: dict[int, float] = {}

    def refused(at_least: int) -> Any:
        def probe() -> dict[str, Any] | None:
            operator.alive()
            obj = get(cluster, ns, "telechatinference", "prio-group")
            count = refusal_count(obj)
            seen.setdefault(count, time.monotonic())
            return obj if count >= at_least else None

        return probe

    obj = wait_for(refused(1), "Ready False / RequestRefused", timeout=30)
    ready = condition(obj, "Ready")
    assert ready["reason"] == "RequestRefused" and condition(obj, "Progressing")["status"] == "True"
    assert f"create Pod {ns}/prio-group-g0-" in ready["message"] and priority_class in ready["message"]
    assert "HTTP 403" in ready["message"]
    wait_for(refused(3), "two more refused attempts", timeout=60)
    first, third = seen[min(seen)], seen[min(c for c in seen if c >= 3)]
    # The harness's backoff is 0.5 s doubling (capped at 2 s): attempts 2 and 3 wait >= 0.5 + 1 s after the first.
    assert third - first >= 1.0, seen

    cluster.kubectl("create", "priorityclass", priority_class, "--value=1000")
    try:
        obj = wait_ready(cluster, operator, ns, "prio-group", replicas=1)
        assert "RequestRefused" not in json.dumps(obj["status"]["conditions"])
    finally:
        cluster.kubectl("delete", "priorityclass", priority_class, "--wait=false", check=False)


def test_a_typo_in_a_pod_field_is_an_invalid_spec_naming_it(
    cluster: ClusterHandle, operator: Operator, ns: str
) -> None:
    """affinity is passed through to the pods as written: strict field validation refuses the unknown field."""
    apply(cluster, ns, inference("typo", affinity={"nodeAfinity": {}}))

    def invalid() -> dict[str, Any] | None:
        operator.alive()
        obj = get(cluster, ns, "telechatinference", "typo")
        return obj if "nodeAfinity" in (condition(obj, "Ready").get("message") or "") else None

    obj = wait_for(invalid, "Ready False naming the unknown field", timeout=30)
    assert condition(obj, "Ready")["reason"] == "InvalidSpec"
    assert cluster.kubectl("get", "deployment", "typo", "-n", ns, "--ignore-not-found", "-o", "name").stdout == ""


def test_a_failing_group_is_recreated_with_growing_backoff(cluster: ClusterHandle, operator: Operator, ns: str) -> None:
    apply(cluster, ns, inference("flaky", devicesPerReplica=1, nodesPerReplica=2))
    wait_ready(cluster, operator, ns, "flaky", replicas=1)
    failures: list[dict[str, Any]] = []
    for expected in (1, 2, 3):
        running_pods(cluster, ns, "telechat.io/inference-name=flaky", 2)
        cluster.kubectl("annotate", "pod", "flaky-g0-1", "-n", ns, "telechat.io/fake-phase=Failed", "--overwrite")

        def backing_off(expected: int = expected) -> dict[str, Any] | None:
            operator.alive()
            obj = get(cluster, ns, "telechatinference", "flaky")
            entries = (obj.get("status") or {}).get("groupBackoff") or []
            return entries[0] if entries and entries[0]["failures"] == expected else None

        failures.append(wait_for(backing_off, f"group 0 failure {expected} recorded", timeout=60))
    # Each wait doubles (the harness's base is 0.5 s, capped at 2 s), and from the second failure on the group is
    # reported as crash-looping.
    waits = [
        datetime.strptime(f["nextAttemptTime"], "%Y-%m-%dT%H:%M:%SZ") for f in failures
    ]  # whole seconds: only the order is checked
    assert waits == sorted(waits)
    assert "CrashLoopBackOff" in events(cluster, ns, "flaky")
    obj = get(cluster, ns, "telechatinference", "flaky")
    assert obj["status"]["groupRestarts"] >= 3
    # Recreated after the backoff, the group serves again; its failures are forgotten only once it stayed up
    # TELECHAT_OPERATOR_GROUP_STABLE_SECONDS (600 s by default, unit-tested).
    obj = wait_ready(cluster, operator, ns, "flaky", replicas=1)
    assert obj["status"]["groupBackoff"][0]["failures"] == 3
