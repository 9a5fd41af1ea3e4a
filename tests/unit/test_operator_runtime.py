"""Operator process pieces without a cluster: settings from the environment, kopf settings, the work queue,
status patches and the command line."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable
from typing import Any

import kopf
import pytest
from kopf._cogs.structs.references import Resource
from telechat_operator import k8s
from telechat_operator.__main__ import build_parser
from telechat_operator.common import constants as c
from telechat_operator.common.objects import json_copy, owned_by, status_patch
from telechat_operator.common.settings import OperatorConfig, configure_kopf
from telechat_operator.common.workqueue import WorkQueue


def test_config_reads_prefixed_environment_variables() -> None:
    config = OperatorConfig.from_env(
        {"TELECHAT_OPERATOR_BACKOFF_BASE_SECONDS": "0.5", "TELECHAT_OPERATOR_CREATE_WORKERS": "4"}
    )
    assert config.backoff_base_seconds == 0.5 and config.create_workers == 4
    assert config.backoff_max_seconds == OperatorConfig().backoff_max_seconds


@pytest.mark.parametrize("value", ["fast", "-1"])
def test_config_rejects_bad_values_naming_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match="TELECHAT_OPERATOR_RESYNC_SECONDS"):
        OperatorConfig.from_env({"TELECHAT_OPERATOR_RESYNC_SECONDS": value})


def test_kopf_settings_set_watch_timeouts_selectors_and_annotation_storage() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorConfig(), peering=None)
    assert settings.watching.server_timeout == 300 and isinstance(settings.watching.server_timeout, int)
    assert settings.watching.client_timeout and settings.watching.connect_timeout
    pods = Resource("", "v1", "pods")
    jobs = Resource(c.GROUP, c.VERSION, c.FINETUNE_PLURAL)
    assert list(settings.watching.label_selectors.collect(pods)) == [f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY_VALUE}"]
    assert list(settings.watching.label_selectors.collect(jobs)) == []  # every job is ours
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert settings.peering.standalone
    peered = kopf.OperatorSettings()
    configure_kopf(peered, OperatorConfig(), peering="telechat")
    assert (peered.peering.name, peered.peering.standalone, peered.peering.mandatory) == ("telechat", False, True)


@pytest.mark.parametrize(
    ("namespaces", "disabled"),
    [((), False), (["team-a"], True), (["team-a", "team-b"], True), (["team-*"], False), (["!kube-system"], False)],
)
def test_namespace_scoped_operator_skips_kopfs_cluster_wide_scanning(namespaces: list[str], disabled: bool) -> None:
    """A namespaced Role cannot list namespaces or CRDs; kopf would retry that for about a minute at startup."""
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorConfig(), peering=None, namespaces=namespaces)
    assert settings.scanning.disabled is disabled


def test_command_line() -> None:
    args = build_parser().parse_args(["run", "-n", "a", "-n", "b", "--metrics-port", "0"])
    assert args.namespace == ["a", "b"] and args.metrics_port == 0 and args.peering is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "-A", "-n", "a"])


def test_status_patch_nulls_removed_keys_and_skips_unchanged_ones() -> None:
    old = {"state": "Restarting", "restarts": 1, "nextAttemptTime": "t"}
    new = {"state": "Pending", "restarts": 1}
    assert status_patch(old, new) == {"state": "Pending", "nextAttemptTime": None}
    assert status_patch(new, new) == {}


def test_pods_of_a_deleted_namesake_job_are_ignored() -> None:
    pod = {"metadata": {"ownerReferences": [{"uid": "old"}]}}
    assert owned_by(pod, "old") and not owned_by(pod, "new")


def test_work_queue_coalesces_bursts_and_serialises_each_key() -> None:
    calls: list[Hashable] = []
    running: set[Hashable] = set()
    overlap = threading.Event()
    release = threading.Event()

    def reconcile(key: Hashable) -> float | None:
        if key in running:
            overlap.set()
        running.add(key)
        calls.append(key)
        release.wait(1)
        running.discard(key)
        return None

    async def scenario() -> None:
        queue = WorkQueue("test", reconcile, workers=4)
        queue.trigger("a")
        await asyncio.sleep(0.05)  # the first pass is now running (blocked on `release`)
        for _ in range(49):
            queue.trigger("a")
        queue.trigger("b")
        await asyncio.sleep(0.05)
        release.set()
        await queue.drain()

    asyncio.run(scenario())
    assert not overlap.is_set()
    assert calls.count("a") == 2  # the running pass plus one for the 49 triggers that arrived meanwhile
    assert calls.count("b") == 1


def test_work_queue_runs_as_many_passes_at_once_as_it_has_workers() -> None:
    """Not capped by asyncio's default executor (min(32, CPUs + 4) threads, 6 on the 2-CPU CI machine)."""
    workers = 12
    barrier = threading.Barrier(workers, timeout=5)

    def reconcile(key: Hashable) -> float | None:
        barrier.wait()  # breaks (raises) unless `workers` passes run at the same time
        return None

    async def scenario() -> None:
        queue = WorkQueue("wide", reconcile, workers=workers)
        for index in range(workers):
            queue.trigger(index)
        await queue.drain()

    asyncio.run(scenario())
    assert not barrier.broken


