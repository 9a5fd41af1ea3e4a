"""Multi-node replicas (nodesPerReplica > 1) as groups of pods, the LeaderWorkerSet way, and what to do with them.

A group is one replica: pods `<name>-g<group>-<rank>`, rank 0 the leader (msrun's scheduler and the HTTP server),
ranks 1.. the workers, all running `telechat2 launch ... -- telechat2 serve ...` with the leader's DNS name from
a headless Service per group. A group lives and dies as a whole: when one of its pods fails or vanishes, every pod
of the group is deleted and the group is created again (LWS's RecreateGroupOnPodRestart).

Pure: builders return dicts; `plan_groups` turns observed pods into create/delete decisions and counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.conditions import from_timestamp, to_timestamp
from telechat_operator.common.objects import stable_hash
from telechat_operator.inference import constants as ic
from telechat_operator.inference.builders import (
    metadata,
    pod_spec,
    replica_launch,
    serve_command,
    server_container,
    serving_selector,
    template_annotations,
)
from telechat_operator.inference.spec import InferenceSpec, ResolvedCheckpoint

# --- names -----------------------------------------------------------------------------------------------------


def group_service_name(name: str, group: int) -> str:
    return f"{name}-g{group}"


def group_pod_name(name: str, group: int, rank: int) -> str:
    """Also the pod's host name: stable across recreations, so the leader address never changes."""
    return f"{name}-g{group}-{rank}"


def leader_address(spec: InferenceSpec, group: int) -> str:
    """The leader's fully qualified name, resolvable through the group's headless Service."""
    return f"{group_pod_name(spec.name, group, 0)}.{group_service_name(spec.name, group)}.{spec.namespace}.svc"


# --- builders --------------------------------------------------------------------------------------------------


def build_group_service(spec: InferenceSpec, group: int) -> dict[str, Any]:
    """Headless: gives the leader a DNS name before any pod is ready (workers need it to join msrun)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(spec, group_service_name(spec.name, group), **{ic.LABEL_GROUP_INDEX: str(group)}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {ic.LABEL_INFERENCE_NAME: spec.name, ic.LABEL_GROUP_INDEX: str(group)},
            "ports": [{"name": c.MASTER_PORT_NAME, "port": ic.GROUP_MASTER_PORT, "targetPort": ic.GROUP_MASTER_PORT}],
        },
    }


def _group_pod(
    spec: InferenceSpec, checkpoint: ResolvedCheckpoint, group: int, rank: int, config_hash: str, template_hash: str
) -> dict[str, Any]:
    leader = rank == 0
    master = leader_address(spec, group)
    launch = replica_launch(spec, node_rank=rank, master_addr=master)
    contract = {
        **launch.env(),
        ic.ENV_GROUP_INDEX: str(group),
        ic.ENV_GROUP_SIZE: str(spec.nodes_per_replica),
    }
    container = server_container(
        spec,
        checkpoint,
        command=launch.command(serve_command(spec, checkpoint)),
        contract=contract,
        serves_http=leader,
    )
    labels = {
        c.LABEL_ROLE: ic.ROLE_LEADER if leader else ic.ROLE_GROUP_WORKER,
        ic.LABEL_GROUP_INDEX: str(group),
        ic.LABEL_WORKER_INDEX: str(rank),
        ic.LABEL_TEMPLATE_HASH: template_hash,
    }
    if leader:
        labels.update(serving_selector(spec))
    meta = metadata(spec, group_pod_name(spec.name, group, rank), **labels)
    meta["annotations"] = template_annotations(checkpoint, config_hash)
    body_spec = {
        **pod_spec(spec, checkpoint, container),
        # The group, not the kubelet, restarts: one rank restarting alone cannot rejoin msrun.
        "restartPolicy": "Never",
        "hostname": group_pod_name(spec.name, group, rank),
        "subdomain": group_service_name(spec.name, group),
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body_spec}


def group_template_hash(spec: InferenceSpec, checkpoint: ResolvedCheckpoint, config_hash: str) -> str:
    """Hash of everything a group's pods are built from (the same for every group of one spec)."""
    pods = [_group_pod(spec, checkpoint, 0, rank, config_hash, "") for rank in range(spec.nodes_per_replica)]
    return stable_hash(pods)


