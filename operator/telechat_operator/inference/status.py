"""TeleChatInference status: what was observed in, `status` out; plus the fromFinetune gate.

Pure: no API calls, no clock reads (the caller passes `now`). Conditions follow the Kubernetes conventions users
know from Deployments and LeaderWorkerSet, with `observedGeneration` on each, so a GitOps health check can tell
"still reconciling" from "done":

- `Ready`: every desired replica runs the current spec and is ready (reason AllReplicasReady), else False with why.
- `Available`: at least one replica serves (MinimumReplicasAvailable), or none is wanted (ScaledToZero).
- `Progressing`: True while something is moving (Creating, Scaling, RollingUpdate, RecreatingGroup,
  WaitingForFinetune); False when the rollout is complete (RolloutComplete) or cannot proceed without a user
  change (InvalidSpec, FinetuneFailed, ModelMismatch).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.conditions import Event, condition_is, set_condition
from telechat_operator.common.refusals import REASON_REQUEST_REFUSED
from telechat_operator.common.spec import default_vocab_file
from telechat_operator.inference import constants as ic
from telechat_operator.inference.spec import InferenceSpec, ResolvedCheckpoint


@dataclasses.dataclass(frozen=True)
class Gate:
    """Why no workload can run yet. `waiting`: it resolves by itself; otherwise the user must change something."""

    reason: str
    message: str
    waiting: bool


@dataclasses.dataclass(frozen=True)
class WorkloadView:
    """Replica counts of the Deployment or of the groups, as the status reports them."""

    desired: int
    replicas: int
    ready: int
    updated: int
    observed: bool = True  # the workload controller has acted on the latest template (Deployment observedGeneration)
    recreating: bool = False  # a multi-node group is being torn down and created again
    message: str = ""
    # Why the workload controller cannot create pods (a Deployment's ReplicaFailure condition: a 403 from admission
    # such as a missing PriorityClass), or None.
    failure: str | None = None
    # A multi-node group failed again and again: it waits longer before each recreation (reason CrashLoopBackOff).
    crash_looping: bool = False

    @property
    def complete(self) -> bool:
        return self.observed and self.replicas == self.ready == self.updated == self.desired


def deployment_view(deployment: Mapping[str, Any] | None, desired: int) -> WorkloadView:
    """Read a Deployment's status; a Deployment not yet seen by its controller counts as nothing ready."""
    if deployment is None:
        return WorkloadView(desired=desired, replicas=0, ready=0, updated=0, observed=False)
    meta = deployment.get("metadata") or {}
    status = deployment.get("status") or {}
    failure = next(
        (
            cond
            for cond in status.get("conditions") or []
            if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True"
        ),
        None,
    )
    return WorkloadView(
        failure=(
            None
            if failure is None
            else f"Deployment {meta.get('name')} cannot create pods ({failure.get('reason') or 'FailedCreate'}):"
            f" {failure.get('message') or 'no message'}"
        ),
        desired=desired,
        replicas=int(status.get("replicas") or 0),
        ready=int(status.get("readyReplicas") or 0),
        updated=int(status.get("updatedReplicas") or 0),
        observed=int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 1),
    )


# --- fromFinetune --------------------------------------------------------------------------------------------------


def _under(path: str, mount_path: str) -> bool:
    mount_path = mount_path.rstrip("/") or "/"
    return mount_path == "/" or path == mount_path or path.startswith(mount_path + "/")