def test_work_queue_requeues_and_retries_errors() -> None:
    times: list[float] = []

    def reconcile(key: Hashable) -> float | None:
        times.append(time.monotonic())
        if len(times) == 1:
            raise RuntimeError("API down")
        return 0.05 if len(times) < 3 else None

    async def scenario() -> None:
        queue = WorkQueue("test", reconcile)
        queue.trigger("k")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if len(times) >= 3:
                break
        await queue.drain()

    asyncio.run(scenario())
    assert len(times) == 3
    assert times[1] - times[0] >= 0.9  # error retry: 0.5 * 2^1 seconds
    assert times[2] - times[1] >= 0.04  # the requested requeue


def test_pod_count_only_status_updates_are_batched() -> None:
    from telechat_operator.finetune import handlers as finetune
    from telechat_operator.finetune.status import Plan

    old = {"state": "Pending", "pods": {"pending": 2, "running": 0}}
    finetune.controller.last_status_write[("ns", "job")] = time.monotonic()
    counts_only = Plan(status={"state": "Pending", "pods": {"pending": 1, "running": 1}})
    finetune.controller.defer_count_only_update(("ns", "job"), old, counts_only)
    assert counts_only.status["pods"] == old["pods"] and counts_only.requeue_after is not None
    transition = Plan(status={"state": "Running", "pods": {"pending": 0, "running": 2}})
    finetune.controller.defer_count_only_update(("ns", "job"), old, transition)
    assert transition.status["pods"] == {"pending": 0, "running": 2} and transition.requeue_after is None
    finetune.controller.last_status_write.clear()
    first = Plan(status={"state": "Pending", "pods": {"pending": 1, "running": 1}})
    finetune.controller.defer_count_only_update(("ns", "job"), old, first)
    assert first.status["pods"] == {"pending": 1, "running": 1}


def test_only_the_exact_echo_of_our_status_write_is_skipped() -> None:
    """The echo often arrives before the PATCH returns; anything else about the job must still trigger a pass."""
    from telechat_operator.finetune import handlers as finetune

    key = ("ns", "echo")
    status = {"state": "Pending", "attempt": 1, "pods": {"pending": 2}}
    finetune.controller.own_status_writes[key] = (3, json_copy(status))
    try:
        body = {"metadata": {"generation": 3, "resourceVersion": "9"}, "status": status}
        assert finetune.controller.is_own_echo(key, body)
        assert not finetune.controller.is_own_echo(key, {**body, "metadata": {"generation": 4}})  # spec changed
        assert not finetune.controller.is_own_echo(key, {**body, "status": {**status, "state": "Running"}})
        deleting = {"metadata": {"generation": 3, "deletionTimestamp": "2026-01-01T00:00:00Z"}, "status": status}
        assert not finetune.controller.is_own_echo(key, deleting)
        assert not finetune.controller.is_own_echo(("ns", "other"), body)
    finally:
        finetune.controller.own_status_writes.pop(key, None)


