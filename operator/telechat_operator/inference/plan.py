"""One TeleChatInference pass's decisions: what the pass observed in, an `InferencePlan` out.

Pure: no API calls, no clock reads (the controller passes `now` and its settings). The controller reads the
children (`Observed`), asks `plan_serving` what to do, performs the plan's `steps` in order through `k8s.py`, and
writes `plan.status(...)`. Every write is idempotent: children carry the hash of what they were built from and are
applied only when it changes; group pods have fixed names.

Steps come in the order the pass must take them: the ConfigMap and the Service first (the pods mount and sit
behind them), then removing what the other workload kind left (a Deployment when replicas span nodes, groups when
they no longer do), then the workload itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.conditions import Backoff, Event
from telechat_operator.common.objects import owned_by, selector_string, stable_hash
from telechat_operator.common.spec import SpecError
from telechat_operator.inference import constants as ic
from telechat_operator.inference.builders import (
    build_config_map,
    build_deployment,
    build_service,
    children_selector,
    deployment_name,
    endpoint,
    serving_selector,
)
from telechat_operator.inference.groups import (
    GroupPod,
    backoff_message,
    build_group_pod,
    build_group_service,
    group_template_hash,
    plan_groups,
    read_group_backoff,
    update_group_backoff,
)
from telechat_operator.inference.spec import InferenceSpec, ResolvedCheckpoint, resolve_path_checkpoint
from telechat_operator.inference.status import (
    Gate,
    WorkloadView,
    compute_status,
    deployment_view,
    resolve_finetune_checkpoint,
)


class Stale(Exception):
    """A child of the same name left by a deleted inference: deleted now, created on the next pass."""


# --- what a pass reads and does ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Observed:
    """The children one pass read: the named ones (None when absent) and the group pods and Services by label
    (any owner: the planner keeps the inference's own)."""

    config_map: Mapping[str, Any] | None = None
    service: Mapping[str, Any] | None = None
    deployment: Mapping[str, Any] | None = None
    group_pods: tuple[Mapping[str, Any], ...] = ()
    group_services: tuple[Mapping[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Apply:
    """Server-side apply of `body` (create or update)."""

    body: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Delete:
    kind: str
    name: str


@dataclasses.dataclass(frozen=True)
class Create:
    """Create these objects (409 is done), concurrently when there are several."""

    bodies: tuple[dict[str, Any], ...]


Step = Apply | Delete | Create


@dataclasses.dataclass
class InferencePlan:
    """What one pass does, in order, and what the status then says."""

    spec: InferenceSpec
    old: Mapping[str, Any]
    now: datetime
    checkpoint: ResolvedCheckpoint
    steps: list[Step] = dataclasses.field(default_factory=list)
    # Raised once the steps are done: Stale (a leftover was deleted: look again soon) or SpecError (not ours).
    halt: Exception | None = None
    # The workload's counts; None when the Deployment is applied in this pass (its answer carries them).
    workload: WorkloadView | None = None
    events: list[Event] = dataclasses.field(default_factory=list)
    recreated: int = 0  # multi-node groups torn down after a failure in this pass
    group_backoff: list[dict[str, Any]] | None = None  # status.groupBackoff
    wake: float | None = None  # look again this soon: pods terminate, or a group's backoff ends

    def status(self, applied_deployment: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The new status, once the steps are done (`applied_deployment`: the Deployment apply's answer)."""
        workload = self.workload or deployment_view(applied_deployment, self.spec.replicas)
        return compute_status(
            self.old,
            generation=self.spec.generation,
            now=self.now,
            selector=selector_string(serving_selector(self.spec)),
            endpoint=endpoint(self.spec),
            checkpoint=self.checkpoint.path,
            workload=workload,
            group_restarts=self.recreated,
            group_backoff=self.group_backoff,
        )


class _Halted(Exception):
    """Internal: planning stops here (the plan's `halt` says why)."""


# --- planning ------------------------------------------------------------------------------------------------------


def finetune_to_read(spec: InferenceSpec) -> str | None:
    """The TeleChatFinetune whose status the pass needs (spec.checkpoint.fromFinetune), if any."""
    return spec.from_finetune if spec.checkpoint_path is None else None


def resolve_checkpoint(spec: InferenceSpec, finetune: Mapping[str, Any] | None) -> ResolvedCheckpoint | Gate:
    """What the pods serve, or why nothing can run yet; `finetune` is the body `finetune_to_read` named."""
    if spec.checkpoint_path is not None:
        return resolve_path_checkpoint(spec)
    return resolve_finetune_checkpoint(spec, finetune)


def gated_status(spec: InferenceSpec, old: Mapping[str, Any], gate: Gate, now: datetime) -> dict[str, Any]:
    """Nothing to serve yet (or ever, for a failed finetune): no pods; running ones, if any, keep serving."""
    selector = selector_string(serving_selector(spec))
    return compute_status(old, generation=spec.generation, now=now, selector=selector, gate=gate)


def group_children_selector(spec: InferenceSpec) -> str:
    """The label selector of an inference's group pods and group Services."""
    return selector_string(children_selector(spec.name)) + f",{ic.LABEL_GROUP_INDEX}"


def plan_serving(
    spec: InferenceSpec,
    checkpoint: ResolvedCheckpoint,
    config_data: Mapping[str, str],
    observed: Observed,
    old: Mapping[str, Any],
    now: datetime,
    *,
    backoff: Backoff,
    group_stable_seconds: float,
) -> InferencePlan:
    """The ConfigMap (with the rendered `config_data`), the Service, and the workload: a Deployment of whole
    replicas, or groups of pods when a replica spans nodes."""
    plan = InferencePlan(spec=spec, old=old, now=now, checkpoint=checkpoint)
    config_hash = stable_hash(config_data)
    try:
        _ensure(plan, build_config_map(spec, config_data), observed.config_map)
        _ensure(plan, build_service(spec), observed.service)
        if spec.multi_node:
            _plan_groups(plan, config_hash, observed, backoff, group_stable_seconds)
        else:
            _plan_deployment(plan, config_hash, observed)
    except _Halted:
        pass
    return plan


def _hash_of(obj: Mapping[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("annotations", {}).get(ic.ANNOTATION_SPEC_HASH)


def _ensure(plan: InferencePlan, desired: dict[str, Any], live: Mapping[str, Any] | None) -> bool:
    """Apply `desired` unless the live object already carries its hash (no write when nothing changed); True when
    it is applied. A live object of the same name that is not ours halts the pass."""
    meta = desired["metadata"]
    if live is not None and not owned_by(live, plan.spec.uid):
        labels = (live.get("metadata") or {}).get("labels") or {}
        if labels.get(c.LABEL_OWNER_KIND) != ic.INFERENCE_KIND:
            # Someone else's object: never touch it, tell the user instead.
            plan.halt = SpecError("metadata.name", f"{desired['kind']} {meta['name']} already exists and is not ours")
            raise _Halted
        plan.steps.append(Delete(desired["kind"], meta["name"]))
        plan.halt = Stale(f"{desired['kind']} {meta['name']} belonged to an older object of the same name")
        raise _Halted
    drifted = (
        desired["kind"] == "Deployment"
        and live is not None
        and ((live.get("spec") or {}).get("replicas") != desired["spec"]["replicas"])
    )
    if live is None or drifted or _hash_of(live) != _hash_of(desired):
        plan.steps.append(Apply(desired))
        return True
    return False


def _own(plan: InferencePlan, objects: tuple[Mapping[str, Any], ...]) -> list[Mapping[str, Any]]:
    return [obj for obj in objects if owned_by(obj, plan.spec.uid)]


def _plan_deployment(plan: InferencePlan, config_hash: str, observed: Observed) -> None:
    """Single-node replicas: drop any groups and their Services (the spec was multi-node until now), then keep the
    Deployment in step."""
    spec = plan.spec
    for pod in _own(plan, observed.group_pods):
        if not pod["metadata"].get("deletionTimestamp"):
            plan.steps.append(Delete("Pod", pod["metadata"]["name"]))
    for service in _own(plan, observed.group_services):
        plan.steps.append(Delete("Service", service["metadata"]["name"]))
    if not _ensure(plan, build_deployment(spec, plan.checkpoint, config_hash), observed.deployment):
        plan.workload = deployment_view(observed.deployment, spec.replicas)


def _plan_groups(plan: InferencePlan, config_hash: str, observed: Observed, backoff: Backoff, stable: float) -> None:
    """Multi-node replicas: create, recreate (after a backoff) and roll groups; count them."""
    spec, now = plan.spec, plan.now
    deployment = observed.deployment
    if deployment is not None and owned_by(deployment, spec.uid):
        plan.steps.append(Delete("Deployment", deployment_name(spec.name)))  # was single-node until now
    template_hash = group_template_hash(spec, plan.checkpoint, config_hash)
    pods = [GroupPod.from_body(pod) for pod in _own(plan, observed.group_pods)]
    previous = read_group_backoff(plan.old)
    groups = plan_groups(spec, pods, template_hash, {g: e.next_attempt for g, e in previous.items()}, now)
    entries = update_group_backoff(previous, groups, spec.replicas, now, backoff.delay, stable)

    services = {int(s["metadata"]["labels"][ic.LABEL_GROUP_INDEX]): s for s in _own(plan, observed.group_services)}
    for group, service in services.items():
        if group >= spec.replicas:
            plan.steps.append(Delete("Service", service["metadata"]["name"]))
    for group in range(spec.replicas):
        if group not in services:
            plan.steps.append(Create((build_group_service(spec, group),)))
    plan.steps.extend(Delete("Pod", name) for name in groups.delete)
    bodies = tuple(build_group_pod(spec, plan.checkpoint, group, rank, config_hash) for group, rank in groups.create)
    if bodies:
        plan.steps.append(Create(bodies))

    for group in groups.recreated:
        message = next((m for m in groups.messages if m.startswith(f"group {group}:")), f"group {group} recreated")
        wait = (entries[group].next_attempt - now).total_seconds()
        plan.events.append(Event("Warning", "GroupRecreated", f"{message} in {wait:g}s"))
    for group in groups.rolled:
        plan.events.append(Event("Normal", "GroupRolled", f"group {group}: recreating it with the current spec"))
    waiting = set(groups.backing_off) | set(groups.recreated)
    waiting_message = backoff_message(entries, groups)
    plan.workload = WorkloadView(
        desired=spec.replicas,
        replicas=groups.replicas,
        ready=groups.ready,
        updated=groups.updated,
        recreating=bool(groups.restarting),
        message="; ".join([*groups.messages, waiting_message] if waiting_message else groups.messages),
        crash_looping=any(entries[g].failures >= 2 for g in waiting if g in entries),
    )
    terminating = bool(groups.delete) or any(pod.deleting for pod in pods)
    wakes = [c.TEARDOWN_POLL_SECONDS] if terminating else []
    wakes += [max(seconds, 0.5) for seconds in groups.backing_off.values()]
    # A ready group still in backoff: look again when it has been stable long enough to clear it.
    wakes += [
        max((entries[g].next_attempt - now).total_seconds() + stable, 0.5) for g in groups.ready_groups if g in entries
    ]
    plan.recreated = len(groups.recreated)
    plan.group_backoff = [entries[group].as_status() for group in sorted(entries)]
    plan.wake = min(wakes, default=None)
