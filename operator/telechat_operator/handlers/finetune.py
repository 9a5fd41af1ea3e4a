"""TeleChatFinetune: thin kopf glue. Watch events trigger a keyed reconcile; the decisions live in `status.py`.

One pass: read the job and its pods (fresh, from the API), decide (pure), then apply the plan in the order
`status.py` documents: status first, then deletes, then creates, then Events.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf

from telechat_operator import constants as c
from telechat_operator import k8s, metrics
from telechat_operator.builders.configmap import build_config_map
from telechat_operator.builders.podgroup import build_pod_group
from telechat_operator.builders.pods import build_merge_pod, build_rank_pod
from telechat_operator.builders.service import build_service
from telechat_operator.settings import OperatorConfig
from telechat_operator.spec import FinetuneSpec, SpecError, parse
from telechat_operator.status import Backoff, Plan, PodView, invalid_spec_plan, reconcile
from telechat_operator.workqueue import WorkQueue

logger = logging.getLogger(__name__)
KIND = c.FINETUNE_KIND

config = OperatorConfig.from_env()
states = metrics.StateTracker(KIND)


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Merge-patch turning `old` into `new` at the top level of status (removed keys become null)."""
    patch: dict[str, Any] = {key: value for key, value in new.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in new})
    return patch


def owned_by(pod: Mapping[str, Any], uid: str) -> bool:
    """Ignore pods left over from a deleted job of the same name (garbage collection may lag)."""
    return any(ref.get("uid") == uid for ref in pod["metadata"].get("ownerReferences") or [])


def reconcile_finetune(key: Hashable) -> float | None:
    namespace, name = key  # type: ignore[misc]
    with metrics.RECONCILE_SECONDS.labels(kind=KIND).time():
        job = k8s.get_finetune(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            # Gone or going (owner references let the garbage collector remove the children): nothing to start.
            states.observe(key, None)
            return None
        old_status = job.get("status") or {}
        now = datetime.now(UTC)
        try:
            spec = parse(job)
        except SpecError as err:
            plan = invalid_spec_plan(old_status, err, int(job["metadata"].get("generation", 1)), now)
            spec = None
        else:
            pods = [
                PodView.from_body(pod)
                for pod in k8s.list_pods(namespace, {c.LABEL_JOB_NAME: name, c.LABEL_OWNER_KIND: KIND})
                if owned_by(pod, spec.uid)
            ]
            plan = reconcile(
                spec, old_status, pods, now, Backoff(config.backoff_base_seconds, config.backoff_max_seconds)
            )
        apply_plan(job, spec, old_status, plan)
        states.observe(key, plan.status.get("state"))
    if plan.requeue_after is not None:
        return min(plan.requeue_after, config.resync_seconds)
    return config.resync_seconds


def apply_plan(job: Mapping[str, Any], spec: FinetuneSpec | None, old_status: Mapping[str, Any], plan: Plan) -> None:
    meta = job["metadata"]
    patch = status_patch(old_status, plan.status)
    if patch:
        k8s.patch_finetune_status(meta["namespace"], meta["name"], patch)
    count_transitions(old_status, plan.status)
    for pod_name in plan.delete_pods:
        k8s.delete_pod(meta["namespace"], pod_name)
    if spec is not None:
        try:
            create_children(spec, plan)
        except k8s.ApiError as err:
            if err.status not in (400, 422):
                raise
            # The apiserver rejected a child built from this spec (e.g. a malformed volume): not retryable.
            field = "spec (pod template)" if plan.create_ranks or plan.create_merge else "spec"
            invalid = invalid_spec_plan(plan.status, SpecError(field, err.message), spec.generation, datetime.now(UTC))
            k8s.patch_finetune_status(meta["namespace"], meta["name"], status_patch(plan.status, invalid.status))
            plan.events.extend(invalid.events)
    for event in plan.events:
        k8s.post_event(job, event.type, event.reason, event.message)


def create_children(spec: FinetuneSpec, plan: Plan) -> None:
    if plan.ensure_children:
        config_map = build_config_map(spec)
        k8s.create_or_patch(config_map, {"data": config_map["data"]})
        k8s.create(build_service(spec))
        if spec.gang_scheduled:
            k8s.create(build_pod_group(spec))
    attempt = int(plan.status["attempt"])
    pods = [build_rank_pod(spec, rank, attempt) for rank in plan.create_ranks]
    if len(pods) > 1:
        with ThreadPoolExecutor(max_workers=min(config.create_workers, len(pods))) as pool:
            list(pool.map(k8s.create, pods))  # list() re-raises the first failure
    elif pods:
        k8s.create(pods[0])
    if plan.create_merge is not None:
        metrics.MERGES.labels(kind=KIND).inc()
        k8s.create(build_merge_pod(spec, plan.create_merge))


def count_transitions(old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    if int(new.get("restarts", 0)) > int(old.get("restarts", 0)):
        metrics.RESTARTS.labels(kind=KIND).inc()
    state = new.get("state")
    if state in c.TERMINAL_STATES and old.get("state") != state:
        metrics.JOBS_FINISHED.labels(kind=KIND, state=state).inc()


queue = WorkQueue(KIND, reconcile_finetune, workers=config.reconcile_workers)


@kopf.on.event(c.GROUP, c.VERSION, c.FINETUNE_PLURAL)
async def finetune_changed(type: str | None, name: str, namespace: str, **_: Any) -> None:
    if type == "DELETED":
        queue.forget((namespace, name))
        states.observe((namespace, name), None)
        return
    queue.trigger((namespace, name))


@kopf.on.event("v1", "pods", labels={c.LABEL_OWNER_KIND: KIND, c.LABEL_JOB_NAME: kopf.PRESENT})
async def pod_changed(labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    queue.trigger((namespace, labels[c.LABEL_JOB_NAME]))