def test_no_change_detecting_handlers_so_kopf_may_skip_its_diff_base() -> None:
    """settings.NoDiffBaseStorage is only correct while every registered handler is level-triggered."""
    from telechat_operator.common.settings import NoDiffBaseStorage
    from telechat_operator.handlers import register_all

    register_all()
    registry = kopf.get_default_registry()
    assert not registry._changing.get_all_handlers() and not registry._spawning.get_all_handlers()
    assert registry._watching.get_all_handlers()
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorConfig(), peering=None)
    assert isinstance(settings.persistence.diffbase_storage, NoDiffBaseStorage)


@pytest.mark.parametrize(
    ("status", "message", "going"),
    [
        (404, 'telechatfinetunes.telechat.io "job" not found', True),
        (404, 'namespaces "ns" not found', True),
        (
            403,
            'pods "p" is forbidden: unable to create new content in namespace ns because it is being terminated',
            True,
        ),
        (
            403,
            'pods is forbidden: User "system:serviceaccount:telechat:telechat-operator" cannot create resource',
            False,
        ),
        (404, 'configmaps "other" not found', False),
        (500, "etcd timeout", False),
    ],
)
def test_refusals_that_mean_the_job_is_going_away(status: int, message: str, going: bool) -> None:
    from telechat_operator.finetune.controller import job_going
    from telechat_operator.k8s import ApiError

    assert job_going(ApiError(status, message), "ns", "job") is going


@pytest.fixture
def handler_state() -> Any:
    """The finetune handler's per-job memory (echo detection, pod versions, posted pods), empty before and after."""
    from telechat_operator.finetune import handlers as finetune

    state = finetune.controller
    tables = (state.own_status_writes, state.unstarted_jobs, state.pod_versions, state.pod_facts)
    sets = (state.posted_pods,)
    for table in (*tables, *sets):
        table.clear()
    yield finetune
    state.event_pool.submit(lambda: None).result()  # events queued by a pass go out before the fakes are undone
    for table in (*tables, *sets):
        table.clear()


