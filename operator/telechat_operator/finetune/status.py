"""The job's state machine: (spec, last status, pods, clock) in -> (new status, actions) out.

Pure: no API calls, no clock reads, no randomness, so every decision is a table test. The controller applies a
`Plan` in a fixed order: creates, then the status write, then deletes. Every name created derives from state already
stored (the attempt number is bumped in the pass that tears the old group down, long before the new group is
created), so a crash after a create re-creates the same names (409); the status records a restart or a failure
before the deletes it implies, so a crash in between never counts a restart twice. A restarted operator re-derives
the same actions from the stored status and never duplicates a pod.

States (`status.state`, the printer column): Pending -> Running -> [Restarting -> Pending -> Running]* ->
Merging -> Succeeded, or Failed; Suspended from any non-terminal state.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.conditions import (
    Backoff,
    Event,
    condition_is,
    from_timestamp,
    set_condition,
    to_timestamp,
)
from telechat_operator.common.spec import SpecError
from telechat_operator.finetune import names
from telechat_operator.finetune.pods import merged_checkpoint_path, output_subdir
from telechat_operator.finetune.progress import progress_status
from telechat_operator.finetune.spec import FinetuneSpec
from telechat_operator.finetune.spec_changes import changed_fields, spec_field_hashes


@dataclasses.dataclass(frozen=True)
class PodView:
    """The few facts about a child pod the state machine reads."""

    name: str
    role: str
    attempt: int
    rank: int | None
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    exit_code: int | None = None
    reason: str | None = None  # pod status.reason (Evicted, ...) or the container's terminated reason
    deleting: bool = False
    stopping: bool = False  # spec.activeDeadlineSeconds set: the kubelet is ending it (how the operator stops one)
    blocked: tuple[str, str] | None = None  # (reason, message) a Pending pod is stuck on, see pod_blocker
    message: str | None = None  # the failed container's termination message (initializers write the cause there)

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @classmethod
    def from_body(cls, pod: Mapping[str, Any]) -> PodView:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        status = pod.get("status") or {}
        exit_code, term_reason, message = None, None, None
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated and container.get("name") in _OWN_CONTAINERS and not exit_code:
                # A failed container wins over one that exited 0 (the initializer pod has two).
                exit_code, term_reason = terminated.get("exitCode"), terminated.get("reason")
                text = (terminated.get("message") or "").strip()
                message = f"{container['name']}: {text}" if text and exit_code else None
        rank = labels.get(c.LABEL_NODE_RANK)
        return cls(
            name=meta["name"],
            role=labels.get(c.LABEL_ROLE, ""),
            attempt=int(labels.get(c.LABEL_ATTEMPT, "0")),
            rank=None if rank is None else int(rank),
            phase=status.get("phase") or "Pending",
            exit_code=exit_code,
            reason=status.get("reason") or term_reason,
            deleting=bool(meta.get("deletionTimestamp")),
            stopping=(pod.get("spec") or {}).get("activeDeadlineSeconds") is not None,
            blocked=pod_blocker(pod),
            message=message,
        )


def pod_blocker(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why a pod that has not started cannot go on, as (reason, message), or None.

    The scheduler's PodScheduled=False/Unschedulable (its message names what no node has: "0/4 nodes are
    available: 4 Insufficient huawei.com/Ascend910"), then a container (init containers first) waiting on
    ErrImagePull, ImagePullBackOff, CrashLoopBackOff, CreateContainerConfigError, ... Transient waits
    (ContainerCreating, PodInitializing) are not blockers."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for cond in status.get("conditions") or []:
        scheduled = cond.get("type") == "PodScheduled" and cond.get("status") == "False"
        if scheduled and cond.get("reason") == c.UNSCHEDULABLE_REASON:
            return c.UNSCHEDULABLE_REASON, str(cond.get("message") or "no node fits the pod")
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in c.BLOCKED_WAITING_REASONS:
            detail = f"container {container.get('name')}: {waiting.get('message') or waiting['reason']}"
            return str(waiting["reason"]), detail
    return None


_OWN_CONTAINERS = (c.TRAINER_CONTAINER, c.MERGE_CONTAINER, c.PREPROCESS_CONTAINER, c.CONVERT_CONTAINER)
# Termination messages are at most 4096 bytes; the status keeps this much of one.
MAX_MESSAGE = 2048


@dataclasses.dataclass
class Plan:
    """What to do, in order: create, write `status` (if changed), delete, then post events."""

    status: dict[str, Any]
    delete_pods: list[str] = dataclasses.field(default_factory=list)
    # Running pods to end without deleting them (their logs stay for `kubectl logs` until the TTL): the controller
    # sets spec.activeDeadlineSeconds, and the kubelet stops the containers as it does for a deadline.
    stop_pods: list[str] = dataclasses.field(default_factory=list)
    create_ranks: list[int] = dataclasses.field(default_factory=list)  # ranks of status.attempt to create
    create_merge: int | None = None  # merge attempt whose pod to create
    create_init: bool = False  # the initializer pod (preprocess / convert) before any rank pod
    config_yaml: str | None = None  # the rendered MindFormers YAML, rendered before any rank pod is posted
    ensure_children: bool = False  # ConfigMap, Service, PodGroup before the first rank pod
    events: list[Event] = dataclasses.field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclasses.dataclass(frozen=True)
class Failure:
    pod: str
    rank: int | None
    retryable: bool
    reason: str  # short CamelCase cause for the condition
    message: str
    exit_code: int | None = None


def classify_failure(pod: PodView, restart_policy: str) -> Failure | None:
    """None for a healthy pod; otherwise whether the failure may be retried under the policy."""
    where = f"rank {pod.rank} pod {pod.name}" if pod.rank is not None else f"pod {pod.name}"
    if pod.deleting and not pod.finished:
        failure = Failure(pod.name, pod.rank, True, "PodDeleted", f"{where} was deleted")
    elif pod.phase == "Unknown":
        failure = Failure(pod.name, pod.rank, True, "NodeLost", f"{where} lost contact with its node")
    elif pod.phase != "Failed":
        return None
    elif pod.reason in c.RETRYABLE_POD_REASONS:
        failure = Failure(pod.name, pod.rank, True, pod.reason or "PodFailed", f"{where} failed: {pod.reason}")
    elif pod.exit_code is None:
        failure = Failure(pod.name, pod.rank, True, "PodFailed", f"{where} failed without an exit code")
    else:
        signal_or_hardware = 128 <= pod.exit_code <= 255
        failure = Failure(
            pod.name,
            pod.rank,
            signal_or_hardware,
            f"ExitCode{pod.exit_code}",
            f"{where} exited with code {pod.exit_code}",
            pod.exit_code,
        )
    if restart_policy == c.RESTART_POLICY_NEVER:
        return dataclasses.replace(failure, retryable=False)
    if restart_policy == c.RESTART_POLICY_ON_FAILURE:
        return dataclasses.replace(failure, retryable=True)
    return failure


def missing_rank_failure(name: str, rank: int) -> Failure:
    return Failure(name, rank, True, "PodDeleted", f"rank {rank} pod {name} disappeared (deleted or node lost)")


def _lower(status: dict[str, Any], kinds: Iterable[str], reason: str, message: str, now: datetime, gen: int) -> None:
    """Set the given conditions False, but only those already present and True."""
    for kind in kinds:
        if condition_is(status, kind):
            set_condition(status, kind, False, reason, message, now, gen)


class _Machine:
    """One reconcile pass; a class only to keep the shared locals (now, generation, plan) out of signatures."""

    def __init__(
        self,
        spec: FinetuneSpec,
        old: Mapping[str, Any],
        pods: list[PodView],
        now: datetime,
        backoff: Backoff,
        progress: Mapping[str, Any] | None = None,
    ):
        self.spec = spec
        self.progress = progress
        self.now = now
        self.backoff = backoff
        self.gen = spec.generation
        self.status: dict[str, Any] = copy.deepcopy(dict(old))
        self.plan = Plan(status=self.status)
        self.pods = pods

    # --- small helpers ---
    def cond(self, kind: str, value: bool, reason: str, message: str) -> None:
        set_condition(self.status, kind, value, reason, message, self.now, self.gen)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.plan.events.append(Event("Warning" if warning else "Normal", reason, message))
        self.status["message"] = message

    def transition(self, state: str, reason: str, message: str, warning: bool = False) -> None:
        if self.status.get("state") != state:
            self.event(reason, message, warning)
        self.status["state"] = state

    def delete(self, pods: Iterable[PodView]) -> None:
        for pod in pods:
            if not pod.deleting and pod.name not in self.plan.delete_pods:
                self.plan.delete_pods.append(pod.name)

    def stop_keeping_logs(self, pods: Iterable[PodView]) -> None:
        """End these pods but keep them: Running ones are stopped in place (their logs stay), the others (not yet
        started: no logs) deleted."""
        for pod in pods:
            if pod.phase == "Running" and not pod.deleting:
                if not pod.stopping and pod.name not in self.plan.stop_pods:
                    self.plan.stop_pods.append(pod.name)
            else:
                self.delete([pod])

    @property
    def attempt(self) -> int:
        return int(self.status.get("attempt", 0))

    def workers(self, current: bool) -> list[PodView]:
        return [p for p in self.pods if p.role == c.ROLE_WORKER and (p.attempt == self.attempt) == current]

    def merges(self) -> list[PodView]:
        return [p for p in self.pods if p.role == c.ROLE_MERGE]

    def initialized(self) -> bool:
        """True once the initializer pod succeeded (or when there is none); until then it drives the job."""
        if not self.spec.initializers.enabled or condition_is(self.status, c.COND_INITIALIZED):
            return True
        name = names.init_pod(self.spec.name)
        pod = next((p for p in self.pods if p.role == c.ROLE_INITIALIZER and p.name == name), None)
        steps = " and ".join(
            step
            for step, on in (
                ("telechat2 preprocess", self.spec.initializers.dataset_jsonl),
                ("telechat2 convert", self.spec.initializers.huggingface),
            )
            if on
        )
        if pod is None or (pod.deleting and not pod.finished):
            if pod is None:
                self.plan.create_init = True
            else:
                self.plan.requeue(c.TEARDOWN_POLL_SECONDS)  # a suspended job's pod still going: same name
        elif pod.phase == "Succeeded":
            message = f"initializer pod {name} succeeded ({steps})"
            self.cond(c.COND_INITIALIZED, True, "Initialized", message)
            self.event("Initialized", message)
            return True
        elif pod.phase in ("Failed", "Unknown"):
            why = pod.message or (
                f"exit code {pod.exit_code}" if pod.exit_code is not None else pod.reason or "no exit code"
            )
            message = f"initializer pod {name} failed: {why}"[:MAX_MESSAGE]
            self.status["lastFailure"] = {
                "pod": pod.name,
                "rank": None,
                "exitCode": pod.exit_code,
                "reason": c.REASON_INITIALIZER_FAILED,
                "message": message,
                "time": to_timestamp(self.now),
            }
            self.cond(c.COND_INITIALIZED, False, c.REASON_INITIALIZER_FAILED, message)
            self.fail(c.REASON_INITIALIZER_FAILED, message)
            return False
        message = f"initializer pod {name} is running {steps}"
        self.cond(c.COND_INITIALIZED, False, "Initializing", message)
        self.transition(c.STATE_INITIALIZING, "Initializing", message)
        return False

    def active(self) -> list[PodView]:
        return [p for p in self.pods if not p.finished]

    # --- terminal transitions ---
    def fail(self, reason: str, message: str) -> None:
        self.cond(c.COND_FAILED, True, reason, message)
        kinds = (c.COND_RUNNING, c.COND_RESTARTING, c.COND_MERGING, c.COND_STALLED)
        _lower(self.status, kinds, reason, message, self.now, self.gen)
        self.status.setdefault("completionTime", to_timestamp(self.now))
        self.status.pop("nextAttemptTime", None)
        self.transition(c.STATE_FAILED, reason, message, warning=True)
        self.end_active_pods()  # finished pods stay for `kubectl logs` until ttlSecondsAfterFinished

    def end_active_pods(self) -> None:
        """A job that failed because a rank failed keeps every rank pod (the others' logs tell the story too): the
        survivors are stopped, not deleted. Other endings (deadline, success) delete what still runs."""
        if self.status.get("state") == c.STATE_FAILED and _reason(self.status, c.COND_FAILED) in c.KEEP_PODS_REASONS:
            self.stop_keeping_logs(self.active())
        else:
            self.delete(self.active())

    def succeed(self, checkpoint: str, message: str) -> None:
        self.status["checkpoint"] = checkpoint
        self.status.setdefault("completionTime", to_timestamp(self.now))
        self.cond(c.COND_SUCCEEDED, True, "JobSucceeded", message)
        _lower(self.status, (c.COND_RUNNING, c.COND_MERGING), "JobSucceeded", message, self.now, self.gen)
        self.transition(c.STATE_SUCCEEDED, "JobSucceeded", message)

    # --- the pass ---
    def run(self) -> Plan:
        spec, status = self.spec, self.status
        status["observedGeneration"] = self.gen
        status["nodes"] = spec.nodes
        status["npus"] = spec.world_size
        status["layout"] = spec.parallel.status()
        status.setdefault("restarts", 0)
        status.setdefault("attempt", 0)
        if condition_is(status, c.COND_FAILED) and _reason(status, c.COND_FAILED) == c.REASON_INVALID_SPEC:
            # The spec was fixed (parse succeeded): start over from a clean slate.
            self.cond(c.COND_FAILED, False, "SpecValid", "the spec is valid")
            status["state"] = c.STATE_PENDING
            status.pop("completionTime", None)

        if status.get("state") in c.TERMINAL_STATES:
            self.finished()
        elif self.deadline_passed():
            pass
        elif spec.run_policy.suspend:
            self.suspend()
        else:
            if status.get("state") == c.STATE_SUSPENDED:
                self.resume()
            if self.attempt == 0:
                self.start_attempt(1)
            state = status.get("state")
            if state == c.STATE_MERGING:
                self.merging()
            elif state == c.STATE_RESTARTING:
                self.restarting()
            elif self.initialized():
                self.training()
        if status.get("state") in c.TERMINAL_STATES:
            self.expire_finished_pods()  # also when the job finished in this very pass: schedule the TTL
        self.count_pods()
        _stamp_generation(self.status, self.gen)
        return self.plan

    def finished(self) -> None:
        self.end_active_pods()

    def expire_finished_pods(self) -> None:
        """ttlSecondsAfterFinished: remove every pod once it has passed, else look again then."""
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        done = from_timestamp(self.status.get("completionTime"))
        if ttl is None or done is None:
            return
        expiry = done + timedelta(seconds=ttl)
        if self.now >= expiry:
            self.delete(self.pods)
        else:
            self.plan.requeue((expiry - self.now).total_seconds())

    def deadline_passed(self) -> bool:
        deadline = self.spec.run_policy.active_deadline_seconds
        started = from_timestamp(self.status.get("startTime"))
        if deadline is None or started is None or self.status.get("state") == c.STATE_SUSPENDED:
            return False
        expiry = started + timedelta(seconds=deadline)
        if self.now < expiry:
            self.plan.requeue((expiry - self.now).total_seconds())
            return False
        self.fail(c.REASON_DEADLINE, f"the job ran longer than activeDeadlineSeconds={deadline}")
        return True

    def suspend(self) -> None:
        self.delete(self.pods)
        if self.status.get("state") == c.STATE_SUSPENDED:
            return
        message = "suspended: all pods removed; resuming continues from the newest checkpoint"
        self.cond(c.COND_SUSPENDED, True, "Suspended", message)
        kinds = (c.COND_RUNNING, c.COND_RESTARTING, c.COND_STALLED)
        _lower(self.status, kinds, "Suspended", message, self.now, self.gen)
        self.status["suspendedFrom"] = self.status.get("state") or c.STATE_PENDING
        self.status.pop("nextAttemptTime", None)
        self.transition(c.STATE_SUSPENDED, "Suspended", message)

    def resume(self) -> None:
        message = "resumed"
        self.cond(c.COND_SUSPENDED, False, "Resumed", message)
        self.event("Resumed", message)
        previous = self.status.pop("suspendedFrom", c.STATE_PENDING)
        # The deadline counts active time only, as for a Kubernetes Job.
        self.status["startTime"] = to_timestamp(self.now)
        if previous == c.STATE_MERGING:
            self.status["state"] = c.STATE_MERGING
            self.status["mergeAttempt"] = int(self.status.get("mergeAttempt", 0)) + 1
        elif int(self.status.get("launchedAttempt", 0)) >= self.attempt > 0:
            self.start_attempt(self.attempt + 1)  # a new group that resumes from the newest checkpoint
        else:
            self.status["state"] = c.STATE_PENDING  # never launched: launch the same attempt

    def start_attempt(self, attempt: int) -> None:
        self.status["attempt"] = attempt
        self.status["state"] = c.STATE_PENDING
        self.status.setdefault("startTime", to_timestamp(self.now))

    def restart_or_fail(self, failure: Failure) -> None:
        self.status["lastFailure"] = {
            "pod": failure.pod,
            "rank": failure.rank,
            "exitCode": failure.exit_code,
            "reason": failure.reason,
            "message": failure.message,
            "time": to_timestamp(self.now),
        }
        if not failure.retryable:
            policy = self.spec.run_policy.restart_policy
            reason = c.REASON_POD_FAILED if policy == c.RESTART_POLICY_NEVER else c.REASON_NON_RETRYABLE_EXIT
            why = "restartPolicy Never" if policy == c.RESTART_POLICY_NEVER else "exit codes 1-127 are not retried"
            self.fail(reason, f"{failure.message} ({why})")
            return
        restarts = int(self.status.get("restarts", 0))
        limit = self.spec.run_policy.backoff_limit
        if restarts >= limit:
            self.fail(
                c.REASON_BACKOFF_LIMIT, f"{failure.message}; backoffLimit {limit} reached after {restarts} restarts"
            )
            return
        delay = self.backoff.delay(restarts + 1)
        message = f"{restart_cause(failure)}; restarting all ranks as attempt {self.attempt + 1} in {delay:g}s"
        self.status["restarts"] = restarts + 1
        self.status["attempt"] = self.attempt + 1
        self.status["nextAttemptTime"] = to_timestamp(self.now + timedelta(seconds=delay))
        self.cond(c.COND_RESTARTING, True, failure.reason, message)
        _lower(self.status, (c.COND_RUNNING, c.COND_STALLED), "Restarting", message, self.now, self.gen)
        self.status["state"] = c.STATE_RESTARTING
        self.event("Restarting", message, warning=True)
        self.delete(self.workers(current=False))  # status.attempt moved on: the failed group is now stale
        self.plan.requeue(delay)

    def restarting(self) -> None:
        stale = self.workers(current=False)
        self.delete(stale)
        not_before = from_timestamp(self.status.get("nextAttemptTime"))
        if not_before is not None and self.now < not_before:
            self.plan.requeue((not_before - self.now).total_seconds())
            return
        self.status.pop("nextAttemptTime", None)
        self.status["state"] = c.STATE_PENDING
        self.training()

    def training(self) -> None:
        spec = self.spec
        stale = self.workers(current=False)
        self.delete(stale)
        current = {p.rank: p for p in self.workers(current=True) if p.rank is not None}
        if int(self.status.get("launchedAttempt", 0)) < self.attempt:
            if stale:  # host names are reused across attempts: wait until the old group is gone
                self.plan.requeue(c.TEARDOWN_POLL_SECONDS)
                return
            missing = [rank for rank in range(spec.nodes) if rank not in current]
            if missing:
                self.plan.ensure_children = True
                self.plan.create_ranks = missing
                self.status["state"] = c.STATE_PENDING
                # The pods are created from this spec: what later edits are compared with.
                self.status["podSpecHashes"] = spec_field_hashes(spec)
                self.spec_applied()
                return
            self.plan.events += mark_launched(self.status, spec, self.now)

        failures = [f for p in current.values() if (f := classify_failure(p, spec.run_policy.restart_policy))]
        failures += [
            missing_rank_failure(names.rank_pod(spec.name, self.attempt, rank), rank)
            for rank in range(spec.nodes)
            if rank not in current
        ]
        if failures:
            # A non-retryable failure decides the outcome even when another rank's failure could be retried.
            failures.sort(key=lambda f: (f.retryable, f.rank if f.rank is not None else -1))
            self.restart_or_fail(failures[0])
            return
        phases = [p.phase for p in current.values()]
        self.spec_applied()
        self.take_progress()
        if all(phase == "Succeeded" for phase in phases):
            self.training_succeeded()
        elif all(phase in ("Running", "Succeeded") for phase in phases):
            message = f"all {spec.nodes} ranks of attempt {self.attempt} are running"
            self.cond(c.COND_RUNNING, True, "AllRanksRunning", message)
            _lower(self.status, (c.COND_RESTARTING, c.COND_STALLED), "AllRanksRunning", message, self.now, self.gen)
            self.transition(c.STATE_RUNNING, "Running", message)
        else:
            self.status["state"] = c.STATE_PENDING
            self.stalled([p for p in current.values() if p.phase == "Pending"])

    def stalled(self, pending: list[PodView]) -> None:
        """Say why ranks stay Pending when it is something the user must fix (Unschedulable, image pulls, ...):
        the Stalled condition and the status message, and an Event when the cause changes."""
        blocked = sorted((p for p in pending if p.blocked), key=lambda p: p.rank if p.rank is not None else -1)
        if not blocked:
            if condition_is(self.status, c.COND_STALLED):
                message = f"no rank of attempt {self.attempt} is blocked any more"
                self.cond(c.COND_STALLED, False, "PodsProgressing", message)
            return
        first = blocked[0]
        reason, detail = first.blocked  # type: ignore[misc]
        others = f" (and {len(blocked) - 1} more rank(s))" if len(blocked) > 1 else ""
        message = f"rank {first.rank} pod {first.name} is Pending: {reason}: {detail}{others}"
        if not condition_is(self.status, c.COND_STALLED) or _reason(self.status, c.COND_STALLED) != reason:
            self.event(reason, message, warning=True)
        self.cond(c.COND_STALLED, True, reason, message)
        self.status["message"] = message

    def spec_applied(self) -> None:
        """Tell the user when edits of the spec wait for the next restart (the running pods keep the old values);
        say so once per set of waiting fields, and again when a new group picked them up."""
        waiting = changed_fields(self.status.get("podSpecHashes"), spec_field_hashes(self.spec))
        if waiting:
            names_ = ", ".join(waiting)
            message = (
                f"{names_} changed while attempt {self.attempt} runs: its rank pods keep the previous values until"
                " the group is next created (a restart after a failure, or suspend then resume)"
            )
            if _message(self.status, c.COND_SPEC_APPLIED) != message:
                self.event("SpecChangeDeferred", message)
            self.cond(c.COND_SPEC_APPLIED, False, "WaitingForRestart", message)
        elif condition_is(self.status, c.COND_SPEC_APPLIED, False):
            message = f"the rank pods of attempt {self.attempt} run the current spec"
            self.cond(c.COND_SPEC_APPLIED, True, "SpecApplied", message)
            self.event("SpecApplied", message)

    def take_progress(self) -> None:
        """The newest progress rank 0 served (when the controller could fetch it): kept across restarts until a newer
        one arrives, so a restarting job still shows where it was and its newest complete checkpoint."""
        progress = progress_status(self.progress) if self.progress is not None else None
        if progress is not None:
            self.status["progress"] = progress

    def training_succeeded(self) -> None:
        spec = self.spec
        self.status["trainingCompletionTime"] = to_timestamp(self.now)
        message = f"all {spec.nodes} ranks succeeded"
        if not spec.merge_enabled:
            self.succeed(output_subdir(spec, c.CHECKPOINT_DIR), f"{message}; merge disabled, shards kept")
            return
        self.status["mergeAttempt"] = 1
        self.status["state"] = c.STATE_MERGING
        self.cond(c.COND_MERGING, True, "Merging", f"{message}; merging the checkpoint shards")
        _lower(self.status, (c.COND_RUNNING,), "TrainingSucceeded", message, self.now, self.gen)
        self.event("Merging", f"{message}; merging the checkpoint shards")
        self.merging()

    def merging(self) -> None:
        merge_attempt = int(self.status.get("mergeAttempt", 1))
        self.delete(self.workers(current=False))
        current_name = names.merge_pod(self.spec.name, merge_attempt)
        pod = next((p for p in self.merges() if p.name == current_name), None)
        self.delete(p for p in self.merges() if p.name != current_name and not p.finished)
        if pod is None or (pod.deleting and not pod.finished):
            if pod is None:
                self.plan.create_merge = merge_attempt
            return
        if pod.phase == "Succeeded":
            path = merged_checkpoint_path(self.spec)
            self.succeed(path, f"merged checkpoint written to {path}")
        elif pod.phase in ("Failed", "Unknown"):
            why = f"merge pod {pod.name} failed" + (f" with exit code {pod.exit_code}" if pod.exit_code else "")
            if merge_attempt > c.MERGE_BACKOFF_LIMIT:
                self.fail(c.REASON_MERGE_FAILED, f"{why}; shards kept under {self.spec.output_path}")
                return
            self.status["mergeAttempt"] = merge_attempt + 1
            self.event("MergeRetry", f"{why}; retrying ({merge_attempt}/{c.MERGE_BACKOFF_LIMIT})", warning=True)
            self.plan.create_merge = merge_attempt + 1

    def count_pods(self) -> None:
        counts = {"pending": 0, "running": 0, "succeeded": 0, "failed": 0}
        for pod in self.workers(current=True):
            key = pod.phase.lower() if pod.phase.lower() in counts else "pending"
            counts[key] += 1
        # Pods this pass creates are Pending from the moment they exist (their first event starts no pass).
        counts["pending"] += len(self.plan.create_ranks)
        self.status["pods"] = counts


def restart_cause(failure: Failure) -> str:
    """The Restarting message's first words: which rank failed and with which exit code (or how it was lost)."""
    if failure.rank is None:
        return failure.message
    if failure.exit_code is not None:
        return f"rank {failure.rank} failed with exit code {failure.exit_code} (pod {failure.pod})"
    return f"rank {failure.rank} failed: {failure.reason} ({failure.message})"


def mark_launched(status: dict[str, Any], spec: FinetuneSpec, now: datetime) -> list[Event]:
    """Every rank pod of the current attempt exists: later passes treat a missing one as lost.

    Called by the state machine when a list shows every rank, and by the controller right after it created all the
    missing ranks itself (each create a 201), which saves a pass per attempt."""
    attempt = int(status.get("attempt", 0))
    status["launchedAttempt"] = attempt
    message = f"created {spec.nodes} rank pods for attempt {attempt}"
    set_condition(status, c.COND_CREATED, True, "PodsCreated", message, now, spec.generation)
    status["message"] = message
    return [Event("Normal", "PodsCreated", message)]


def _stamp_generation(status: dict[str, Any], generation: int) -> None:
    """Every condition was re-evaluated against this generation, including those that kept their value."""
    for cond in status.get("conditions") or []:
        cond["observedGeneration"] = generation


def _reason(status: Mapping[str, Any], kind: str) -> str | None:
    return next((cond.get("reason") for cond in status.get("conditions") or [] if cond["type"] == kind), None)


def _message(status: Mapping[str, Any], kind: str) -> str | None:
    return next((cond.get("message") for cond in status.get("conditions") or [] if cond["type"] == kind), None)


def invalid_spec_plan(old: Mapping[str, Any], error: SpecError, generation: int, now: datetime) -> Plan:
    """A spec the operator cannot run: Failed/InvalidSpec naming the field; pods (if any) are left alone."""
    status = copy.deepcopy(dict(old))
    status["observedGeneration"] = generation
    message = str(error)
    set_condition(status, c.COND_FAILED, True, c.REASON_INVALID_SPEC, message, now, generation)
    _stamp_generation(status, generation)
    plan = Plan(status=status)
    if status.get("state") != c.STATE_FAILED or status.get("message") != message:
        plan.events.append(Event("Warning", c.REASON_INVALID_SPEC, message))
    status["state"] = c.STATE_FAILED
    status["message"] = message
    return plan


def rests_on_absence(old: Mapping[str, Any], plan: Plan) -> bool:
    """Whether acting on `plan` could be wrong if a pod existed that the list did not show.

    A list from the apiserver's watch cache may trail the latest writes by a moment. Every other decision is safe on
    such a list: creating a pod that exists answers 409, and Running, launched or Succeeded rest on pods that were
    seen. What is not safe is what a missing pod sets off: deleting pods, counting a restart or a merge retry, or
    failing the job; those plans are decided again on a consistent read."""
    if plan.delete_pods:
        return True
    if int(plan.status.get("restarts", 0)) > int(old.get("restarts", 0)):
        return True
    if int(plan.status.get("mergeAttempt", 1)) > int(old.get("mergeAttempt", 1)):
        return True
    return plan.status.get("state") == c.STATE_FAILED and old.get("state") != c.STATE_FAILED


def reconcile(
    spec: FinetuneSpec,
    old_status: Mapping[str, Any],
    pods: list[PodView],
    now: datetime,
    backoff: Backoff,
    progress: Mapping[str, Any] | None = None,
) -> Plan:
    """Decide the next status and the actions that move the cluster towards it; `progress` is the newest document
    rank 0 served (`finetune.progress`), when the controller has one."""
    return _Machine(spec, old_status, pods, now, backoff, progress).run()
