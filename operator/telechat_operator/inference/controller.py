"""TeleChatInference: the controller's glue. Watch events trigger a keyed reconcile; the decisions are pure
(`plan.py`, `groups.py`, `status.py`).

One pass: read the inference (fresh), parse it, resolve the checkpoint (or wait for its TeleChatFinetune), read
the children, plan (pure), perform the plan's steps through `k8s.py`, then write the status if it changed and post
an Event per transition.

`InferenceController` holds what the passes and the watch handlers share (the finetune -> inference index, echo
tracking, refusal counts); the kopf handlers (`handlers.py`) delegate to one instance.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from telechat2.configs import ConfigError
from telechat_operator import k8s
from telechat_operator.common import metrics
from telechat_operator.common.conditions import Backoff, Event
from telechat_operator.common.objects import Written, is_echo, json_copy, selector_string, status_patch
from telechat_operator.common.refusals import RefusalTracker, is_spec_error, refusal_message
from telechat_operator.common.settings import OperatorConfig
from telechat_operator.common.spec import SpecError, check_host_paths
from telechat_operator.common.workqueue import WorkQueue
from telechat_operator.inference import constants as ic
from telechat_operator.inference.builders import config_map_data, config_map_name, deployment_name, service_name
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
from telechat_operator.inference.spec import InferenceSpec, parse_inference
from telechat_operator.inference.status import (
    Gate,
    finetune_of,
    invalid_spec_status,
    refused_status,
    transition_events,
)

logger = logging.getLogger(__name__)
KIND = ic.INFERENCE_KIND


class InferenceController:
    """Reconciles TeleChatInferences; one instance per operator process (`handlers.controller`)."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.states = metrics.StateTracker(KIND)
        # (namespace, finetune name) -> inferences serving it: a finetune event re-reconciles exactly those.
        self.waiting_on: dict[tuple[str, str], set[str]] = {}
        self.finetune_by_inference: dict[tuple[str, str], tuple[str, str]] = {}
        self.routing_lock = threading.Lock()  # written from the event loop and from reconcile threads
        # Consecutive API refusals per inference (see `common.refusals`): the n-th waits like the finetune's n-th
        # restart.
        self.refusals = RefusalTracker()
        # Each inference's status as this operator last wrote it, with the generation: a watch event carrying
        # exactly that is our own write's echo, and reconciling it again would only cut a refusal's backoff short
        # (as for the finetune).
        self.own_status_writes: dict[Hashable, Written] = {}
        self.queue = WorkQueue(KIND, self.reconcile, workers=config.reconcile_workers)

    # --- the finetune -> inference index ----------------------------------------------------------------------

    def remember_finetune(self, namespace: str, name: str, finetune: str | None) -> None:
        key = (namespace, name)
        with self.routing_lock:
            previous = self.finetune_by_inference.pop(key, None)
            if previous is not None:
                self.waiting_on.get(previous, set()).discard(name)
            if finetune:
                self.finetune_by_inference[key] = (namespace, finetune)
                self.waiting_on.setdefault((namespace, finetune), set()).add(name)

    def inferences_serving(self, namespace: str, finetune: str) -> list[str]:
        with self.routing_lock:
            return sorted(self.waiting_on.get((namespace, finetune), ()))

    def is_own_echo(self, key: Hashable, body: Mapping[str, Any]) -> bool:
        return is_echo(self.own_status_writes.get(key), body)

    def backoff(self) -> Backoff:
        return Backoff(self.config.backoff_base_seconds, self.config.backoff_max_seconds)

    # --- one pass ---------------------------------------------------------------------------------------------

    def reconcile(self, key: Hashable) -> float | None:
        namespace, name = key  # type: ignore[misc]
        with metrics.RECONCILE_SECONDS.labels(kind=KIND).time():
            body = k8s.get_inference(namespace, name)
            if body is None:
                self.states.observe(key, None)
                self.remember_finetune(namespace, name, None)
                return None
            self.remember_finetune(namespace, name, finetune_of(body))
            old = body.get("status") or {}
            generation = int(body["metadata"].get("generation", 1))
            selector = selector_string({ic.LABEL_INFERENCE_NAME: name, ic.LABEL_SERVING: "true"})
            now = datetime.now(UTC)
            events: list[Event] = []
            requeue: float | None = self.config.resync_seconds
            try:
                spec = parse_inference(body)
                check_host_paths(spec.volumes, self.config.allowed_host_paths)
                new, restarts, wake = self.reconcile_spec(spec, old, now, events)
            except Stale as err:
                logger.info("%s/%s: %s", namespace, name, err)
                return 1.0
            except k8s.ApiError as err:
                if is_spec_error(err.status, err.message):
                    new = invalid_spec_status(
                        old, generation=generation, now=now, selector=selector, error=why_invalid(err)
                    )
                else:  # 403 from admission, 500 from an apply, ...: say which object and why, retry with backoff
                    count, requeue = self.refusals.refused(key, self.backoff())
                    message = refusal_message(err.describe(), count, requeue)
                    logger.warning("%s/%s: %s", namespace, name, message)
                    new = refused_status(old, generation=generation, now=now, selector=selector, message=message)
                restarts, wake = 0, None
            except (SpecError, ConfigError) as err:
                error = why_invalid(err)
                new = invalid_spec_status(old, generation=generation, now=now, selector=selector, error=error)
                restarts, wake = 0, None
            else:
                self.refusals.succeeded(key)
            if wake is not None:
                requeue = wake if requeue is None else min(requeue, wake)
            patch = status_patch(old, new)
            if patch:
                self.own_status_writes[key] = (generation, json_copy(new))
                try:
                    k8s.patch_inference_status(namespace, name, patch)
                except Exception:
                    self.own_status_writes.pop(key, None)  # not written: an event with this status is not our echo
                    raise
            if restarts:
                metrics.RESTARTS.labels(kind=KIND).inc(restarts)
            for event in [*transition_events(old, new), *events]:
                k8s.post_event(KIND, body, event.type, event.reason, event.message)
            self.states.observe(key, state_of(new))
        return requeue

    def reconcile_spec(
        self, spec: InferenceSpec, old: Mapping[str, Any], now: datetime, events: list[Event]
    ) -> tuple[dict[str, Any], int, float | None]:
        """The new status, the groups recreated in this pass, and how soon to look again (None: the resync)."""
        finetune = finetune_to_read(spec)
        resolved = resolve_checkpoint(spec, None if finetune is None else k8s.get_finetune(spec.namespace, finetune))
        if isinstance(resolved, Gate):
            return gated_status(spec, old, resolved, now), 0, None
        data = config_map_data(spec, resolved)
        plan = plan_serving(
            spec,
            resolved,
            data,
            self.observe(spec),
            old,
            now,
            backoff=self.backoff(),
            group_stable_seconds=self.config.group_stable_seconds,
        )
        applied = self.perform(plan)
        events.extend(plan.events)
        return plan.status(applied), plan.recreated, plan.wake

    def observe(self, spec: InferenceSpec) -> Observed:
        """Read every child a plan may touch."""
        selector = group_children_selector(spec)
        return Observed(
            config_map=k8s.get_child("ConfigMap", spec.namespace, config_map_name(spec.name)),
            service=k8s.get_child("Service", spec.namespace, service_name(spec.name)),
            deployment=k8s.get_child("Deployment", spec.namespace, deployment_name(spec.name)),
            group_pods=tuple(k8s.list_children("Pod", spec.namespace, selector)),
            group_services=tuple(k8s.list_children("Service", spec.namespace, selector)),
        )

    def perform(self, plan: InferencePlan) -> dict[str, Any] | None:
        """The plan's steps, in order; returns the Deployment's apply answer (if one was applied), then raises the
        plan's halt, if any."""
        namespace = plan.spec.namespace
        deployment = None
        for step in plan.steps:
            if isinstance(step, Apply):
                applied = k8s.apply(step.body)
                if step.body["kind"] == "Deployment":
                    deployment = applied
            elif isinstance(step, Delete):
                if step.kind == "Pod":
                    k8s.delete_pod(namespace, step.name)
                else:
                    k8s.delete_child(step.kind, namespace, step.name)
            elif isinstance(step, Create):
                self.create_all(step.bodies)
        if plan.halt is not None:
            raise plan.halt
        return deployment

    def create_all(self, bodies: tuple[dict[str, Any], ...]) -> None:
        if len(bodies) > 1:
            with ThreadPoolExecutor(max_workers=min(self.config.create_workers, len(bodies))) as pool:
                list(pool.map(k8s.create, bodies))  # list() re-raises the first failure
        elif bodies:
            k8s.create(bodies[0])

    # --- watch events -----------------------------------------------------------------------------------------

    def inference_event(self, type: str | None, body: Mapping[str, Any], namespace: str, name: str) -> None:
        key = (namespace, name)
        if type == "DELETED":
            self.queue.forget(key)
            self.states.observe(key, None)
            self.remember_finetune(namespace, name, None)
            self.refusals.succeeded(key)
            self.own_status_writes.pop(key, None)
            return
        self.remember_finetune(namespace, name, finetune_of(body))
        if self.is_own_echo(key, body):
            return
        self.queue.trigger(key)

    def finetune_event(self, namespace: str, finetune: str) -> None:
        """A finetune moved: the inferences waiting for (or serving) its checkpoint look again."""
        for inference in self.inferences_serving(namespace, finetune):
            self.queue.trigger((namespace, inference))


def why_invalid(err: Exception) -> str:
    """InvalidSpec message: the field for a SpecError, the config for telechat2, the child for an apiserver 4xx."""
    if isinstance(err, ConfigError):
        return f"spec: telechat2 cannot render the predict config: {err}"
    if isinstance(err, k8s.ApiError):  # a malformed volume, or an unknown field (strict field validation)
        return f"spec: the apiserver rejected a child built from it: {err.describe()}"
    return str(err)


def state_of(status: Mapping[str, Any]) -> str:
    """One word for the metrics gauge: Ready, or the reason it is not."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == ic.COND_READY:
            return "Ready" if cond.get("status") == "True" else str(cond.get("reason") or "NotReady")
    return "Unknown"
