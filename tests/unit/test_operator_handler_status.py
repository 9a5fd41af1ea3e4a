"""The finetune handler's glue for issue 10: blocker changes trigger passes, progress is polled without waiting,
survivors of a failure are stopped (not deleted)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest
from telechat_operator import k8s
from telechat_operator.common import constants as c


@pytest.fixture
def finetune() -> Any:
    from telechat_operator.finetune import handlers as finetune

    state = finetune.controller
    tables = (state.own_status_writes, state.unstarted_jobs, state.pod_versions, state.pod_facts)
    for table in (*tables, state.posted_pods):
        table.clear()
    yield finetune
    finetune.controller.event_pool.submit(lambda: None).result()
    finetune.controller.progress_poller.forget(("ns", "ft"))
    for table in (*tables, state.posted_pods):
        table.clear()


def job_and_pods(state: str = c.STATE_RUNNING) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from operator_factories import job_body
    from telechat_operator.finetune.pods import build_rank_pod
    from telechat_operator.finetune.spec import parse

    job = job_body(nodes=2, devicesPerNode=1)
    spec = parse(job)
    pods = [
        build_rank_pod(spec, rank, 1) | {"status": {"phase": "Running", "podIP": f"10.0.0.{rank + 1}"}}
        for rank in (0, 1)
    ]
    job["status"] = {"attempt": 1, "launchedAttempt": 1, "state": state, "restarts": 0}
    return job, pods


def fake_api(monkeypatch: pytest.MonkeyPatch, finetune: Any, job: dict[str, Any], pods: list[dict[str, Any]]) -> dict:
    calls: dict[str, list[Any]] = {"patches": [], "deleted": [], "stopped": []}
    monkeypatch.setattr(k8s, "list_pods", lambda *args, **kwargs: pods)
    monkeypatch.setattr(k8s, "get_finetune", lambda namespace, name: job)
    monkeypatch.setattr(
        k8s, "patch_finetune_status", lambda namespace, name, patch, **_: calls["patches"].append(patch)
    )
    monkeypatch.setattr(k8s, "delete_pod", lambda namespace, name: calls["deleted"].append(name))
    monkeypatch.setattr(k8s, "stop_pod", lambda namespace, name: calls["stopped"].append(name))
    monkeypatch.setattr(k8s, "post_event", lambda *args: None)
    return calls


def test_a_pending_pod_turning_unschedulable_triggers_a_pass(monkeypatch: pytest.MonkeyPatch, finetune: Any) -> None:
    _, pods = job_and_pods()
    triggered: list[tuple[Hashable, float | None]] = []
    monkeypatch.setattr(finetune.controller.queue, "trigger", lambda key, delay=None: triggered.append((key, delay)))
    pod = pods[0]
    labels = pod["metadata"]["labels"]

    def event(status: dict[str, Any]) -> None:
        body = pod | {"status": status}
        asyncio.run(finetune.pod_changed(type="MODIFIED", body=body, labels=labels, namespace="ns", uid="u0"))

    event({"phase": "Pending"})
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes"}
    event({"phase": "Pending", "conditions": [scheduled]})
    event({"phase": "Pending", "conditions": [scheduled]})  # unchanged: no pass
    key = ("ns", "ft")
    settle = finetune.controller.config
    assert triggered == [(key, settle.pod_progress_settle_seconds), (key, settle.pod_event_settle_seconds)]


def test_a_pass_uses_the_newest_progress_without_waiting_for_the_pod(
    monkeypatch: pytest.MonkeyPatch, finetune: Any
) -> None:
    from telechat_operator.finetune.progress_poll import ProgressPoller

    job, pods = job_and_pods()
    calls = fake_api(monkeypatch, finetune, job, pods)
    release = threading.Event()
    urls: list[str] = []
    changed: list[Hashable] = []
    document = {"workers": 2, "ranks": [{"rank": r, "step": 7, "totalSteps": 10, "stepSeconds": 1.0} for r in (0, 1)]}

    def fetch(url: str, timeout: float) -> Any:
        urls.append(url)
        release.wait(10)
        return document

    poller = ProgressPoller(30, 2, on_change=changed.append, fetch=fetch, tick=3600)
    monkeypatch.setattr(finetune.controller, "progress_poller", poller)
    try:
        started = time.monotonic()
        finetune.controller.reconcile(("ns", "ft"))  # the fetch hangs: the pass goes on without progress
        assert time.monotonic() - started < 5
        assert not any("progress" in patch for patch in calls["patches"])
        release.set()
        deadline = time.monotonic() + 10
        while not changed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert urls == ["http://10.0.0.1:8119/progress"] and changed == [("ns", "ft")]
        finetune.controller.reconcile(("ns", "ft"))  # the pass the change triggers
        (patch,) = [p for p in calls["patches"] if "progress" in p]
        assert patch["progress"]["step"] == 7 and patch["progress"]["eta"] == "3s"
    finally:
        poller.stop()


def test_the_survivors_of_a_failed_job_are_stopped_not_deleted(monkeypatch: pytest.MonkeyPatch, finetune: Any) -> None:
    job, pods = job_and_pods()
    pods[1]["status"] = {
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}],
    }
    calls = fake_api(monkeypatch, finetune, job, pods)
    finetune.controller.reconcile(("ns", "ft"))
    assert calls["stopped"] == [pods[0]["metadata"]["name"]] and calls["deleted"] == []
    assert any(patch.get("state") == c.STATE_FAILED for patch in calls["patches"])