def _finetune_mount_for(finetune_spec: Mapping[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The finetune's (volume, mount) whose mountPath holds `path`; the deepest mount wins."""
    volumes = {v.get("name"): v for v in finetune_spec.get("volumes") or []}
    candidates = [
        (volumes[mount["name"]], mount)
        for mount in finetune_spec.get("volumeMounts") or []
        if mount.get("name") in volumes and _under(path, str(mount.get("mountPath", "")))
    ]
    return max(candidates, key=lambda pair: len(str(pair[1]["mountPath"]).rstrip("/")), default=None)


def _covered(mounts: tuple[dict[str, Any], ...], path: str) -> bool:
    return any(_under(path, str(mount.get("mountPath", ""))) for mount in mounts)


def resolve_finetune_checkpoint(spec: InferenceSpec, finetune: Mapping[str, Any] | None) -> ResolvedCheckpoint | Gate:
    """Serve a TeleChatFinetune's merged checkpoint once it has Succeeded, with its output volume mounted.

    The finetune's volume whose mount holds `status.checkpoint` is added to the serving pods under the reserved name
    `telechat-finetune-output`, mounted read-only at the same path (so the path means the same thing in both pods),
    unless the inference's own volumeMounts already cover that path.
    """
    name = spec.from_finetune
    assert name is not None
    if finetune is None:
        return Gate(ic.REASON_WAITING_FOR_FINETUNE, f"TeleChatFinetune {name} not found in {spec.namespace}", True)
    finetune_model = (finetune.get("spec") or {}).get("model")
    if finetune_model and finetune_model != spec.model:
        return Gate(
            ic.REASON_MODEL_MISMATCH,
            f"spec.checkpoint.fromFinetune: TeleChatFinetune {name} trains {finetune_model}, not spec.model"
            f" {spec.model}: its checkpoint cannot be served as {spec.model}",
            False,
        )
    status = finetune.get("status") or {}
    if condition_is(status, c.COND_FAILED):
        return Gate(ic.REASON_FINETUNE_FAILED, f"TeleChatFinetune {name} failed: no checkpoint to serve", False)
    checkpoint = status.get("checkpoint")
    if not condition_is(status, c.COND_SUCCEEDED) or not checkpoint:
        state = status.get("state") or "Pending"
        return Gate(
            ic.REASON_WAITING_FOR_FINETUNE, f"waiting for TeleChatFinetune {name} to succeed (state {state})", True
        )
    checkpoint = str(checkpoint)
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    found = (
        None
        if _covered(spec.volume_mounts, checkpoint)
        else _finetune_mount_for(finetune.get("spec") or {}, checkpoint)
    )
    if found is not None:
        volume, mount = found
        volume = copy.deepcopy(dict(volume))
        volume["name"] = ic.FINETUNE_OUTPUT_VOLUME
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["readOnly"] = True
        new_mount = {"name": ic.FINETUNE_OUTPUT_VOLUME, "mountPath": mount["mountPath"], "readOnly": True}
        if mount.get("subPath"):
            new_mount["subPath"] = mount["subPath"]
        volumes, mounts = (volume,), (new_mount,)
    return ResolvedCheckpoint(
        path=checkpoint,
        vocab_file=spec.vocab_file or default_vocab_file(checkpoint),
        volumes=volumes,
        volume_mounts=mounts,
        from_finetune=name,
    )


def finetune_of(body: Mapping[str, Any]) -> str | None:
    """The TeleChatFinetune an inference body waits for, if any (for routing finetune events)."""
    return ((body.get("spec") or {}).get("checkpoint") or {}).get("fromFinetune") or None


# --- status ------------------------------------------------------------------------------------------------------


def _progress_reason(workload: WorkloadView) -> tuple[str, str]:
    """Why the rollout is not complete, in the order a user cares about."""
    if workload.failure:
        return ic.REASON_REPLICA_FAILURE, workload.failure
    if workload.crash_looping:
        return ic.REASON_GROUP_BACKOFF, workload.message or "a multi-node group keeps failing"
    if workload.recreating:
        return ic.REASON_RECREATING_GROUP, workload.message or "recreating a multi-node group after a pod failed"
    if workload.replicas == 0 and workload.desired > 0:
        return ic.REASON_CREATING, f"creating {workload.desired} replica(s)"
    if workload.replicas != workload.desired and workload.updated >= min(workload.replicas, workload.desired):
        return ic.REASON_SCALING, f"scaling from {workload.replicas} to {workload.desired} replica(s)"
    if workload.updated < workload.desired or not workload.observed:
        return ic.REASON_ROLLING, f"{workload.updated}/{workload.desired} replica(s) run the current spec"
    return ic.REASON_CREATING, f"waiting for {workload.desired - workload.ready} replica(s) to become ready"


def compute_status(
    old: Mapping[str, Any],
    *,
    generation: int,
    now: datetime,
    selector: str,
    endpoint: str | None = None,
    checkpoint: str | None = None,
    workload: WorkloadView | None = None,
    gate: Gate | None = None,
    group_restarts: int = 0,
    group_backoff: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The whole new status: either a gate (nothing can run) or the workload's counts. `old` is not modified.

    `group_backoff`: the multi-node groups waiting before their next recreation (`status.groupBackoff`); with a
    workload and none given, the field is dropped (no group is backing off)."""
    status: dict[str, Any] = copy.deepcopy(dict(old))
    status["observedGeneration"] = generation
    status["selector"] = selector
    if group_restarts:
        status["groupRestarts"] = int(status.get("groupRestarts") or 0) + group_restarts
    if group_backoff:
        status["groupBackoff"] = group_backoff
    elif gate is None:
        status.pop("groupBackoff", None)

    def cond(kind: str, value: bool, reason: str, message: str) -> None:
        set_condition(status, kind, value, reason, message, now, generation)

    if gate is not None:
        if workload is None:
            status.update(replicas=0, readyReplicas=0, updatedReplicas=0)
        cond(ic.COND_AVAILABLE, False, gate.reason, gate.message)
        cond(ic.COND_PROGRESSING, gate.waiting, gate.reason, gate.message)
        cond(ic.COND_READY, False, gate.reason, gate.message)
        return status

    assert workload is not None
    status.update(replicas=workload.replicas, readyReplicas=workload.ready, updatedReplicas=workload.updated)
    if endpoint:
        status["endpoint"] = endpoint
    if checkpoint:
        status["checkpoint"] = checkpoint
    counts = f"{workload.ready}/{workload.desired} replica(s) ready"
    if workload.desired == 0:
        cond(ic.COND_AVAILABLE, True, ic.REASON_SCALED_TO_ZERO, "no replicas requested")
    elif workload.ready > 0:
        cond(ic.COND_AVAILABLE, True, ic.REASON_MIN_AVAILABLE, f"{counts}; serving at {endpoint}")
    else:
        cond(ic.COND_AVAILABLE, False, ic.REASON_NONE_AVAILABLE, counts)
    if workload.complete:
        cond(ic.COND_PROGRESSING, False, ic.REASON_ROLLOUT_COMPLETE, f"{counts}, all on the current spec")
        cond(ic.COND_READY, True, ic.REASON_ALL_READY, counts)
    else:
        reason, message = _progress_reason(workload)
        cond(ic.COND_PROGRESSING, True, reason, message)
        cond(ic.COND_READY, False, ic.REASON_NOT_READY, f"{counts}; {reason}: {message}")
    return status


def invalid_spec_status(
    old: Mapping[str, Any], *, generation: int, now: datetime, selector: str, error: str
) -> dict[str, Any]:
    return compute_status(
        old,
        generation=generation,
        now=now,
        selector=selector,
        gate=Gate(ic.REASON_INVALID_SPEC, error, False),
        workload=WorkloadView(0, int(old.get("replicas") or 0), int(old.get("readyReplicas") or 0), 0),
    )


def refused_status(
    old: Mapping[str, Any], *, generation: int, now: datetime, selector: str, message: str
) -> dict[str, Any]:
    """The apiserver refused one of the operator's requests (see `common.refusals`): Progressing (it retries by itself)
    and not Ready, both saying which object was refused and why. Available and the counts stay as last observed:
    replicas that already serve keep serving."""
    status: dict[str, Any] = copy.deepcopy(dict(old))
    status["observedGeneration"] = generation
    status["selector"] = selector
    for key in ("replicas", "readyReplicas", "updatedReplicas"):
        status.setdefault(key, 0)

    def cond(kind: str, value: bool) -> None:
        set_condition(status, kind, value, REASON_REQUEST_REFUSED, message, now, generation)

    if not _condition(status, ic.COND_AVAILABLE):
        cond(ic.COND_AVAILABLE, False)
    cond(ic.COND_PROGRESSING, True)
    cond(ic.COND_READY, False)
    for existing in status.get("conditions") or []:
        existing["observedGeneration"] = generation
    return status


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    return next((cond for cond in status.get("conditions") or [] if cond.get("type") == kind), {})


def transition_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """One Event per condition change worth telling (`kubectl describe tcinf` shows the story)."""
    events: list[Event] = []
    before_ready, after_ready = _condition(old, ic.COND_READY), _condition(new, ic.COND_READY)
    before_prog, after_prog = _condition(old, ic.COND_PROGRESSING), _condition(new, ic.COND_PROGRESSING)
    if after_prog.get("reason") != before_prog.get("reason") and after_prog.get("reason") != ic.REASON_ROLLOUT_COMPLETE:
        warning = after_prog.get("reason") in (
            ic.REASON_INVALID_SPEC,
            ic.REASON_FINETUNE_FAILED,
            ic.REASON_MODEL_MISMATCH,
            ic.REASON_RECREATING_GROUP,
            ic.REASON_REPLICA_FAILURE,
            ic.REASON_GROUP_BACKOFF,
            REASON_REQUEST_REFUSED,
        )
        events.append(
            Event("Warning" if warning else "Normal", str(after_prog.get("reason")), str(after_prog.get("message", "")))
        )
    if after_ready.get("status") != before_ready.get("status"):
        if after_ready.get("status") == "True":
            events.append(
                Event("Normal", "Ready", f"{after_ready.get('message', '')}; serving at {new.get('endpoint')}")
            )
        elif before_ready.get("status") == "True":
            # A rollout while replicas keep serving is routine; losing every replica is not.
            serving = _condition(new, ic.COND_AVAILABLE).get("status") == "True"
            events.append(Event("Normal" if serving else "Warning", "NotReady", str(after_ready.get("message", ""))))
    return events
