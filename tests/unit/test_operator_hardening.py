"""Issue 13 (items 2, 3, 7) and issue 10 (item 3): what the operator refuses before a pod exists, what it tells the
user when the apiserver refuses a request, and how it backs off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from operator_factories import job_body, make_spec
from telechat_operator import k8s
from telechat_operator.common import constants as c
from telechat_operator.common.conditions import Backoff
from telechat_operator.common.refusals import RefusalTracker, clear_refused, mark_refused, refusal_message
from telechat_operator.common.settings import OperatorConfig
from telechat_operator.common.spec import SpecError, check_host_paths, check_volume_mounts, cpu_resources
from telechat_operator.finetune.pods import build_merge_pod, build_rank_pod
from telechat_operator.inference import constants as ic
from telechat_operator.inference.builders import build_deployment
from telechat_operator.inference.groups import (
    GroupPlan,
    GroupPod,
    plan_groups,
    read_group_backoff,
    update_group_backoff,
)
from telechat_operator.inference.status import compute_status, deployment_view, refused_status

from tests.unit.inference_fixtures import inference_spec, path_checkpoint

NOW = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


# --- reserved mount paths: prefixes, both kinds --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/etc/telechat", "/etc/telechat/", "/etc/telechat/extra", "/dev/shm/x", "/usr/local/Ascend/driver/lib64"],
)
def test_a_mount_at_or_under_an_operator_path_is_refused_for_both_kinds(path: str) -> None:
    mounts = [{"name": "data", "mountPath": "/data"}, {"name": "data", "mountPath": path}]
    volumes = [{"name": "data", "emptyDir": {}}]
    with pytest.raises(SpecError) as finetune_error:
        make_spec(volumes=volumes, volumeMounts=mounts)
    with pytest.raises(SpecError) as inference_error:
        inference_spec(volumes=volumes, volumeMounts=mounts)
    for error in (finetune_error.value, inference_error.value):
        assert error.field == "spec.volumeMounts[1].mountPath"
        assert path in error.message and "the operator mounts" in error.message


@pytest.mark.parametrize("path", ["/etc/telechatx", "/etc", "/dev/shmem", "/usr/local/Ascend"])
def test_a_mount_that_merely_shares_a_prefix_string_is_fine(path: str) -> None:
    check_volume_mounts([{"name": "v", "mountPath": path}])


def test_a_path_mounted_twice_is_refused_naming_both_entries() -> None:
    """The apiserver refuses such a pod (and a Deployment apply answers 500): say so at parse time."""
    volumes = [{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}]
    mounts = [{"name": "a", "mountPath": "/models"}, {"name": "b", "mountPath": "/models/"}]
    with pytest.raises(SpecError) as error:
        make_spec(volumes=volumes, volumeMounts=mounts)
    assert error.value.field == "spec.volumeMounts[1].mountPath" and "spec.volumeMounts[0]" in error.value.message


def test_crd_mount_path_rules_match_prefixes_in_both_crds() -> None:
    import yaml

    for crd in ("telechat.io_telechatfinetunes.yaml", "telechat.io_telechatinferences.yaml"):
        schema = yaml.safe_load((REPO / "crds" / crd).read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        (rule,) = schema["properties"]["spec"]["properties"]["volumeMounts"]["x-kubernetes-validations"]
        assert "startsWith(p + '/')" in rule["rule"], crd
        for path in c.RESERVED_MOUNT_PATHS:
            assert f"'{path}'" in rule["rule"], (crd, path)


# --- reserved env --------------------------------------------------------------------------------------------------


def test_resolve_timeout_is_reserved_like_the_other_launch_variables() -> None:
    env = [{"name": "TELECHAT_RESOLVE_TIMEOUT", "value": "5"}]
    with pytest.raises(SpecError, match="TELECHAT_RESOLVE_TIMEOUT is reserved"):
        make_spec(env=env)
    with pytest.raises(SpecError, match="TELECHAT_RESOLVE_TIMEOUT is reserved"):
        inference_spec(env=env)


# --- merge.resources ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"limits": {c.ASCEND_RESOURCE: 1}}, "spec.merge.resources.limits"),
        ({"requests": {"cpu": "two"}}, "spec.merge.resources.requests.cpu"),
        ({"limts": {"cpu": "2"}}, "spec.merge.resources.limts"),
        ({"requests": ["cpu"]}, "spec.merge.resources.requests"),
        ("4 cpus", "spec.merge.resources"),
    ],
)
def test_merge_resources_are_validated(resources: Any, field: str) -> None:
    with pytest.raises(SpecError) as error:
        make_spec(merge={"resources": resources})
    assert error.value.field == field


def test_the_merge_pod_gets_its_own_cpu_resources_and_never_an_npu() -> None:
    spec = make_spec(
        resources={"requests": {"cpu": "8", "memory": "64Gi"}},
        merge={"resources": {"requests": {"cpu": 2, "memory": "16Gi"}, "limits": {"memory": "32Gi"}}},
    )
    (container,) = build_merge_pod(spec, 1)["spec"]["containers"]
    assert container["resources"] == {"requests": {"cpu": 2, "memory": "16Gi"}, "limits": {"memory": "32Gi"}}
    assert c.ASCEND_RESOURCE not in json.dumps(build_merge_pod(make_spec(), 1))
    assert cpu_resources(None, "f") == {}


# --- hostPath policy -----------------------------------------------------------------------------------------------


def test_host_paths_are_refused_unless_the_operator_allows_them() -> None:
    volumes = [{"name": "ok", "emptyDir": {}}, {"name": "host", "hostPath": {"path": "/mnt/telechat/data"}}]
    with pytest.raises(SpecError) as error:
        check_host_paths(volumes, ())
    assert error.value.field == "spec.volumes[1].hostPath.path"
    assert "TELECHAT_OPERATOR_ALLOWED_HOSTPATHS" in error.value.message
    check_host_paths(volumes, ("/mnt/telechat",))
    check_host_paths(volumes, ("/",))
    with pytest.raises(SpecError):
        check_host_paths(volumes, ("/mnt/tele",))  # a prefix of the string, not of the path
    with pytest.raises(SpecError):
        check_host_paths([{"name": "up", "hostPath": {"path": "/mnt/telechat/../../etc"}}], ("/mnt/telechat",))


def test_allowed_host_paths_come_from_the_environment() -> None:
    assert OperatorConfig.from_env({}).allowed_host_paths == ()
    config = OperatorConfig.from_env({"TELECHAT_OPERATOR_ALLOWED_HOSTPATHS": "/mnt/telechat, /data/"})
    assert config.allowed_host_paths == ("/mnt/telechat", "/data")
    with pytest.raises(ValueError, match="TELECHAT_OPERATOR_ALLOWED_HOSTPATHS"):
        OperatorConfig.from_env({"TELECHAT_OPERATOR_ALLOWED_HOSTPATHS": "relative/path"})


def test_the_finetune_handler_reports_a_disallowed_host_path_as_invalid_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    from telechat_operator.finetune import handlers as finetune

    body = job_body(volumes=[{"name": "host", "hostPath": {"path": "/var/lib"}}])
    _, plan = finetune.controller.decide(body, {}, [])
    assert plan.status["state"] == c.STATE_FAILED
    failed = next(cond for cond in plan.status["conditions"] if cond["type"] == c.COND_FAILED)
    assert failed["reason"] == c.REASON_INVALID_SPEC and "spec.volumes[0].hostPath.path" in failed["message"]
    monkeypatch.setattr(finetune.controller, "config", OperatorConfig(allowed_host_paths=("/var/lib",)))
    assert finetune.controller.decide(body, {}, [])[0] is not None


# --- pod security ----------------------------------------------------------------------------------------------


def _security(pod_spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return pod_spec["securityContext"], [container["securityContext"] for container in pod_spec["containers"]]


def test_rank_merge_and_serving_pods_drop_capabilities_and_use_runtime_default_seccomp() -> None:
    spec = make_spec()
    pod_specs = [
        build_rank_pod(spec, 0, 1)["spec"],
        build_merge_pod(spec, 1)["spec"],
        build_deployment(inference_spec(), path_checkpoint(), "h")["spec"]["template"]["spec"],
    ]
    for pod_spec in pod_specs:
        pod_context, containers = _security(pod_spec)
        assert pod_context == {"seccompProfile": {"type": "RuntimeDefault"}}
        for context in containers:
            assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert "runAsUser" not in context  # the image's user: root for the Ascend driver (documented)


# --- strict field validation and named refusals -------------------------------------------------------------------


class FakeRest:
    """Records the requests k8s.py sends and answers them like the apiserver would."""

    def __init__(self, status: int = 201, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.body = body or {}
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, url: str, **_: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        self.calls.append((method, url))
        if self.status >= 400:
            error = ApiException(status=self.status)
            error.body = json.dumps(self.body)
            raise error
        return type("Response", (), {"data": json.dumps(self.body).encode()})()


class FakeClient:
    def __init__(self, rest: FakeRest) -> None:
        self.rest_client = rest
        self.configuration = type("Configuration", (), {"host": "https://api"})()

    def update_params_for_auth(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRest]:
    rest = FakeRest()
    monkeypatch.setattr(k8s, "api_client", lambda: FakeClient(rest))
    yield rest


def test_creates_and_applies_ask_for_strict_field_validation(fake_api: FakeRest) -> None:
    pod = build_rank_pod(make_spec(), 0, 1)
    k8s.create(pod)
    k8s.apply(build_deployment(inference_spec(), path_checkpoint(), "h"))
    assert [method for method, _ in fake_api.calls] == ["POST", "PATCH"]
    assert all("fieldValidation=Strict" in url for _, url in fake_api.calls)


def test_a_refused_write_names_the_object(fake_api: FakeRest) -> None:
    message = 'pods "ft-a1-rank-0" is forbidden: no PriorityClass with name missing was found'
    fake_api.status, fake_api.body = 403, {"message": message}
    pod = build_rank_pod(make_spec(), 0, 1)
    with pytest.raises(k8s.ApiError) as error:
        k8s.create(pod)
    described = error.value.describe()
    assert described.startswith("create Pod ns/ft-a1-rank-0 refused (HTTP 403): ")
    assert "no PriorityClass with name missing" in described


# --- refusals: conditions and backoff --------------------------------------------------------------------------------


def test_refusal_tracker_backs_off_exponentially_and_resets_on_success() -> None:
    tracker, backoff = RefusalTracker(), Backoff(1.0, 8.0)
    assert [tracker.refused("k", backoff) for _ in range(5)] == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0)]
    tracker.succeeded("k")
    assert tracker.refused("k", backoff) == (1, 1.0)


def test_a_finetune_refusal_raises_a_condition_and_one_event_then_clears() -> None:
    status: dict[str, Any] = {"state": "Pending"}
    first = mark_refused(status, refusal_message("create Pod ns/x refused (HTTP 403): no", 1, 1.0), NOW, 2)
    again = mark_refused(status, refusal_message("create Pod ns/x refused (HTTP 403): no", 2, 2.0), NOW, 2)
    assert first is not None and first.type == "Warning" and again is None
    (cond,) = status["conditions"]
    assert (cond["type"], cond["status"], cond["observedGeneration"]) == ("RequestRefused", "True", 2)
    assert "refused 2 time(s) in a row; retrying in 2s" in cond["message"] == status["message"]
    clear_refused(status, NOW, 2)
    assert status["conditions"][0]["status"] == "False"


def test_an_inference_refusal_keeps_what_serves_and_says_why() -> None:
    old = compute_status({}, generation=1, now=NOW, selector="s", workload=_serving(1))
    new = refused_status(old, generation=2, now=NOW, selector="s", message="create Pod ns/x refused (HTTP 403): no")
    conds = {cond["type"]: (cond["status"], cond["reason"]) for cond in new["conditions"]}
    assert conds["Available"] == ("True", ic.REASON_MIN_AVAILABLE)
    assert conds["Progressing"] == ("True", "RequestRefused") and conds["Ready"] == ("False", "RequestRefused")
    assert new["readyReplicas"] == 1 and all(cond["observedGeneration"] == 2 for cond in new["conditions"])
    fresh = refused_status({}, generation=1, now=NOW, selector="s", message="m")
    assert {cond["type"] for cond in fresh["conditions"]} == {"Available", "Progressing", "Ready"}


def _serving(ready: int) -> Any:
    from telechat_operator.inference.status import WorkloadView

    return WorkloadView(desired=1, replicas=1, ready=ready, updated=1)


def test_a_deployment_that_cannot_create_pods_says_so() -> None:
    deployment = {
        "metadata": {"name": "tc7b", "generation": 1},
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "ReplicaFailure",
                    "status": "True",
                    "reason": "FailedCreate",
                    "message": 'pods "tc7b-x" is forbidden: no PriorityClass with name missing was found',
                }
            ],
        },
    }
    status = compute_status({}, generation=1, now=NOW, selector="s", workload=deployment_view(deployment, 1))
    progressing = next(cond for cond in status["conditions"] if cond["type"] == "Progressing")
    assert progressing["reason"] == ic.REASON_REPLICA_FAILURE
    assert "Deployment tc7b cannot create pods (FailedCreate)" in progressing["message"]
    assert "PriorityClass with name missing" in progressing["message"]


class FakeInferenceApi:
    """Just enough of k8s.py for one TeleChatInference pass: the body, and a refusal on the Deployment apply."""

    def __init__(self, body: dict[str, Any], refusal: k8s.ApiError | None) -> None:
        self.body = body
        self.refusal = refusal
        self.status_patches: list[dict[str, Any]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(k8s, "get_inference", lambda namespace, name: self.body)
        monkeypatch.setattr(k8s, "get_child", lambda kind, namespace, name: None)
        monkeypatch.setattr(k8s, "list_children", lambda kind, namespace, selector: [])
        monkeypatch.setattr(k8s, "apply", self.apply)
        monkeypatch.setattr(k8s, "patch_inference_status", self.patch_status)
        monkeypatch.setattr(k8s, "post_event", lambda *args: None)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["kind"] == "Deployment" and self.refusal is not None:
            raise self.refusal
        return body

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.status_patches.append(patch)
        status = dict(self.body.get("status") or {})
        status.update(patch)
        self.body["status"] = {k: v for k, v in status.items() if v is not None}


def test_an_inference_pass_refused_by_the_apiserver_writes_a_condition_and_backs_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from telechat_operator.inference import handlers as inference

    from tests.unit.inference_fixtures import inference_body

    body = inference_body(priorityClassName="missing")
    refusal = k8s.ApiError(500, "etcdserver: request timed out", target="apply Deployment serving/tc7b")
    api = FakeInferenceApi(body, refusal)
    api.install(monkeypatch)
    monkeypatch.setattr(inference.controller, "config", OperatorConfig(backoff_base_seconds=1, backoff_max_seconds=4))
    inference.controller.refusals.succeeded(("serving", "tc7b"))
    delays = [inference.controller.reconcile(("serving", "tc7b")) for _ in range(4)]
    assert delays == [1, 2, 4, 4]  # exponential, capped; not the work queue's error retry
    ready = next(cond for cond in body["status"]["conditions"] if cond["type"] == "Ready")
    assert ready["reason"] == "RequestRefused"
    assert "apply Deployment serving/tc7b refused (HTTP 500)" in ready["message"]
    assert "refused 4 time(s) in a row" in ready["message"]
    # Its own status write's echo starts no pass (a pass would cut the backoff short) ...
    assert inference.controller.is_own_echo(("serving", "tc7b"), body)
    # ... and once the apiserver accepts the request, the condition goes and the backoff starts over.
    api.refusal = None
    assert inference.controller.reconcile(("serving", "tc7b")) == inference.controller.config.resync_seconds
    assert inference.controller.refusals.count(("serving", "tc7b")) == 0
    ready = next(cond for cond in body["status"]["conditions"] if cond["type"] == "Ready")
    assert ready["reason"] != "RequestRefused"


def test_an_unknown_field_refused_under_strict_validation_is_an_invalid_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    from telechat_operator.inference import handlers as inference

    from tests.unit.inference_fixtures import inference_body

    body = inference_body(affinity={"nodeAfinity": {}})
    refusal = k8s.ApiError(
        500,  # what the apiserver answers a server-side apply with an unknown field (seen in the e2e tests)
        "failed to create typed patch object (serving/tc7b; apps/v1, Kind=Deployment):"
        " .spec.template.spec.affinity.nodeAfinity: field not declared in schema",
        target="apply Deployment serving/tc7b",
    )
    FakeInferenceApi(body, refusal).install(monkeypatch)
    inference.controller.reconcile(("serving", "tc7b"))
    ready = next(cond for cond in body["status"]["conditions"] if cond["type"] == "Ready")
    assert ready["reason"] == ic.REASON_INVALID_SPEC and "affinity.nodeAfinity" in ready["message"]


def test_a_finetune_create_refused_by_admission_is_a_condition_with_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from telechat_operator.finetune import handlers as finetune

    job = job_body(priorityClassName="missing")
    patches: list[dict[str, Any]] = []

    def create(body: dict[str, Any]) -> bool:
        if body["kind"] == "Pod":
            name = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
            raise k8s.ApiError(403, "no PriorityClass with name missing was found", target=f"create Pod {name}")
        return True

    def patch_status(namespace: str, name: str, patch: dict[str, Any], expected_version: str | None = None) -> str:
        patches.append(patch)
        job["status"] = {**(job.get("status") or {}), **patch}
        return "2"

    monkeypatch.setattr(k8s, "get_finetune", lambda namespace, name: job)
    monkeypatch.setattr(k8s, "list_pods", lambda *args, **kwargs: [])
    monkeypatch.setattr(k8s, "create", create)
    monkeypatch.setattr(k8s, "create_or_patch", lambda body, patch: None)
    monkeypatch.setattr(k8s, "patch_finetune_status", patch_status)
    monkeypatch.setattr(k8s, "post_event", lambda *args: None)
    monkeypatch.setattr(finetune.controller, "config", OperatorConfig(backoff_base_seconds=1, backoff_max_seconds=4))
    finetune.controller.refusals.succeeded(("ns", "ft"))
    delays = [finetune.controller.reconcile(("ns", "ft")) for _ in range(3)]
    finetune.controller.event_pool.submit(lambda: None).result()
    assert delays == [1, 2, 4]
    refused = next(cond for cond in job["status"]["conditions"] if cond["type"] == "RequestRefused")
    assert refused["status"] == "True" and "create Pod ns/ft-a1-rank-" in refused["message"]
    assert "no PriorityClass with name missing" in refused["message"]
    assert job["status"]["state"] == c.STATE_PENDING and "launchedAttempt" not in job["status"]
    # The PriorityClass appears: the ranks are created, the condition drops, the backoff starts over.
    monkeypatch.setattr(k8s, "create", lambda body: True)
    finetune.controller.reconcile(("ns", "ft"))
    refused = next(cond for cond in job["status"]["conditions"] if cond["type"] == "RequestRefused")
    assert refused["status"] == "False" and job["status"]["launchedAttempt"] == 1
    assert finetune.controller.refusals.count(("ns", "ft")) == 0
    finetune.controller.own_status_writes.clear()


# --- multi-node group recreation backoff -----------------------------------------------------------------------------


def _group_pods(phases: list[str], group: int = 0, template: str = "h") -> list[GroupPod]:
    return [
        GroupPod(f"tc-g{group}-{rank}", group, rank, phase, phase == "Running", False, template)
        for rank, phase in enumerate(phases)
    ]


def test_a_failed_group_is_recreated_only_after_its_backoff() -> None:
    spec = inference_spec(nodesPerReplica=2, devicesPerReplica=8)
    backoff = Backoff(10.0, 300.0)
    # Pass 1: a rank failed -> the group is torn down, failure 1 recorded (10 s).
    plan = plan_groups(spec, _group_pods(["Running", "Failed"]), "h", {}, NOW)
    assert plan.recreated == [0]
    entries = update_group_backoff({}, plan, spec.replicas, NOW, backoff.delay, 600)
    assert entries[0].failures == 1 and entries[0].next_attempt == NOW + timedelta(seconds=10)
    # Pass 2: the pods are gone but the backoff has not passed -> nothing is created, the wait is reported.
    plan = plan_groups(spec, [], "h", {0: entries[0].next_attempt}, NOW + timedelta(seconds=4))
    assert plan.create == [] and plan.backing_off == {0: 6.0} and plan.restarting == [0]
    # Pass 3: the backoff passed -> the whole group is created again.
    plan = plan_groups(spec, [], "h", {0: entries[0].next_attempt}, NOW + timedelta(seconds=10))
    assert plan.create == [(0, 0), (0, 1)]


def test_repeated_group_failures_double_the_wait_and_ready_resets_it() -> None:
    spec = inference_spec(nodesPerReplica=2, devicesPerReplica=8)
    delay = Backoff(10.0, 40.0).delay
    entries: dict[int, Any] = {}
    waits = []
    for _ in range(4):
        failed = GroupPlan(recreated=[0])
        entries = update_group_backoff(entries, failed, spec.replicas, NOW, delay, 600)
        waits.append((entries[0].next_attempt - NOW).total_seconds())
    assert waits == [10, 20, 40, 40] and entries[0].failures == 4
    status = [entry.as_status() for entry in entries.values()]
    assert read_group_backoff({"groupBackoff": status}) == entries  # survives an operator restart
    ready = plan_groups(spec, _group_pods(["Running", "Running"]), "h", {}, NOW)
    assert ready.ready_groups == [0]
    # Ready, but failing again within the stable window still counts as the same crash loop ...
    soon = entries[0].next_attempt + timedelta(seconds=599)
    assert update_group_backoff(entries, ready, spec.replicas, soon, delay, 600) == entries
    # ... while a group that stayed up that long starts over.
    later = entries[0].next_attempt + timedelta(seconds=600)
    assert update_group_backoff(entries, ready, spec.replicas, later, delay, 600) == {}
    assert update_group_backoff(entries, GroupPlan(), 0, NOW, delay, 600) == {}  # scaled to zero: forgotten


def test_a_crash_looping_group_is_reported_as_such() -> None:
    from telechat_operator.inference.status import WorkloadView

    looping = WorkloadView(1, 0, 0, 0, recreating=True, crash_looping=True, message="group 0 failed 3 time(s)")
    status = compute_status(
        {}, generation=1, now=NOW, selector="s", workload=looping, group_backoff=[{"group": 0, "failures": 3}]
    )
    progressing = next(cond for cond in status["conditions"] if cond["type"] == "Progressing")
    assert (progressing["reason"], progressing["message"]) == (ic.REASON_GROUP_BACKOFF, "group 0 failed 3 time(s)")
    assert status["groupBackoff"] == [{"group": 0, "failures": 3}]
    healthy = compute_status(status, generation=1, now=NOW, selector="s", workload=_serving(1))
    assert "groupBackoff" not in healthy