def _running_job_and_pods() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A launched, running 2-node job and its two rank pods, as the API returns them."""
    from operator_factories import job_body
    from telechat_operator.finetune.pods import build_rank_pod
    from telechat_operator.finetune.spec import parse

    job = job_body(nodes=2, devicesPerNode=1)
    spec = parse(job)
    pods = [build_rank_pod(spec, rank, 1) | {"status": {"phase": "Running"}} for rank in (0, 1)]
    job["status"] = {"attempt": 1, "launchedAttempt": 1, "state": c.STATE_RUNNING, "restarts": 0}
    return job, pods


@pytest.mark.parametrize("really_gone", [False, True])
def test_a_rank_missing_from_the_cached_list_is_confirmed_by_a_consistent_read(
    monkeypatch: pytest.MonkeyPatch, really_gone: bool, handler_state: Any
) -> None:
    """Passes read pods from the apiserver's cache; a restart (or any decision a missing pod sets off) waits for a
    consistent read to agree that the pod is gone."""
    from telechat_operator.finetune import handlers as finetune

    job, pods = _running_job_and_pods()
    reads: list[bool] = []

    def list_pods(namespace: str, labels: Any, from_cache: bool = False, not_older_than: str | None = None) -> Any:
        reads.append(from_cache)
        return pods[:1] if from_cache or really_gone else pods

    patches: list[dict[str, Any]] = []
    deleted: list[str] = []
    monkeypatch.setattr(k8s, "list_pods", list_pods)
    monkeypatch.setattr(k8s, "get_finetune", lambda namespace, name: job)
    monkeypatch.setattr(k8s, "patch_finetune_status", lambda namespace, name, patch, **_: patches.append(patch))
    monkeypatch.setattr(k8s, "delete_pod", lambda namespace, name: deleted.append(name))
    monkeypatch.setattr(k8s, "post_event", lambda *args: None)
    finetune.controller.reconcile(("ns", "ft"))
    finetune.controller.event_pool.submit(lambda: None).result()  # the pass's events are out
    assert reads == [True, False]
    restarted = any(patch.get("restarts") == 1 for patch in patches)
    assert restarted == really_gone
    assert deleted == ([pods[0]["metadata"]["name"]] if really_gone else [])


def test_the_added_event_of_a_pod_this_operator_just_posted_starts_no_pass(
    monkeypatch: pytest.MonkeyPatch, handler_state: Any
) -> None:
    """Our own fresh pods start no pass; progress (Running) waits the longer settle, a failure the short one."""
    finetune = handler_state
    _, pods = _running_job_and_pods()
    triggered: list[tuple[Hashable, float | None]] = []
    monkeypatch.setattr(finetune.controller.queue, "trigger", lambda key, delay=None: triggered.append((key, delay)))

    def event(kind: str, pod: dict[str, Any], uid: str, phase: str) -> None:
        body = pod | {"status": {"phase": phase}}
        labels = body["metadata"]["labels"]
        asyncio.run(finetune.pod_changed(type=kind, body=body, labels=labels, namespace="ns", uid=uid))

    ours, theirs = pods
    finetune.controller.posted_pods.add(("ns", ours["metadata"]["name"]))
    event("ADDED", ours, "u0", "Pending")
    assert triggered == []
    event("ADDED", theirs, "u1", "Pending")  # a pod another process created (e.g. before a restart)
    event("MODIFIED", ours, "u0", "Running")
    event("MODIFIED", theirs, "u1", "Failed")
    key, config = ("ns", "ft"), finetune.controller.config
    progress, prompt = config.pod_progress_settle_seconds, config.pod_event_settle_seconds
    assert triggered == [(key, progress), (key, progress), (key, prompt)]
    assert prompt < progress
    assert finetune.controller.pod_versions.get(key) is None  # the bodies carry no resourceVersion


def test_a_new_job_starts_from_its_watch_event_and_its_first_status_write_is_conditional(
    monkeypatch: pytest.MonkeyPatch, handler_state: Any
) -> None:
    """No read before the first pods of a job never reconciled; if the job moved on meanwhile (409 on the
    conditional status write), the next pass reads it afresh."""
    from operator_factories import job_body
    from telechat_operator.finetune import handlers as finetune

    job = job_body(nodes=2, devicesPerNode=1)
    job["metadata"]["resourceVersion"] = "41"
    calls: list[str] = []
    conflict = {"once": True}

    def patch_status(namespace: str, name: str, patch: Any, expected_version: str | None = None) -> str:
        calls.append(f"patch@{expected_version}")
        if conflict.pop("once", False):
            raise k8s.ApiError(409, "the object has been modified")
        return "43"

    def get_finetune(namespace: str, name: str) -> dict[str, Any]:
        calls.append("get")
        return job | {"metadata": {**job["metadata"], "resourceVersion": "42"}}

    def list_pods(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append("list")
        return []

    monkeypatch.setattr(k8s, "get_finetune", get_finetune)
    monkeypatch.setattr(k8s, "list_pods", list_pods)
    monkeypatch.setattr(k8s, "create", lambda body: calls.append(f"create {body['kind']}") or True)
    monkeypatch.setattr(k8s, "create_or_patch", lambda body, patch: calls.append("create ConfigMap"))
    monkeypatch.setattr(k8s, "patch_finetune_status", patch_status)
    monkeypatch.setattr(k8s, "post_event", lambda *args: None)
    monkeypatch.setattr(finetune.controller.queue, "trigger", lambda key, delay=None: None)
    key = ("ns", "ft")
    asyncio.run(finetune.finetune_changed(type="ADDED", body=job, name="ft", namespace="ns"))
    assert finetune.controller.reconcile(key) == 0.0  # conflict: go again at once
    assert "get" not in calls and "list" not in calls
    assert sorted(calls[:4]) == ["create ConfigMap", "create Pod", "create Pod", "create Service"]
    assert calls[4] == "patch@41"
    calls.clear()
    finetune.controller.reconcile(key)  # this time from a read of the job (and its pods)
    assert "get" in calls and "list" in calls and calls[-1] == "patch@42"