def build_group_pod(
    spec: InferenceSpec, checkpoint: ResolvedCheckpoint, group: int, rank: int, config_hash: str
) -> dict[str, Any]:
    return _group_pod(spec, checkpoint, group, rank, config_hash, group_template_hash(spec, checkpoint, config_hash))


# --- observing and planning ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupPod:
    """The few facts about a group pod the planner reads."""

    name: str
    group: int
    rank: int
    phase: str
    ready: bool
    deleting: bool
    template_hash: str

    @property
    def broken(self) -> bool:
        """Finished (a server never exits on its own), lost, or going away: the group cannot serve."""
        return self.deleting or self.phase in ("Failed", "Succeeded", "Unknown")

    @classmethod
    def from_body(cls, pod: Mapping[str, Any]) -> GroupPod:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        status = pod.get("status") or {}
        ready = any(
            cond.get("type") == "Ready" and cond.get("status") == "True" for cond in status.get("conditions") or []
        )
        return cls(
            name=meta["name"],
            group=int(labels.get(ic.LABEL_GROUP_INDEX, "-1")),
            rank=int(labels.get(ic.LABEL_WORKER_INDEX, "-1")),
            phase=status.get("phase") or "Pending",
            ready=ready and status.get("phase") == "Running",
            deleting=bool(meta.get("deletionTimestamp")),
            template_hash=labels.get(ic.LABEL_TEMPLATE_HASH, ""),
        )


@dataclasses.dataclass
class GroupPlan:
    """Decisions for one pass, and the counts the status reports."""

    create: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (group, rank)
    delete: list[str] = dataclasses.field(default_factory=list)  # pod names
    recreated: list[int] = dataclasses.field(default_factory=list)  # groups torn down after a failure, this pass
    restarting: list[int] = dataclasses.field(default_factory=list)  # groups on the current spec, not serving yet
    rolled: list[int] = dataclasses.field(default_factory=list)  # groups torn down to run the new spec
    replicas: int = 0  # groups with at least one pod
    ready: int = 0  # groups whose every pod is Running and ready
    updated: int = 0  # complete groups running the current template
    messages: list[str] = dataclasses.field(default_factory=list)
    ready_groups: list[int] = dataclasses.field(default_factory=list)  # every pod Running and ready
    backing_off: dict[int, float] = dataclasses.field(default_factory=dict)  # group -> seconds until it is created


def plan_groups(
    spec: InferenceSpec,
    pods: Iterable[GroupPod],
    template_hash: str,
    not_before: Mapping[int, datetime] | None = None,
    now: datetime | None = None,
) -> GroupPlan:
    """Create missing groups, recreate broken ones whole, roll outdated ones one at a time, drop extra ones.

    `not_before`: groups torn down after a failure that may be created again only from that time (the backoff of
    `update_group_backoff`); `now` is the caller's clock."""
    plan = GroupPlan()
    not_before = not_before or {}
    size = spec.nodes_per_replica
    groups: dict[int, list[GroupPod]] = {}
    for pod in pods:
        groups.setdefault(pod.group, []).append(pod)

    def tear_down(members: list[GroupPod]) -> None:
        plan.delete.extend(pod.name for pod in members if not pod.deleting)

    healthy_outdated: list[int] = []
    disrupted = 0  # groups (within replicas) not ready: being created, recreated or starting
    for group in sorted(groups):
        members = groups[group]
        if group >= spec.replicas or group < 0:
            tear_down(members)  # scaled down (or a pod without a valid index)
            continue
        plan.replicas += 1
        ranks = {pod.rank for pod in members}
        missing = [rank for rank in range(size) if rank not in ranks]
        extra = [pod for pod in members if pod.rank < 0 or pod.rank >= size]
        outdated = any(pod.template_hash != template_hash for pod in members)
        if not missing and not extra and all(pod.ready and not pod.broken for pod in members):
            plan.ready += 1
            plan.ready_groups.append(group)
            if outdated:
                healthy_outdated.append(group)
            else:
                plan.updated += 1
            continue
        disrupted += 1
        if all(pod.deleting or pod.broken for pod in members) and any(pod.deleting for pod in members):
            plan.messages.append(f"group {group}: waiting for its old pods to terminate")
            if not outdated:  # torn down after a failure, not for a new spec
                plan.restarting.append(group)
                plan.updated += 1
            continue  # created again once every old pod is gone
        failed = [pod for pod in members if pod.broken] + extra
        started = any(pod.phase == "Running" for pod in members)
        if failed or (missing and started):
            cause = (
                f"pod {failed[0].name} {'deleted' if failed[0].deleting else failed[0].phase}"
                if failed
                else f"rank {missing[0]} pod missing"
            )
            plan.messages.append(f"group {group}: {cause}; recreating the whole group")
            tear_down(members)
            plan.recreated.append(group)
            plan.restarting.append(group)
            continue
        if outdated:
            tear_down(members)  # not serving yet: replace it with the new spec straight away
            plan.rolled.append(group)
            continue
        plan.updated += 1  # starting on the current spec
        plan.create.extend((group, rank) for rank in missing)

    for group in range(spec.replicas):
        if group not in groups:
            disrupted += 1
            wait_until = not_before.get(group)
            if wait_until is not None and now is not None and now < wait_until:
                plan.backing_off[group] = (wait_until - now).total_seconds()
                plan.restarting.append(group)
                continue
            plan.create.extend((group, rank) for rank in range(size))
    # Rolling update: one ready group at a time, and only while every other group serves.
    if healthy_outdated and disrupted == 0:
        group = healthy_outdated[0]
        tear_down(groups[group])
        plan.rolled.append(group)
    return plan


