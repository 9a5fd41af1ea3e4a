"""TeleChatFinetune: thin kopf glue. Watch events trigger a keyed reconcile; the decisions live in `status.py`.

One pass: read the job and its pods (fresh, from the API), decide (pure), then apply the plan in the order
`apply_plan` documents: creates, status, deletes, Events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
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
        defer_count_only_update(key, old_status, plan)
        if apply_plan(job, spec, old_status, plan):
            last_status_write[key] = time.monotonic()
        states.observe(key, plan.status.get("state"))
    if plan.requeue_after is not None:
        return min(plan.requeue_after, config.resync_seconds)
    return config.resync_seconds


# When each job's status was last written: pod-count-only updates are batched (see defer_count_only_update).
last_status_write: dict[Hashable, float] = {}


def defer_count_only_update(key: Hashable, old_status: Mapping[str, Any], plan: Plan) -> None:
    """A status change that is only `status.pods` (a pod went Pending -> Running) waits until
    `status_counts_seconds` after the previous write: a 64-node job then costs a few writes, not 128, and the
    job's watchers (including this operator) see a handful of events instead of a storm."""
    if set(status_patch(old_status, plan.status)) != {"pods"}:
        return
    wait = config.status_counts_seconds - (time.monotonic() - last_status_write.get(key, float("-inf")))
    if wait > 0:
        plan.status["pods"] = old_status.get("pods")
        plan.requeue(wait)


def apply_plan(job: Mapping[str, Any], spec: FinetuneSpec | None, old_status: Mapping[str, Any], plan: Plan) -> bool:
    """Creates, then the status, then deletes, then Events.

    Creating before writing the status is safe because every name derives from the stored status (a crash in
    between re-creates the same names: 409); deleting after it records the intent first (a crash in between
    re-derives the same deletes and never counts a restart twice).
    """
    meta = job["metadata"]
    started = time.monotonic()
    if spec is not None:
        try:
            create_children(spec, plan)
        except k8s.ApiError as err:
            if err.status not in (400, 422):
                raise
            # The apiserver rejected a child built from this spec (e.g. a malformed volume): not retryable.
            invalid = invalid_spec_plan(
                plan.status, SpecError("spec (pod template)", err.message), spec.generation, datetime.now(UTC)
            )
            invalid.events[:0] = plan.events
            plan = invalid
    patch = status_patch(old_status, plan.status)
    if patch:
        k8s.patch_finetune_status(meta["namespace"], meta["name"], patch)
    count_transitions(old_status, plan.status)
    for pod_name in plan.delete_pods:
        k8s.delete_pod(meta["namespace"], pod_name)
    for event in plan.events:
        k8s.post_event(job, event.type, event.reason, event.message)
    if patch or plan.create_ranks or plan.create_merge or plan.delete_pods:
        logger.info(
            "%s/%s: state=%s attempt=%s created ranks %s%s, deleted %s, status %s (%.0f ms)",
            meta["namespace"],
            meta["name"],
            plan.status.get("state"),
            plan.status.get("attempt"),
            plan.create_ranks,
            f" and merge pod {plan.create_merge}" if plan.create_merge else "",
            plan.delete_pods,
            sorted(patch),
            1000 * (time.monotonic() - started),
        )
    return bool(patch)


def create_children(spec: FinetuneSpec, plan: Plan) -> None:
    """Every object of the pass at once: pods need not wait for their ConfigMap (the kubelet does)."""
    attempt = int(plan.status["attempt"])
    creations: list[Callable[[], object]] = []
    if plan.ensure_children:
        config_map = build_config_map(spec)
        creations.append(lambda: k8s.create_or_patch(config_map, {"data": config_map["data"]}))
        creations.append(lambda: k8s.create(build_service(spec)))
        if spec.gang_scheduled:
            creations.append(lambda: k8s.create(build_pod_group(spec)))
    for rank in plan.create_ranks:
        pod = build_rank_pod(spec, rank, attempt)
        creations.append(lambda pod=pod: k8s.create(pod))
    if plan.create_merge is not None:
        metrics.MERGES.labels(kind=KIND).inc()
        merge_pod = build_merge_pod(spec, plan.create_merge)
        creations.append(lambda: k8s.create(merge_pod))
    if len(creations) == 1:
        creations[0]()
    elif creations:
        with ThreadPoolExecutor(max_workers=min(config.create_workers, len(creations))) as pool:
            for future in [pool.submit(create) for create in creations]:
                future.result()  # re-raises the first failure after all were attempted


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
        last_status_write.pop((namespace, name), None)
        states.observe((namespace, name), None)
        return
    queue.trigger((namespace, name))


@kopf.on.event("v1", "pods", labels={c.LABEL_OWNER_KIND: KIND, c.LABEL_JOB_NAME: kopf.PRESENT})
async def pod_changed(labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    queue.trigger((namespace, labels[c.LABEL_JOB_NAME]))
