"""The TeleChatInference pass planner: observed children in, ordered steps and the status out, without a cluster."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.conditions import Backoff
from telechat_operator.common.objects import stable_hash
from telechat_operator.common.spec import SpecError
from telechat_operator.inference import constants as ic
from telechat_operator.inference.builders import build_config_map, build_deployment, build_service
from telechat_operator.inference.groups import build_group_pod, build_group_service
from telechat_operator.inference.plan import (
    Apply,
    Create,
    Delete,
    InferencePlan,
    Observed,
    Stale,
    finetune_to_read,
    gated_status,
    group_children_selector,
    plan_serving,
    resolve_checkpoint,
)
from telechat_operator.inference.spec import InferenceSpec
from telechat_operator.inference.status import Gate

from tests.unit.inference_fixtures import inference_spec, path_checkpoint

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DATA = {ic.PREDICT_CONFIG_KEY: "model: telechat2-7b\n"}
CONFIG_HASH = stable_hash(DATA)


def plan(spec: InferenceSpec, observed: Observed, old: dict[str, Any] | None = None) -> InferencePlan:
    return plan_serving(
        spec,
        path_checkpoint(),
        DATA,
        observed,
        old or {},
        NOW,
        backoff=Backoff(10, 300),
        group_stable_seconds=600,
    )


def kinds(steps: list[Any]) -> list[tuple[str, str]]:
    """Each step as (verb, what): Apply/Delete name the object, Create the kinds and names it posts."""
    described = []
    for step in steps:
        if isinstance(step, Apply):
            described.append(("apply", f"{step.body['kind']} {step.body['metadata']['name']}"))
        elif isinstance(step, Delete):
            described.append(("delete", f"{step.kind} {step.name}"))
        else:
            assert isinstance(step, Create)
            described.append(("create", ", ".join(f"{b['kind']} {b['metadata']['name']}" for b in step.bodies)))
    return described


def serving_children(spec: InferenceSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    return build_config_map(spec, DATA), build_service(spec)


def ready_deployment(spec: InferenceSpec) -> dict[str, Any]:
    """The Deployment as the apiserver holds it once its controller has rolled it out."""
    deployment = build_deployment(spec, path_checkpoint(), CONFIG_HASH)
    deployment["metadata"]["generation"] = 2
    deployment["status"] = {
        "observedGeneration": 2,
        "replicas": spec.replicas,
        "readyReplicas": spec.replicas,
        "updatedReplicas": spec.replicas,
    }
    return deployment


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(cond for cond in status["conditions"] if cond["type"] == kind)


def multi(replicas: int = 2) -> InferenceSpec:
    return inference_spec(replicas=replicas, devicesPerReplica=8, nodesPerReplica=2)


def group_pod(spec: InferenceSpec, group: int, rank: int, phase: str = "Running", ready: bool = True) -> dict:
    pod = build_group_pod(spec, path_checkpoint(), group, rank, CONFIG_HASH)
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    pod["status"] = {"phase": phase, "conditions": conditions}
    return pod


def test_a_new_single_node_inference_applies_its_three_children_in_order() -> None:
    spec = inference_spec()
    result = plan(spec, Observed())
    assert kinds(result.steps) == [
        ("apply", "ConfigMap tc7b-serving-config"),
        ("apply", "Service tc7b"),
        ("apply", "Deployment tc7b"),
    ]
    assert result.halt is None and result.events == [] and result.wake is None
    assert result.workload is None  # the counts come from the Deployment apply's answer
    status = result.status({"metadata": {"generation": 1}, "status": {}})  # not yet seen by its controller
    assert status["endpoint"] == "http://tc7b.serving.svc:1025"
    assert status["checkpoint"] == path_checkpoint().path
    assert condition(status, ic.COND_READY)["status"] == "False"
    assert condition(status, ic.COND_PROGRESSING)["reason"] == ic.REASON_CREATING


def test_children_that_carry_the_current_hash_are_not_written_again() -> None:
    spec = inference_spec()
    config_map, service = serving_children(spec)
    observed = Observed(config_map=config_map, service=service, deployment=ready_deployment(spec))
    result = plan(spec, observed)
    assert result.steps == [] and result.halt is None
    status = result.status()  # no apply: the live Deployment's counts
    assert condition(status, ic.COND_READY)["status"] == "True"
    assert status["readyReplicas"] == 1


def test_a_deployment_scaled_behind_the_operators_back_is_applied_again() -> None:
    spec = inference_spec()
    config_map, service = serving_children(spec)
    drifted = ready_deployment(spec)
    drifted["spec"]["replicas"] = 3
    result = plan(spec, Observed(config_map=config_map, service=service, deployment=drifted))
    assert kinds(result.steps) == [("apply", "Deployment tc7b")] and result.workload is None


def test_a_leftover_of_an_older_inference_is_deleted_and_the_pass_stops() -> None:
    spec = inference_spec()
    leftover = build_config_map(spec, DATA)
    leftover["metadata"]["ownerReferences"] = [{"uid": "an-older-tc7b"}]
    result = plan(spec, Observed(config_map=leftover))
    assert kinds(result.steps) == [("delete", "ConfigMap tc7b-serving-config")]
    assert isinstance(result.halt, Stale) and "older object of the same name" in str(result.halt)


def test_someone_elses_object_of_the_same_name_is_never_touched() -> None:
    spec = inference_spec()
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "tc7b", "labels": {"app": "other"}}}
    result = plan(spec, Observed(service=foreign))
    assert kinds(result.steps) == [("apply", "ConfigMap tc7b-serving-config")]  # what came before it still happens
    assert isinstance(result.halt, SpecError) and result.halt.field == "metadata.name"
    assert "Service tc7b already exists and is not ours" in str(result.halt)


def test_going_multi_node_removes_the_deployment_then_creates_the_group_services_and_pods() -> None:
    spec = multi()
    config_map, service = serving_children(spec)
    old_deployment = ready_deployment(inference_spec())
    result = plan(spec, Observed(config_map=config_map, service=service, deployment=old_deployment))
    assert kinds(result.steps) == [
        ("delete", "Deployment tc7b"),
        ("create", "Service tc7b-g0"),
        ("create", "Service tc7b-g1"),
        ("create", "Pod tc7b-g0-0, Pod tc7b-g0-1, Pod tc7b-g1-0, Pod tc7b-g1-1"),
    ]
    assert result.workload is not None and (result.workload.replicas, result.workload.ready) == (0, 0)
    status = result.status()
    assert condition(status, ic.COND_PROGRESSING)["reason"] == ic.REASON_CREATING
    assert "groupBackoff" not in status and "groupRestarts" not in status


def test_a_deployment_someone_else_owns_is_left_alone_in_multi_node_mode() -> None:
    spec = multi(replicas=1)
    config_map, service = serving_children(spec)
    theirs = ready_deployment(inference_spec())
    theirs["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    result = plan(spec, Observed(config_map=config_map, service=service, deployment=theirs))
    assert ("delete", "Deployment tc7b") not in kinds(result.steps)


def test_going_single_node_removes_our_groups_before_applying_the_deployment() -> None:
    spec = inference_spec()
    config_map, service = serving_children(spec)
    was = multi(replicas=1)
    terminating = group_pod(was, 0, 1)
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    stranger = group_pod(was, 0, 0) | {"metadata": {"name": "not-ours", "ownerReferences": [{"uid": "other"}]}}
    observed = Observed(
        config_map=config_map,
        service=service,
        group_pods=(group_pod(was, 0, 0), terminating, stranger),
        group_services=(build_group_service(was, 0),),
    )
    result = plan(spec, observed)
    assert kinds(result.steps) == [
        ("delete", "Pod tc7b-g0-0"),  # the terminating pod is already going; the stranger is not ours
        ("delete", "Service tc7b-g0"),
        ("apply", "Deployment tc7b"),
    ]


def test_a_broken_group_is_recreated_whole_after_a_backoff_and_says_so() -> None:
    spec = multi()
    config_map, service = serving_children(spec)
    pods = (
        group_pod(spec, 0, 0),
        group_pod(spec, 0, 1),
        group_pod(spec, 1, 0),
        group_pod(spec, 1, 1, phase="Failed", ready=False),
    )
    services = (build_group_service(spec, 0), build_group_service(spec, 1))
    observed = Observed(config_map=config_map, service=service, group_pods=pods, group_services=services)
    old = {"groupRestarts": 1}
    result = plan(spec, observed, old)
    assert kinds(result.steps) == [("delete", "Pod tc7b-g1-0"), ("delete", "Pod tc7b-g1-1")]
    assert result.recreated == 1
    (event,) = result.events
    assert (event.type, event.reason) == ("Warning", "GroupRecreated")
    assert (
        event.message.startswith("group 1: pod tc7b-g1-1 Failed; recreating the whole group")
        and "in 10s" in event.message
    )
    next_attempt = (NOW + timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert result.group_backoff == [{"group": 1, "failures": 1, "nextAttemptTime": next_attempt}]
    assert result.wake == c.TEARDOWN_POLL_SECONDS  # pods are being deleted: look again soon
    status = result.status()
    assert status["groupRestarts"] == 2 and status["groupBackoff"] == result.group_backoff
    assert condition(status, ic.COND_PROGRESSING)["reason"] == ic.REASON_RECREATING_GROUP
    assert old == {"groupRestarts": 1}  # the input is not modified


def test_a_group_still_backing_off_is_not_created_yet() -> None:
    spec = multi(replicas=1)
    config_map, service = serving_children(spec)
    next_attempt = (NOW + timedelta(seconds=40)).strftime("%Y-%m-%dT%H:%M:%SZ")
    old = {"groupBackoff": [{"group": 0, "failures": 2, "nextAttemptTime": next_attempt}]}
    observed = Observed(config_map=config_map, service=service, group_services=(build_group_service(spec, 0),))
    result = plan(spec, observed, old)
    assert result.steps == [] and result.wake == 40
    assert result.workload is not None and result.workload.crash_looping
    assert condition(result.status(), ic.COND_PROGRESSING)["reason"] == ic.REASON_GROUP_BACKOFF


def test_scaling_groups_down_deletes_the_extra_groups_and_their_services() -> None:
    spec = multi(replicas=1)
    config_map, service = serving_children(spec)
    pods = tuple(group_pod(spec, group, rank) for group in (0, 1) for rank in (0, 1))
    services = (build_group_service(spec, 0), build_group_service(spec, 1))
    observed = Observed(config_map=config_map, service=service, group_pods=pods, group_services=services)
    result = plan(spec, observed)
    assert kinds(result.steps) == [
        ("delete", "Service tc7b-g1"),
        ("delete", "Pod tc7b-g1-0"),
        ("delete", "Pod tc7b-g1-1"),
    ]
    assert result.events == []


def test_the_planner_is_deterministic_and_leaves_its_inputs_alone() -> None:
    spec = multi()
    config_map, service = serving_children(spec)
    observed = Observed(config_map=config_map, service=service, group_pods=(group_pod(spec, 0, 0),))
    before = copy.deepcopy(observed)
    first, second = plan(spec, observed), plan(spec, observed)
    assert first == second and observed == before


def test_the_checkpoint_comes_from_the_path_or_from_the_finetune() -> None:
    by_path = inference_spec()
    assert finetune_to_read(by_path) is None
    assert resolve_checkpoint(by_path, None) == path_checkpoint()
    from_finetune = inference_spec(checkpoint={"fromFinetune": "ft"})
    assert finetune_to_read(from_finetune) == "ft"
    gate = resolve_checkpoint(from_finetune, None)
    assert isinstance(gate, Gate) and gate.reason == ic.REASON_WAITING_FOR_FINETUNE and gate.waiting
    status = gated_status(from_finetune, {}, gate, NOW)
    assert status["replicas"] == 0 and condition(status, ic.COND_READY)["reason"] == ic.REASON_WAITING_FOR_FINETUNE


def test_group_children_are_selected_by_inference_and_group_label() -> None:
    selector = group_children_selector(multi())
    # Sorted labels (inference-name before owner-kind), then "has a group index".
    assert selector == f"{ic.LABEL_INFERENCE_NAME}=tc7b,{c.LABEL_OWNER_KIND}={ic.INFERENCE_KIND},{ic.LABEL_GROUP_INDEX}"