# --- recreation backoff ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupBackoff:
    """A group that failed `failures` times in a row; it is created again from `next_attempt` on."""

    group: int
    failures: int
    next_attempt: datetime

    def as_status(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "failures": self.failures,
            "nextAttemptTime": to_timestamp(self.next_attempt),
        }


def read_group_backoff(status: Mapping[str, Any]) -> dict[int, GroupBackoff]:
    """`status.groupBackoff` as written by `GroupBackoff.as_status` (entries it cannot read are dropped)."""
    entries: dict[int, GroupBackoff] = {}
    for raw in status.get("groupBackoff") or []:
        try:
            when = from_timestamp(str(raw["nextAttemptTime"]))
            if when is None:
                continue
            entries[int(raw["group"])] = GroupBackoff(int(raw["group"]), int(raw["failures"]), when)
        except (KeyError, TypeError, ValueError):
            continue
    return entries


def update_group_backoff(
    entries: Mapping[int, GroupBackoff],
    plan: GroupPlan,
    replicas: int,
    now: datetime,
    delay: Any,
    stable_seconds: float,
) -> dict[int, GroupBackoff]:
    """After a pass: a group recreated after a failure waits `delay(failures)` seconds (failures in a row, so
    base, 2x base, 4x base ... capped: the finetune's restart backoff) before it is created again. A group that is
    ready `stable_seconds` after its last recreation starts over from zero (like the kubelet's crash-loop backoff:
    a server that dies a minute after it came up is still crash-looping); groups scaled away are forgotten."""
    updated = {group: entry for group, entry in entries.items() if group < replicas}
    for group in plan.ready_groups:
        if group in updated and now >= updated[group].next_attempt + timedelta(seconds=stable_seconds):
            del updated[group]
    for group in plan.recreated:
        failures = (updated[group].failures if group in updated else 0) + 1
        updated[group] = GroupBackoff(group, failures, now + timedelta(seconds=float(delay(failures))))
    return updated


def backoff_message(entries: Mapping[int, GroupBackoff], plan: GroupPlan) -> str:
    """What the crash-loop condition says: each waiting group, its failures in a row and its next attempt."""
    parts = []
    for group in sorted(set(plan.backing_off) | set(plan.recreated)):
        entry = entries.get(group)
        if entry is None:
            continue
        # An absolute time: the message (and so the status) stays the same on every pass while the group waits.
        when = entry.as_status()["nextAttemptTime"]
        parts.append(f"group {group} failed {entry.failures} time(s) in a row; recreating it at {when}")
    return "; ".join(parts)
