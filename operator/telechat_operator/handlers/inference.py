"""TeleChatInference: thin kopf glue. Watch events trigger a keyed reconcile; builders and status are pure.

One pass: read the inference (fresh), parse it, resolve the checkpoint (or wait for its TeleChatFinetune), keep
the ConfigMap, Service and workload (a Deployment, or groups of pods when a replica spans nodes) in step with the
spec, then write the status if it changed and post an Event per transition. Every write is idempotent: children
carry the hash of what they were built from and are written only when it changes; group pods have fixed names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf

from telechat2.configs import ConfigError
from telechat_operator import constants as c
from telechat_operator import inference_constants as ic
from telechat_operator import k8s, metrics
from telechat_operator.builders.inference import (
    build_config_map,
    build_deployment,
    build_service,
    children_selector,
    config_map_data,
    deployment_name,
    endpoint,
    selector_string,
    serving_selector,
    stable_hash,
)
from telechat_operator.builders.inference_groups import (
    GroupPod,
    backoff_message,
    build_group_pod,
    build_group_service,
    group_template_hash,
    plan_groups,
    read_group_backoff,
    update_group_backoff,
)
from telechat_operator.inference_spec import InferenceSpec, ResolvedCheckpoint, parse_inference, resolve_path_checkpoint
from telechat_operator.inference_status import (
    Gate,
    WorkloadView,
    compute_status,
    deployment_view,
    finetune_of,
    invalid_spec_status,
    refused_status,
    resolve_finetune_checkpoint,
    transition_events,
)
from telechat_operator.refusals import RefusalTracker, is_spec_error, refusal_message
from telechat_operator.settings import OperatorConfig
from telechat_operator.spec import SpecError
from telechat_operator.spec_common import check_host_paths
from telechat_operator.status import Backoff, Event
from telechat_operator.workqueue import WorkQueue

logger = logging.getLogger(__name__)
KIND = ic.INFERENCE_KIND
# While pods terminate (a group being recreated), look again this soon even if no event comes.
TEARDOWN_POLL_SECONDS = 2.0

config = OperatorConfig.from_env()
states = metrics.StateTracker(KIND)
# (namespace, finetune name) -> inferences serving it: a finetune event re-reconciles exactly those.
waiting_on: dict[tuple[str, str], set[str]] = {}
_finetune_by_inference: dict[tuple[str, str], tuple[str, str]] = {}
_routing_lock = threading.Lock()  # written from the event loop and from reconcile threads


def remember_finetune(namespace: str, name: str, finetune: str | None) -> None:
    key = (namespace, name)
    with _routing_lock:
        previous = _finetune_by_inference.pop(key, None)
        if previous is not None:
            waiting_on.get(previous, set()).discard(name)
        if finetune:
            _finetune_by_inference[key] = (namespace, finetune)
            waiting_on.setdefault((namespace, finetune), set()).add(name)


def inferences_serving(namespace: str, finetune: str) -> list[str]:
    with _routing_lock:
        return sorted(waiting_on.get((namespace, finetune), ()))


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Merge-patch turning `old` into `new` at the top level of status (removed keys become null)."""
    patch: dict[str, Any] = {key: value for key, value in new.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in new})
    return patch


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _hash_of(obj: Mapping[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("annotations", {}).get(ic.ANNOTATION_SPEC_HASH)


class Stale(Exception):
    """A child of the same name left by a deleted inference: deleted now, created on the next pass."""


def ensure(spec: InferenceSpec, desired: dict[str, Any]) -> dict[str, Any]:
    """Apply `desired` unless the live object already carries its hash (no write when nothing changed)."""
    meta = desired["metadata"]
    live = k8s.get_child(desired["kind"], meta["namespace"], meta["name"])
    if live is not None and not owned_by(live, spec.uid):
        labels = (live.get("metadata") or {}).get("labels") or {}
        if labels.get(c.LABEL_OWNER_KIND) != ic.INFERENCE_KIND:
            # Someone else's object: never touch it, tell the user instead.
            raise SpecError("metadata.name", f"{desired['kind']} {meta['name']} already exists and is not ours")
        k8s.delete_child(desired["kind"], meta["namespace"], meta["name"])
        raise Stale(f"{desired['kind']} {meta['name']} belonged to an older object of the same name")
    drifted = (
        desired["kind"] == "Deployment"
        and live is not None
        and ((live.get("spec") or {}).get("replicas") != desired["spec"]["replicas"])
    )
    if live is None or drifted or _hash_of(live) != _hash_of(desired):
        return k8s.apply(desired)
    return live


def resolve_checkpoint(spec: InferenceSpec) -> ResolvedCheckpoint | Gate:
    if spec.checkpoint_path is not None:
        return resolve_path_checkpoint(spec)
    assert spec.from_finetune is not None
    return resolve_finetune_checkpoint(spec, k8s.get_finetune(spec.namespace, spec.from_finetune))


def reconcile_deployment(spec: InferenceSpec, checkpoint: ResolvedCheckpoint, config_hash: str) -> WorkloadView:
    _remove_groups(spec)
    deployment = ensure(spec, build_deployment(spec, checkpoint, config_hash))
    return deployment_view(deployment, spec.replicas)


def _group_children(kind: str, spec: InferenceSpec) -> list[dict[str, Any]]:
    selector = selector_string(children_selector(spec.name)) + f",{ic.LABEL_GROUP_INDEX}"
    return [obj for obj in k8s.list_children(kind, spec.namespace, selector) if owned_by(obj, spec.uid)]


def _remove_groups(spec: InferenceSpec) -> None:
    """Switching from multi-node to single-node replicas: drop the groups and their Services."""
    for pod in _group_children("Pod", spec):
        if not pod["metadata"].get("deletionTimestamp"):
            k8s.delete_pod(spec.namespace, pod["metadata"]["name"])
    for service in _group_children("Service", spec):
        k8s.delete_child("Service", spec.namespace, service["metadata"]["name"])


@dataclasses.dataclass
class GroupsOutcome:
    """What a pass over multi-node groups observed and decided, for the status and the requeue."""

    workload: WorkloadView
    recreated: int  # groups torn down after a failure in this pass
    backoff: list[dict[str, Any]]  # status.groupBackoff
    wake: float | None  # look again this soon: pods terminate, or a group's backoff ends


def reconcile_groups(
    spec: InferenceSpec,
    checkpoint: ResolvedCheckpoint,
    config_hash: str,
    events: list[Event],
    old: Mapping[str, Any],
    now: datetime,
) -> GroupsOutcome:
    """Multi-node replicas: create, recreate (after a backoff) and roll groups; count them."""
    deployment = k8s.get_child("Deployment", spec.namespace, deployment_name(spec.name))
    if deployment is not None and owned_by(deployment, spec.uid):
        k8s.delete_child("Deployment", spec.namespace, deployment_name(spec.name))  # was single-node until now
    template_hash = group_template_hash(spec, checkpoint, config_hash)
    pods = [GroupPod.from_body(pod) for pod in _group_children("Pod", spec)]
    previous = read_group_backoff(old)
    plan = plan_groups(spec, pods, template_hash, {g: e.next_attempt for g, e in previous.items()}, now)
    backoff = Backoff(config.backoff_base_seconds, config.backoff_max_seconds)
    stable = config.group_stable_seconds
    entries = update_group_backoff(previous, plan, spec.replicas, now, backoff.delay, stable)

    services = {int(s["metadata"]["labels"][ic.LABEL_GROUP_INDEX]): s for s in _group_children("Service", spec)}
    for group, service in services.items():
        if group >= spec.replicas:
            k8s.delete_child("Service", spec.namespace, service["metadata"]["name"])
    for group in range(spec.replicas):
        if group not in services:
            k8s.create(build_group_service(spec, group))

    for name in plan.delete:
        k8s.delete_pod(spec.namespace, name)
    bodies = [build_group_pod(spec, checkpoint, group, rank, config_hash) for group, rank in plan.create]
    if len(bodies) > 1:
        with ThreadPoolExecutor(max_workers=min(config.create_workers, len(bodies))) as pool:
            list(pool.map(k8s.create, bodies))  # list() re-raises the first failure
    elif bodies:
        k8s.create(bodies[0])

    for group in plan.recreated:
        message = next((m for m in plan.messages if m.startswith(f"group {group}:")), f"group {group} recreated")
        wait = (entries[group].next_attempt - now).total_seconds()
        events.append(Event("Warning", "GroupRecreated", f"{message} in {wait:g}s"))
    for group in plan.rolled:
        events.append(Event("Normal", "GroupRolled", f"group {group}: recreating it with the current spec"))
    waiting = set(plan.backing_off) | set(plan.recreated)
    waiting_message = backoff_message(entries, plan)
    workload = WorkloadView(
        desired=spec.replicas,
        replicas=plan.replicas,
        ready=plan.ready,
        updated=plan.updated,
        recreating=bool(plan.restarting),
        message="; ".join([*plan.messages, waiting_message] if waiting_message else plan.messages),
        crash_looping=any(entries[g].failures >= 2 for g in waiting if g in entries),
    )
    terminating = bool(plan.delete) or any(pod.deleting for pod in pods)
    wakes = [TEARDOWN_POLL_SECONDS] if terminating else []
    wakes += [max(seconds, 0.5) for seconds in plan.backing_off.values()]
    # A ready group still in backoff: look again when it has been stable long enough to clear it.
    wakes += [
        max((entries[g].next_attempt - now).total_seconds() + stable, 0.5) for g in plan.ready_groups if g in entries
    ]
    return GroupsOutcome(
        workload=workload,
        recreated=len(plan.recreated),
        backoff=[entries[group].as_status() for group in sorted(entries)],
        wake=min(wakes, default=None),
    )


def reconcile_inference(key: Hashable) -> float | None:
    namespace, name = key  # type: ignore[misc]
    with metrics.RECONCILE_SECONDS.labels(kind=KIND).time():
        body = k8s.get_inference(namespace, name)
        if body is None:
            states.observe(key, None)
            remember_finetune(namespace, name, None)
            return None
        remember_finetune(namespace, name, finetune_of(body))
        old = body.get("status") or {}
        generation = int(body["metadata"].get("generation", 1))
        selector = selector_string({ic.LABEL_INFERENCE_NAME: name, ic.LABEL_SERVING: "true"})
        now = datetime.now(UTC)
        events: list[Event] = []
        requeue: float | None = config.resync_seconds
        try:
            spec = parse_inference(body)
            check_host_paths(spec.volumes, config.allowed_host_paths)
            new, restarts, wake = _reconcile_spec(spec, old, now, events)
        except Stale as err:
            logger.info("%s/%s: %s", namespace, name, err)
            return 1.0
        except k8s.ApiError as err:
            if is_spec_error(err.status, err.message):
                new = invalid_spec_status(
                    old, generation=generation, now=now, selector=selector, error=_why_invalid(err)
                )
            else:  # 403 from admission, 500 from an apply, ...: say which object and why, retry with backoff
                count, requeue = refusals.refused(key, Backoff(config.backoff_base_seconds, config.backoff_max_seconds))
                message = refusal_message(err.describe(), count, requeue)
                logger.warning("%s/%s: %s", namespace, name, message)
                new = refused_status(old, generation=generation, now=now, selector=selector, message=message)
            restarts, wake = 0, None
        except (SpecError, ConfigError) as err:
            new = invalid_spec_status(old, generation=generation, now=now, selector=selector, error=_why_invalid(err))
            restarts, wake = 0, None
        else:
            refusals.succeeded(key)
        if wake is not None:
            requeue = wake if requeue is None else min(requeue, wake)
        patch = status_patch(old, new)
        if patch:
            own_status_writes[key] = (generation, json.loads(json.dumps(new, default=str)))
            try:
                k8s.patch_inference_status(namespace, name, patch)
            except Exception:
                own_status_writes.pop(key, None)  # not written: an event with this status is not our echo
                raise
        if restarts:
            metrics.RESTARTS.labels(kind=KIND).inc(restarts)
        for event in [*transition_events(old, new), *events]:
            k8s.post_event(KIND, body, event.type, event.reason, event.message)
        states.observe(key, _state(new))
    return requeue


def _reconcile_spec(
    spec: InferenceSpec, old: Mapping[str, Any], now: datetime, events: list[Event]
) -> tuple[dict[str, Any], int, float | None]:
    """The new status, the groups recreated in this pass, and how soon to look again (None: the resync)."""
    selector = selector_string(serving_selector(spec))
    resolved = resolve_checkpoint(spec)
    if isinstance(resolved, Gate):
        # Nothing to serve yet (or ever, for a failed finetune): no pods; running ones, if any, keep serving.
        status = compute_status(old, generation=spec.generation, now=now, selector=selector, gate=resolved)
        return status, 0, None
    data = config_map_data(spec, resolved)
    config_hash = stable_hash(data)
    ensure(spec, build_config_map(spec, data))
    ensure(spec, build_service(spec))
    restarts, wake, backoff = 0, None, None
    if spec.multi_node:
        outcome = reconcile_groups(spec, resolved, config_hash, events, old, now)
        workload, restarts, wake, backoff = outcome.workload, outcome.recreated, outcome.wake, outcome.backoff
    else:
        workload = reconcile_deployment(spec, resolved, config_hash)
    status = compute_status(
        old,
        generation=spec.generation,
        now=now,
        selector=selector,
        endpoint=endpoint(spec),
        checkpoint=resolved.path,
        workload=workload,
        group_restarts=restarts,
        group_backoff=backoff,
    )
    return status, restarts, wake


def _why_invalid(err: Exception) -> str:
    """InvalidSpec message: the field for a SpecError, the config for telechat2, the child for an apiserver 4xx."""
    if isinstance(err, ConfigError):
        return f"spec: telechat2 cannot render the predict config: {err}"
    if isinstance(err, k8s.ApiError):  # a malformed volume, or an unknown field (strict field validation)
        return f"spec: the apiserver rejected a child built from it: {err.describe()}"
    return str(err)


def _state(status: Mapping[str, Any]) -> str:
    """One word for the metrics gauge: Ready, or the reason it is not."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == ic.COND_READY:
            return "Ready" if cond.get("status") == "True" else str(cond.get("reason") or "NotReady")
    return "Unknown"


queue = WorkQueue(KIND, reconcile_inference, workers=config.reconcile_workers)
# Consecutive API refusals per inference (see `refusals`): the n-th waits like the finetune's n-th restart.
refusals = RefusalTracker()
# Each inference's status as this operator last wrote it, with the generation: a watch event carrying exactly that is
# our own write's echo, and reconciling it again would only cut a refusal's backoff short (as for the finetune).
own_status_writes: dict[Hashable, tuple[int, dict[str, Any]]] = {}


def is_own_echo(key: Hashable, body: Mapping[str, Any]) -> bool:
    written = own_status_writes.get(key)
    meta = body.get("metadata") or {}
    if written is None or meta.get("deletionTimestamp"):
        return False
    return written == (int(meta.get("generation", 0)), body.get("status") or {})


@kopf.on.startup()
def watch_only_our_deployments(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Server-side filter: the Deployment watch sees only Deployments this operator created."""
    settings.watching.label_selectors["apps", "deployments"] = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY_VALUE}"


@kopf.on.event(c.GROUP, c.VERSION, ic.INFERENCE_PLURAL)
async def inference_changed(type: str | None, body: Mapping[str, Any], name: str, namespace: str, **_: Any) -> None:
    if type == "DELETED":
        queue.forget((namespace, name))
        states.observe((namespace, name), None)
        remember_finetune(namespace, name, None)
        refusals.succeeded((namespace, name))
        own_status_writes.pop((namespace, name), None)
        return
    remember_finetune(namespace, name, finetune_of(body))
    if is_own_echo((namespace, name), body):
        return
    queue.trigger((namespace, name))


@kopf.on.event("v1", "pods", labels={c.LABEL_OWNER_KIND: KIND, ic.LABEL_INFERENCE_NAME: kopf.PRESENT})
async def inference_pod_changed(labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    queue.trigger((namespace, labels[ic.LABEL_INFERENCE_NAME]))


@kopf.on.event("apps", "v1", "deployments", labels={c.LABEL_OWNER_KIND: KIND, ic.LABEL_INFERENCE_NAME: kopf.PRESENT})
async def inference_deployment_changed(labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    queue.trigger((namespace, labels[ic.LABEL_INFERENCE_NAME]))


@kopf.on.event(c.GROUP, c.VERSION, c.FINETUNE_PLURAL)
async def finetune_changed_for_inference(name: str, namespace: str, **_: Any) -> None:
    """A finetune moved: the inferences waiting for (or serving) its checkpoint look again."""
    for inference in inferences_serving(namespace, name):
        queue.trigger((namespace, inference))
