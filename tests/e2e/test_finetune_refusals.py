"""TeleChatFinetune pods refused by admission (a PriorityClass that does not exist): a condition naming the refused
pod and the reason, retried with backoff, and the job starts once the PriorityClass appears.

Its own operator process: these refusals are logged on purpose, and test_finetune_operator.py requires a log free
of refusals.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ClusterHandle
from tests.cluster.waiting import wait_for
from tests.e2e.finetune_harness import Jobs, OperatorProcess, condition, install, service_account_kubeconfig


@pytest.fixture(scope="module")
def operator(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install(cluster)
    workdir = tmp_path_factory.mktemp("operator-refusals")
    process = OperatorProcess(service_account_kubeconfig(cluster, workdir / "kubeconfig"), workdir / "operator.log")
    process.start()
    yield process
    process.stop()


def refusals(status: dict) -> int:
    message = condition(status, "RequestRefused").get("message") or ""
    return int(message.split("(refused ")[1].split(" ")[0]) if "(refused " in message else 0


def test_a_missing_priority_class_is_a_condition_with_backoff(
    cluster: ClusterHandle, namespace: str, operator: OperatorProcess
) -> None:
    jobs = Jobs(cluster, namespace)
    priority_class = f"tcft-{uuid.uuid4().hex[:6]}"
    jobs.apply("prio", priorityClassName=priority_class)
    seen: dict[int, float] = {}

    def refused(at_least: int) -> object:
        def probe() -> dict | None:
            status = jobs.status("prio")
            seen.setdefault(refusals(status), time.monotonic())
            return status if refusals(status) >= at_least else None

        return probe

    status = wait_for(refused(1), "condition RequestRefused", timeout=30)
    cond = condition(status, "RequestRefused")
    assert cond["status"] == "True" and cond["observedGeneration"] == 1
    assert f"create Pod {namespace}/prio-a1-rank-" in cond["message"] and "HTTP 403" in cond["message"]
    assert priority_class in cond["message"] and "PriorityClass" in cond["message"]
    assert status["state"] == "Pending" and status["message"] == cond["message"]
    assert "RequestRefused" in jobs.events("prio")
    wait_for(refused(3), "two more refused attempts", timeout=60)
    first, third = seen[min(seen)], seen[min(c for c in seen if c >= 3)]
    assert third - first >= 1.0, seen  # base 0.5 s doubling: attempts 2 and 3 come >= 1.5 s after the first

    cluster.kubectl("create", "priorityclass", priority_class, "--value=1000")
    try:
        jobs.wait_pods("prio", 2, "Running", timeout=60)
        status = jobs.wait_state("prio", "Running")
        assert condition(status, "RequestRefused")["status"] == "False"
        assert condition(status, "Created")["status"] == "True"
    finally:
        cluster.kubectl("delete", "priorityclass", priority_class, "--wait=false", check=False)
