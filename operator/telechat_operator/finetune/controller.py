"""TeleChatFinetune: the controller's glue. Watch events trigger a keyed reconcile; the decisions are pure
(`decide.py`, `status.py`).

One pass: read the job (from the API) and its pods (from the apiserver's watch cache, see `pod_versions`), decide
(pure), then apply the plan in the order `apply_plan` documents: creates, status, deletes, Events. A job never
reconciled starts from its watch event instead (see `unstarted_jobs`).

`FinetuneController` holds every piece of per-job memory the passes and the watch handlers share; the kopf
handlers (`handlers.py`) delegate to one instance.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from telechat_operator import k8s
from telechat_operator.common import constants as c
from telechat_operator.common import metrics
from telechat_operator.common.conditions import Backoff
from telechat_operator.common.objects import Written, is_echo, json_copy, status_patch
from telechat_operator.common.refusals import (
    RefusalTracker,
    clear_refused,
    is_spec_error,
    mark_refused,
    refusal_message,
)
from telechat_operator.common.settings import OperatorConfig
from telechat_operator.common.spec import SpecError
from telechat_operator.common.workqueue import WorkQueue
from telechat_operator.finetune import decide as decisions
from telechat_operator.finetune.configmap import build_config_map
from telechat_operator.finetune.initializer import build_init_pod
from telechat_operator.finetune.podgroup import build_pod_group
from telechat_operator.finetune.pods import build_merge_pod, build_rank_pod
from telechat_operator.finetune.progress_poll import ProgressPoller, progress_url
from telechat_operator.finetune.service import build_service
from telechat_operator.finetune.spec import FinetuneSpec
from telechat_operator.finetune.status import Plan, invalid_spec_plan, mark_launched, pod_blocker, rests_on_absence

logger = logging.getLogger(__name__)
KIND = c.FINETUNE_KIND

# Latency tracing for profiling (TELECHAT_OPERATOR_TRACE=1): one INFO line with the wall clock per step of a pass,
# so a benchmark can line the operator's steps up against its own apply and Running timestamps.
TRACE = os.environ.get("TELECHAT_OPERATOR_TRACE", "") not in ("", "0")


def trace(key: Hashable, step: str) -> None:
    if TRACE:
        logger.info("trace %s %s %.6f", "/".join(key), step, time.time())  # type: ignore[arg-type]


# Pod facts of a pod that only progressed (created, then Running): the longer settle (see pod_event).
PROGRESS_FACTS = (("Pending", False, None), ("Running", False, None))


def job_going(err: k8s.ApiError, namespace: str, name: str) -> bool:
    """A refusal because the job, or its namespace, was deleted mid-pass: nothing to retry."""
    if err.status == 404:
        return f'namespaces "{namespace}" not found' in err.message or f'"{name}" not found' in err.message
    return err.status == 403 and "being terminated" in err.message


def log_failure(future: Future[object]) -> None:
    if future.exception() is not None:
        logger.warning("posting an Event failed: %s", future.exception())


class FinetuneController:
    """Reconciles TeleChatFinetunes; one instance per operator process (`handlers.controller`)."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.states = metrics.StateTracker(KIND)
        # Shared by all passes: concurrent API calls within one pass (the job and its pods; a group's pods).
        self.io_pool = ThreadPoolExecutor(max_workers=config.create_workers, thread_name_prefix="finetune-io")
        # Events go out one at a time on their own thread, like client-go's event broadcaster: best effort and
        # never ahead of (or crowding) the API calls that start pods.
        self.event_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-events")
        # The operator's event loop, for triggers from other threads (the progress poller's).
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self.progress_poller = ProgressPoller(
            config.progress_seconds,
            config.progress_timeout_seconds,
            on_change=self.trigger_from_thread,
            max_backoff=config.resync_seconds,
        )
        # What each job looks like after this operator's last status write: (generation, status). A watch event
        # carrying exactly that is the echo of our own write, and the pass that wrote it already acted on that
        # state. Recorded *before* the PATCH is sent: the watch often delivers the echo before the PATCH's response.
        self.own_status_writes: dict[Hashable, Written] = {}
        # Jobs this operator has never written a status for, as their latest watch event showed them. The first
        # pass starts from that body without reading the job or its pods: with no status every decision is a create
        # (409 if the pod exists, e.g. from a process that died before writing the status), and the status write is
        # conditional on the job's resourceVersion, so a job that changed meanwhile is simply reconciled again from
        # a fresh read. This is the pass whose latency a user waiting for pods sees.
        self.unstarted_jobs: dict[Hashable, dict[str, Any]] = {}
        # The newest resourceVersion seen on each job's pods, from their watch events. A pass reads the job's pods
        # from the apiserver's watch cache, at least this new: it shows every pod change that triggered the pass,
        # and costs no wait for etcd (see k8s.list_pods). The cache may trail writes not yet seen;
        # `rests_on_absence` says which decisions that could mislead, and those are taken again on a consistent
        # read. (Informer-based controllers read only a cache.)
        self.pod_versions: dict[Hashable, int] = {}
        # When each job's status was last written: pod-count-only updates are batched (see defer_count_only_update).
        self.last_status_write: dict[Hashable, float] = {}
        # Consecutive refusals per job (see `common.refusals`): the n-th waits like the n-th restart before the
        # next pass.
        self.refusals = RefusalTracker()
        # Last (phase, deleting, blocker) seen per pod: most pod updates (binding, IPs, conditions) change nothing a
        # job decides on, and skipping them keeps a 64-pod ramp from turning into hundreds of reconcile passes. The
        # blocker (Unschedulable, ImagePullBackOff, ...; see status.pod_blocker) is a fact: the job's Stalled
        # condition reports it.
        self.pod_facts: dict[str, tuple[str | None, bool, str | None]] = {}
        # (namespace, name) of pods being posted by this process; their first event (ADDED, Pending) starts no pass.
        self.posted_pods: set[tuple[str, str]] = set()
        self.queue = WorkQueue(KIND, self.reconcile, workers=config.reconcile_workers)

    # --- one pass ---------------------------------------------------------------------------------------------

    def reconcile(self, key: Hashable) -> float | None:
        """One pass for one job; returns when to look again (the work queue's requeue)."""
        namespace, name = key  # type: ignore[misc]
        trace(key, "pass-start")
        with metrics.RECONCILE_SECONDS.labels(kind=KIND).time():
            selector = {c.LABEL_JOB_NAME: name, c.LABEL_OWNER_KIND: KIND}
            job = self.unstarted_jobs.pop(key, None)
            if job is not None:  # never reconciled: start it from its watch event (see unstarted_jobs)
                pod_bodies: list[dict[str, Any]] = []
            else:
                seen = self.pod_versions.get(key)
                pods = self.io_pool.submit(
                    k8s.list_pods, namespace, selector, from_cache=True, not_older_than=str(seen) if seen else None
                )
                job = k8s.get_finetune(namespace, name)
                trace(key, "job-read")
                pod_bodies = pods.result()
            if job is None or job["metadata"].get("deletionTimestamp"):
                # Gone or going (owner references let the garbage collector remove the children): nothing to start.
                self.states.observe(key, None)
                return None
            old_status = job.get("status") or {}
            trace(key, "pods-listed")
            progress = self.latest_progress(key, old_status, pod_bodies)
            spec, plan = self.decide(job, old_status, pod_bodies, progress)
            if spec is not None and rests_on_absence(old_status, plan):  # the cache may trail: decide on a fresh list
                spec, plan = self.decide(job, old_status, k8s.list_pods(namespace, selector), progress)
            trace(key, "decided")
            self.defer_count_only_update(key, old_status, plan)
            try:
                if self.apply_plan(job, spec, old_status, plan):
                    self.last_status_write[key] = time.monotonic()
            except k8s.ApiError as err:
                if err.status == 409:  # started from a watch event the job has since moved past: read it, go again
                    logger.info("%s/%s: changed while starting; reconciling again", namespace, name)
                    return 0.0
                if job_going(err, namespace, name):
                    logger.info("%s/%s: the job or its namespace is being deleted: %s", namespace, name, err.message)
                    return None
                raise
            self.states.observe(key, plan.status.get("state"))
        if plan.requeue_after is not None:
            return min(plan.requeue_after, self.config.resync_seconds)
        return self.config.resync_seconds

    def decide(
        self,
        job: Mapping[str, Any],
        old_status: Mapping[str, Any],
        pod_bodies: list[dict[str, Any]],
        progress: Mapping[str, Any] | None = None,
    ) -> tuple[FinetuneSpec | None, Plan]:
        """`decide.decide` with this controller's clock and settings."""
        return decisions.decide(
            job,
            old_status,
            pod_bodies,
            progress,
            now=datetime.now(UTC),
            backoff=self.backoff(),
            allowed_host_paths=self.config.allowed_host_paths,
        )

    def backoff(self) -> Backoff:
        return Backoff(self.config.backoff_base_seconds, self.config.backoff_max_seconds)

    def latest_progress(self, key: Hashable, old_status: Mapping[str, Any], pod_bodies: list[dict[str, Any]]) -> Any:
        """The newest progress document rank 0 of the current attempt served, if any (never waits on the pod; see
        progress_poll). A job whose rank 0 does not run is dropped from polling."""
        url = None
        if old_status.get("state") not in c.TERMINAL_STATES:
            url = progress_url(int(old_status.get("attempt", 0) or 0), pod_bodies)
        if url is None:
            self.progress_poller.forget(key)
            return None
        return self.progress_poller.latest(key, url)

    def trigger_from_thread(self, key: Hashable) -> None:
        loop = self.event_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.queue.trigger, key)

    def is_own_echo(self, key: Hashable, body: Mapping[str, Any]) -> bool:
        """True for a job event that only echoes our last status write (the decisions read spec, status, deletion
        and the pods, never the job's labels or annotations)."""
        return is_echo(self.own_status_writes.get(key), body)

    def note_pod_version(self, key: Hashable, body: Mapping[str, Any]) -> None:
        try:
            version = int(body["metadata"]["resourceVersion"])
        except (KeyError, TypeError, ValueError):
            return  # not an etcd revision: reads fall back to "any cached state", still confirmed as above
        if version > self.pod_versions.get(key, 0):
            self.pod_versions[key] = version

    def defer_count_only_update(self, key: Hashable, old_status: Mapping[str, Any], plan: Plan) -> None:
        """A status change that is only `status.pods` (a pod went Pending -> Running) waits until
        `status_counts_seconds` after the previous write: a 64-node job then costs a few writes, not 128, and the
        job's watchers (including this operator) see a handful of events instead of a storm."""
        if set(status_patch(old_status, plan.status)) != {"pods"}:
            return
        since = time.monotonic() - self.last_status_write.get(key, float("-inf"))
        wait = self.config.status_counts_seconds - since
        if wait > 0:
            plan.status["pods"] = old_status.get("pods")
            plan.requeue(wait)

    # --- applying a plan --------------------------------------------------------------------------------------

    def apply_plan(
        self, job: Mapping[str, Any], spec: FinetuneSpec | None, old_status: Mapping[str, Any], plan: Plan
    ) -> bool:
        """Creates, then the status, then deletes, then Events.

        Creating before writing the status is safe because every name derives from the stored status (a crash in
        between re-creates the same names: 409); deleting after it records the intent first (a crash in between
        re-derives the same deletes and never counts a restart twice). A create the apiserver refuses is either an
        InvalidSpec (400/422: the spec must change) or a refusal (403 from admission, 500, ...; see `refuse`).
        """
        meta = job["metadata"]
        started = time.monotonic()
        key = (meta["namespace"], meta["name"])
        if spec is not None:
            try:
                if self.create_children(spec, plan):
                    plan.events += mark_launched(plan.status, spec, datetime.now(UTC))
                if plan.create_ranks or plan.create_merge is not None or plan.ensure_children:
                    self.refusals.succeeded(key)
                    clear_refused(plan.status, datetime.now(UTC), spec.generation)
            except k8s.ApiError as err:
                if err.status == 409 or job_going(err, meta["namespace"], meta["name"]):
                    raise
                if is_spec_error(err.status, err.message):
                    # The apiserver rejected a child built from this spec (e.g. a malformed volume or, with strict
                    # field validation, an unknown field): not retryable until the spec changes.
                    error = SpecError("spec (pod template)", err.describe())
                    invalid = invalid_spec_plan(plan.status, error, spec.generation, datetime.now(UTC))
                    invalid.events[:0] = plan.events
                    plan = invalid
                else:
                    self.refuse(key, spec, plan, err)
        patch = status_patch(old_status, plan.status)
        if patch:
            self.own_status_writes[key] = (int(meta.get("generation", 0)), json_copy(plan.status))
            try:
                # With no status yet, the pass may have started from a watch event rather than a read: the write
                # holds only if the job is still the version decided on (409 otherwise). Later writes need none.
                version = None if old_status else meta.get("resourceVersion")
                k8s.patch_finetune_status(meta["namespace"], meta["name"], patch, expected_version=version)
            except Exception:
                self.own_status_writes.pop(key, None)  # not written: an event with this status is not our echo
                raise
            trace(key, "status-patched")
        count_transitions(old_status, plan.status)
        for pod_name in plan.delete_pods:
            k8s.delete_pod(meta["namespace"], pod_name)
        for pod_name in plan.stop_pods:
            k8s.stop_pod(meta["namespace"], pod_name)
        for event in plan.events:  # best effort and off the pass's path: the status already says it all
            posted = self.event_pool.submit(k8s.post_event, KIND, job, event.type, event.reason, event.message)
            posted.add_done_callback(log_failure)
        if patch or plan.create_ranks or plan.create_merge or plan.delete_pods or plan.stop_pods:
            logger.info(
                "%s/%s: state=%s attempt=%s created ranks %s%s, deleted %s%s, status %s (%.0f ms)",
                meta["namespace"],
                meta["name"],
                plan.status.get("state"),
                plan.status.get("attempt"),
                plan.create_ranks,
                f" and merge pod {plan.create_merge}" if plan.create_merge else "",
                plan.delete_pods,
                f", stopped {plan.stop_pods}" if plan.stop_pods else "",
                sorted(patch),
                1000 * (time.monotonic() - started),
            )
        return bool(patch)

    def refuse(self, key: Hashable, spec: FinetuneSpec, plan: Plan, err: k8s.ApiError) -> None:
        """A create the apiserver refused for a reason other than the spec (403 from admission, 500, ...): say so in
        the status and look again after a backoff.

        Writing the plan's status although not every child exists is safe: names derive from the stored status,
        and ranks of an attempt not yet launched are created on the next pass (as after a crash between create and
        write)."""
        count, delay = self.refusals.refused(key, self.backoff())
        message = refusal_message(err.describe(), count, delay)
        event = mark_refused(plan.status, message, datetime.now(UTC), spec.generation)
        if event is not None:
            plan.events.append(event)
        plan.requeue_after = delay  # this long, whatever the plan asked for: nothing else can progress meanwhile
        logger.warning("%s/%s: %s; retrying in %gs", spec.namespace, spec.name, err.describe(), delay)

    def create_children(self, spec: FinetuneSpec, plan: Plan) -> bool:
        """The pods first, all at once, then (with the first group) the ConfigMap and Service: a pod needs those
        only once its container starts (the kubelet waits for its volumes), and meanwhile the scheduler can place
        it.

        Returns True when every rank pod asked for was newly created (201s, no 409)."""
        attempt = int(plan.status["attempt"])
        if plan.ensure_children and spec.gang_scheduled:
            k8s.create(build_pod_group(spec))  # before its pods: Volcano's admission looks the group up
        pods = [build_rank_pod(spec, rank, attempt) for rank in plan.create_ranks]
        if plan.create_merge is not None:
            metrics.MERGES.labels(kind=KIND).inc()
            pods.append(build_merge_pod(spec, plan.create_merge))
        if plan.create_init:
            pods.append(build_init_pod(spec))
        key = (spec.namespace, spec.name)
        trace(key, "pods-built")
        # Before posting: a pod's watch event can beat the create's reply.
        self.posted_pods.update((spec.namespace, pod["metadata"]["name"]) for pod in pods)
        created = self.run_all([lambda pod=pod: k8s.create(pod) for pod in pods])
        trace(key, "pods-posted")
        if plan.ensure_children:
            self.run_all([lambda: ensure_config_map(spec, plan.config_yaml), lambda: k8s.create(build_service(spec))])
            trace(key, "children-posted")
        ranks = len(plan.create_ranks)
        return ranks > 0 and all(result is True for result in created[:ranks])

    def run_all(self, calls: list[Callable[[], object]]) -> list[object]:
        """Run API calls concurrently on the shared pool; every call is attempted, then the first failure
        re-raised."""
        if len(calls) <= 1:
            return [call() for call in calls]
        futures = [self.io_pool.submit(call) for call in calls]
        return [future.result() for future in futures]

    # --- watch events -----------------------------------------------------------------------------------------

    def job_event(self, type: str | None, body: Mapping[str, Any], key: Hashable) -> None:
        """A TeleChatFinetune watch event: forget a deleted job, or trigger a pass unless it is our own echo."""
        self.event_loop = asyncio.get_running_loop()
        trace(key, f"watch-{type}")
        if type == "DELETED":
            self.forget(key)
            return
        if not body.get("status") and key not in self.own_status_writes:
            self.unstarted_jobs[key] = copy.deepcopy(dict(body))
        else:
            self.unstarted_jobs.pop(key, None)
        if self.is_own_echo(key, body):
            return  # the echo of our own status write: the pass that wrote it already acted on that state
        self.queue.trigger(key)

    def forget(self, key: Hashable) -> None:
        """Drop everything remembered about a deleted job."""
        self.unstarted_jobs.pop(key, None)
        self.refusals.succeeded(key)
        self.pod_versions.pop(key, None)
        self.own_status_writes.pop(key, None)
        self.progress_poller.forget(key)
        self.queue.forget(key)
        self.last_status_write.pop(key, None)
        self.states.observe(key, None)

    def pod_event(self, type: str | None, body: Mapping[str, Any], key: Hashable, namespace: str, uid: str) -> None:
        """A rank, merge or initializer pod's watch event: trigger a settled pass when a fact the job decides on
        changed."""
        self.note_pod_version(key, body)
        ours = (namespace, body["metadata"]["name"]) in self.posted_pods
        self.posted_pods.discard((namespace, body["metadata"]["name"]))
        if type == "DELETED":
            self.pod_facts.pop(uid, None)
        else:
            blocker = pod_blocker(body)
            facts = (
                (body.get("status") or {}).get("phase"),
                bool(body["metadata"].get("deletionTimestamp")),
                blocker[0] if blocker else None,
            )
            if self.pod_facts.get(uid) == facts:
                return
            self.pod_facts[uid] = facts
            if type == "ADDED" and ours and facts == ("Pending", False, None):
                return  # a pod this operator just created, as created: the pass that posted it knows
        # A group's pods change together: a settle turns a burst of their events into one pass. Failures, deletions
        # and ends are acted on after the short one; pods that only progressed wait the longer one (an earlier timer
        # wins).
        progressed = type != "DELETED" and self.pod_facts.get(uid) in PROGRESS_FACTS
        settle = self.config.pod_progress_settle_seconds if progressed else self.config.pod_event_settle_seconds
        self.queue.trigger(key, delay=settle)


def ensure_config_map(spec: FinetuneSpec, rendered: str | None = None) -> None:
    """The ConfigMap, from the YAML `decide` rendered (rendered again only when a caller has none)."""
    config_map = build_config_map(spec) if rendered is None else build_config_map(spec, lambda _: rendered)
    k8s.create_or_patch(config_map, {"data": config_map["data"]})


def count_transitions(old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    if int(new.get("restarts", 0)) > int(old.get("restarts", 0)):
        metrics.RESTARTS.labels(kind=KIND).inc()
    state = new.get("state")
    if state in c.TERMINAL_STATES and old.get("state") != state:
        metrics.JOBS_FINISHED.labels(kind=KIND, state=state).inc()
