"""TeleChatFinetune end to end: the real operator, apiserver, scheduler and garbage collector; kwok plays the pods.

kwok never runs a container: a test ends a pod by annotating it (`telechat.io/fake-phase`, `fake-exit-code`),
standing in for the training process exiting.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.controlplane import ClusterHandle
from tests.cluster.waiting import wait_for
from tests.e2e.finetune_harness import (
    Jobs,
    OperatorProcess,
    condition,
    eventually,
    install,
    service_account_kubeconfig,
)


@pytest.fixture(scope="module")
def operator(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install(cluster)
    workdir = tmp_path_factory.mktemp("operator")
    process = OperatorProcess(service_account_kubeconfig(cluster, workdir / "kubeconfig"), workdir / "operator.log")
    process.start()
    yield process
    process.stop()
    print(f"operator log tail:\n{process.log_tail()}")


@pytest.fixture
def jobs(cluster: ClusterHandle, namespace: str, operator: OperatorProcess) -> Jobs:
    return Jobs(cluster, namespace)


def command_of(pod: dict) -> list[str]:
    return pod["spec"]["containers"][0]["command"]


def test_a_job_runs_from_apply_to_a_merged_checkpoint(jobs: Jobs, cluster: ClusterHandle) -> None:
    applied = jobs.apply("tiny", merge={"prefix": "tiny"})
    ranks = jobs.wait_pods("tiny", 2, "Running")
    status = jobs.wait_state("tiny", "Running")
    assert (status["nodes"], status["npus"], status["attempt"], status["restarts"]) == (2, 2, 1, 0)
    assert condition(status, "Created")["status"] == "True" and condition(status, "Running")["status"] == "True"
    assert condition(status, "Running")["observedGeneration"] == 1

    # Placed by the real scheduler onto fake Ascend nodes, one NPU each, with the launch command.
    for pod in ranks:
        node = json.loads(cluster.kubectl("get", "node", pod["spec"]["nodeName"], "--output=json").stdout)
        assert int(node["status"]["allocatable"]["huawei.com/Ascend910"]) >= 1
        assert pod["spec"]["containers"][0]["resources"]["limits"]["huawei.com/Ascend910"] == "1"
    rank1 = next(p for p in ranks if p["metadata"]["labels"]["telechat.io/node-rank"] == "1")
    assert command_of(rank1)[:8] == [
        "telechat2",
        "launch",
        "--worker_num",
        "2",
        "--local_worker_num",
        "1",
        "--node_rank",
        "1",
    ]
    assert f"tiny-rank-0.tiny-ranks.{jobs.namespace}.svc" in command_of(rank1)
    service = json.loads(jobs.kubectl("get", "service", "tiny-ranks", "--output=json").stdout)
    assert service["spec"]["clusterIP"] == "None"
    config = json.loads(jobs.kubectl("get", "configmap", "tiny-config", "--output=json").stdout)
    assert "data_parallel: 2" in config["data"]["config.yaml"]

    jobs.set_phase(ranks, "Succeeded")
    jobs.wait_state("tiny", "Merging")
    (merger,) = jobs.wait_pods("tiny", 1, "Running", role="merge")
    container = merger["spec"]["containers"][0]
    assert "huawei.com/Ascend910" not in json.dumps(container.get("resources", {}))
    assert container["command"][:2] == ["telechat2", "merge"] and container["command"][-1] == "tiny"
    jobs.set_phase([merger], "Succeeded")

    jobs.kubectl("wait", "--for=condition=Succeeded", "--timeout=30s", "telechatfinetune/tiny")
    final = jobs.get("tiny")
    assert final["status"]["state"] == "Succeeded"
    assert final["status"]["checkpoint"] == "/mnt/telechat/output/tiny/merged/rank_0/tiny0.ckpt"
    assert final["status"]["completionTime"] and final["status"]["startTime"]
    assert final["spec"]["merge"]["prefix"] == applied["spec"]["merge"]["prefix"]
    assert final["metadata"]["generation"] == 1, "the operator must never write spec"
    assert {"PodsCreated", "Running", "Merging", "JobSucceeded"} <= set(jobs.events("tiny"))
    printed = jobs.kubectl("get", "tcft", "tiny").stdout
    assert "telechat2-tiny" in printed and "Succeeded" in printed


def test_retryable_failures_restart_the_group_until_the_backoff_limit(jobs: Jobs) -> None:
    jobs.apply("retry", runPolicy={"backoffLimit": 2})
    for attempt in (1, 2, 3):
        ranks = jobs.wait_pods("retry", 2, "Running", attempt=attempt)
        assert all(("--resume" in command_of(p)) == (attempt > 1) for p in ranks)
        if attempt > 1:  # the failed group is torn down before the next one starts
            assert {p["metadata"]["labels"]["telechat.io/attempt"] for p in jobs.pods("retry")} == {str(attempt)}
        rank1 = [p for p in ranks if p["metadata"]["labels"]["telechat.io/node-rank"] == "1"]
        jobs.set_phase(rank1, "Failed", exit_code=137)
        if attempt < 3:
            status = wait_for(
                lambda a=attempt: (s := jobs.status("retry")).get("restarts") == a and s, f"restart {attempt}"
            )
            assert status["lastFailure"]["exitCode"] == 137
    status = jobs.wait_state("retry", "Failed")
    assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
    assert status["restarts"] == 2
    assert "Restarting" in jobs.events("retry")


def test_exit_code_1_fails_at_once(jobs: Jobs) -> None:
    jobs.apply("bug")
    ranks = jobs.wait_pods("bug", 2, "Running")
    jobs.set_phase(ranks[:1], "Failed", exit_code=1)
    status = jobs.wait_state("bug", "Failed")
    assert condition(status, "Failed")["reason"] == "NonRetryableExitCode"
    assert status["restarts"] == 0
    failed = ranks[0]["metadata"]["name"]
    # The surviving rank is stopped; the failed one is kept for `kubectl logs`. Issue 10 item 11: the survivor is
    # stopped in place (spec.activeDeadlineSeconds, as the kubelet ends a pod past its deadline), not deleted, so
    # every rank's log stays until ttlSecondsAfterFinished.
    survivor = ranks[1]["metadata"]["name"]

    def stopped() -> dict | None:
        pods = {p["metadata"]["name"]: p for p in jobs.pods("bug")}
        return pods if pods.get(survivor, {}).get("status", {}).get("phase") == "Failed" else None

    pods = wait_for(stopped, "the surviving rank stopped")
    assert sorted(pods) == sorted([failed, survivor]), "both ranks' pods are kept"
    assert pods[survivor]["status"]["reason"] == "DeadlineExceeded" and pods[survivor]["spec"]["activeDeadlineSeconds"]
    terminated = pods[failed]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 1


def test_a_deleted_rank_pod_restarts_the_group(jobs: Jobs) -> None:
    jobs.apply("lost")
    ranks = jobs.wait_pods("lost", 2, "Running")
    jobs.kubectl("delete", "pod", ranks[0]["metadata"]["name"], "--wait=false")
    jobs.wait_pods("lost", 2, "Running", attempt=2)
    status = jobs.wait_state("lost", "Running")
    assert status["restarts"] == 1 and status["lastFailure"]["reason"] == "PodDeleted"


def test_suspend_removes_the_pods_and_resume_continues_from_the_checkpoint(jobs: Jobs) -> None:
    jobs.apply("pause")
    jobs.wait_pods("pause", 2, "Running")
    jobs.patch_spec("pause", {"runPolicy": {"suspend": True}})
    status = jobs.wait_state("pause", "Suspended")
    assert condition(status, "Suspended")["status"] == "True"
    wait_for(lambda: not jobs.pods("pause") or None, "the suspended job's pods to be removed")
    jobs.patch_spec("pause", {"runPolicy": {"suspend": False}})
    ranks = jobs.wait_pods("pause", 2, "Running", attempt=2)
    assert all("--resume" in command_of(p) for p in ranks)
    status = jobs.wait_state("pause", "Running")
    assert condition(status, "Suspended")["status"] == "False" and status["restarts"] == 0
    assert condition(status, "Suspended")["observedGeneration"] == 3


def test_active_deadline_fails_the_job(jobs: Jobs) -> None:
    jobs.apply("slow", runPolicy={"activeDeadlineSeconds": 3})
    jobs.wait_pods("slow", 2, "Running")
    status = jobs.wait_state("slow", "Failed", timeout=30)
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not jobs.pods("slow") or None, "the running pods to be stopped")


def test_ttl_removes_finished_pods_but_keeps_the_job(jobs: Jobs) -> None:
    jobs.apply("short", merge={"enabled": False}, runPolicy={"ttlSecondsAfterFinished": 1})
    jobs.set_phase(jobs.wait_pods("short", 2, "Running"), "Succeeded")
    status = jobs.wait_state("short", "Succeeded")
    assert status["checkpoint"] == "/mnt/telechat/output/short/checkpoint"
    wait_for(lambda: not jobs.pods("short") or None, "finished pods removed after ttlSecondsAfterFinished")
    assert jobs.status("short")["state"] == "Succeeded"


def test_a_layout_that_does_not_fit_fails_with_invalid_spec_naming_the_field(jobs: Jobs) -> None:
    # An omitted layout is now planned for the node count (test_finetune_initializers.py); what no split of the
    # 3 devices can satisfy (modelParallel 2 fixed) is still InvalidSpec.
    jobs.apply("misfit", nodes=3, parallel={"modelParallel": 2})
    status = jobs.wait_state("misfit", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec" and failed["message"].startswith("spec.parallel")
    assert not jobs.pods("misfit")


def test_volcano_gang_scheduling_creates_a_pod_group(jobs: Jobs) -> None:
    jobs.apply("gang", nodes=3, schedulerName="volcano")
    group = wait_for(
        lambda: json.loads(jobs.kubectl("get", "podgroups.scheduling.volcano.sh", "--output=json").stdout)["items"],
        "the PodGroup",
    )[0]
    assert group["metadata"]["name"] == "gang" and group["spec"]["minMember"] == 3
    assert group["metadata"]["ownerReferences"][0]["name"] == "gang"
    pods = wait_for(lambda: len(p := jobs.pods("gang")) == 3 and p, "the rank pods")
    for pod in pods:  # no Volcano scheduler runs here: the pods stay Pending, but carry the group
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "gang"
        assert pod["spec"]["schedulerName"] == "volcano"


def test_the_operator_killed_mid_job_resumes_without_duplicates(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.apply("sturdy", nodes=4)
    wait_for(lambda: jobs.pods("sturdy") or None, "the first rank pod", interval=0.02)
    operator.kill()  # possibly in the middle of creating the group
    operator.start()
    ranks = jobs.wait_pods("sturdy", 4, "Running")
    names = sorted(p["metadata"]["name"] for p in jobs.pods("sturdy"))
    assert names == [f"sturdy-a1-rank-{r}" for r in range(4)], "no duplicate or extra pods"
    status = jobs.wait_state("sturdy", "Running")
    assert (status["attempt"], status["restarts"]) == (1, 0)

    jobs.set_phase(ranks, "Succeeded")
    jobs.wait_state("sturdy", "Merging")
    operator.kill()
    operator.start()
    (merger,) = jobs.wait_pods("sturdy", 1, "Running", role="merge")
    jobs.set_phase([merger], "Succeeded")
    status = jobs.wait_state("sturdy", "Succeeded")
    assert (status["attempt"], status["restarts"], status["mergeAttempt"]) == (1, 0, 1)
    assert len(jobs.pods("sturdy", role="merge")) == 1


def event_messages(jobs: Jobs, name: str, reason: str) -> list[str]:
    selector = f"involvedObject.name={name},involvedObject.kind=TeleChatFinetune,reason={reason}"
    items = json.loads(jobs.kubectl("get", "events", f"--field-selector={selector}", "--output=json").stdout)["items"]
    return [event["message"] for event in items]


def test_a_job_no_node_can_take_says_unschedulable_within_seconds(jobs: Jobs) -> None:
    """Issue 10 item 1: more NPUs than any fake node has (8): the scheduler's reason reaches the job's status from
    the pod watch, long before the 300 s resync."""
    jobs.apply("huge", nodes=1, devicesPerNode=16, parallel={"dataParallel": 16})
    status = wait_for(
        lambda: condition(s := jobs.status("huge"), "Stalled").get("status") == "True" and s,
        "the Stalled condition",
        timeout=20,
    )
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "Unschedulable" and stalled["observedGeneration"] == 1
    assert "Insufficient huawei.com/Ascend910" in stalled["message"]
    assert "rank 0 pod huge-a1-rank-0" in stalled["message"]
    assert status["message"] == stalled["message"] and status["state"] == "Pending"
    assert status["pods"]["pending"] == 1
    assert "Unschedulable" in jobs.events("huge")


def test_a_selector_nothing_matches_stalls_and_clears_once_a_node_matches(jobs: Jobs, cluster: ClusterHandle) -> None:
    jobs.apply("picky", nodeSelector={"telechat.io/e2e-pool": jobs.namespace})
    wait_for(
        lambda: condition(jobs.status("picky"), "Stalled").get("reason") == "Unschedulable" or None,
        "the Stalled condition",
        timeout=20,
    )
    nodes = json.loads(cluster.kubectl("get", "nodes", "--output=json").stdout)["items"]
    names = [node["metadata"]["name"] for node in nodes[:2]]
    cluster.kubectl("label", "nodes", *names, f"telechat.io/e2e-pool={jobs.namespace}", "--overwrite")
    try:
        status = jobs.wait_state("picky", "Running", timeout=60)
        assert condition(status, "Stalled")["status"] == "False"
    finally:
        cluster.kubectl("label", "nodes", *names, "telechat.io/e2e-pool-")


def test_restarting_names_the_failed_rank_and_exit_code(jobs: Jobs) -> None:
    jobs.apply("flaky", runPolicy={"backoffLimit": 1})
    ranks = jobs.wait_pods("flaky", 2, "Running")
    rank1 = [p for p in ranks if p["metadata"]["labels"]["telechat.io/node-rank"] == "1"]
    jobs.set_phase(rank1, "Failed", exit_code=137)
    status = wait_for(lambda: (s := jobs.status("flaky")).get("restarts") == 1 and s, "the restart")
    restarting = condition(status, "Restarting")
    assert restarting["reason"] == "ExitCode137"
    assert restarting["message"].startswith("rank 1 failed with exit code 137 (pod flaky-a1-rank-1)")
    eventually(
        lambda: any(
            m.startswith("rank 1 failed with exit code 137") for m in event_messages(jobs, "flaky", "Restarting")
        ),
        "the Restarting Event",
    )
    # The retry fails for good: every rank pod of the last attempt is kept (logs) after Failed.
    ranks = jobs.wait_pods("flaky", 2, "Running", attempt=2)
    jobs.set_phase(ranks[:1], "Failed", exit_code=137)
    failed = jobs.wait_state("flaky", "Failed")
    assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"

    def ended_and_kept() -> list[dict] | None:
        pods = jobs.pods("flaky")
        return pods if len(pods) == 2 and all(p["status"].get("phase") == "Failed" for p in pods) else None

    pods = wait_for(ended_and_kept, "both attempt-2 pods ended and kept")
    assert {p["metadata"]["labels"]["telechat.io/attempt"] for p in pods} == {"2"}


def test_a_failed_job_keeps_its_pods_until_the_ttl(jobs: Jobs) -> None:
    jobs.apply("keep", runPolicy={"ttlSecondsAfterFinished": 4})
    ranks = jobs.wait_pods("keep", 2, "Running")
    jobs.set_phase(ranks[1:], "Failed", exit_code=2)
    jobs.wait_state("keep", "Failed")
    assert len(jobs.pods("keep")) == 2
    wait_for(lambda: not jobs.pods("keep") or None, "the pods removed after ttlSecondsAfterFinished", timeout=30)


def test_editing_a_running_job_says_the_change_waits_for_a_restart(jobs: Jobs) -> None:
    jobs.apply("edit")
    ranks = jobs.wait_pods("edit", 2, "Running")
    jobs.wait_state("edit", "Running")
    rank0 = next(p for p in ranks if p["metadata"]["labels"]["telechat.io/node-rank"] == "0")
    ports = {port["name"]: port["containerPort"] for port in rank0["spec"]["containers"][0]["ports"]}
    assert ports["progress"] == 8119  # rank 0 serves /progress; kwok pods never answer: no progress, no error
    jobs.patch_spec("edit", {"image": "telechat-runtime:v2", "training": {"learningRate": 1e-4}})
    status = wait_for(
        lambda: condition(s := jobs.status("edit"), "SpecApplied").get("status") == "False" and s, "SpecApplied=False"
    )
    applied = condition(status, "SpecApplied")
    assert applied["reason"] == "WaitingForRestart" and applied["observedGeneration"] == 2
    assert applied["message"].startswith("spec.image, spec.training changed while attempt 1 runs")
    eventually(lambda: "SpecChangeDeferred" in jobs.events("edit"), "the SpecChangeDeferred Event")
    assert sorted(p["metadata"]["name"] for p in jobs.pods("edit")) == ["edit-a1-rank-0", "edit-a1-rank-1"]
    assert status["state"] == "Running" and "progress" not in status
    # A restart builds the group from the edited spec.
    jobs.set_phase([rank0], "Failed", exit_code=137)
    new = jobs.wait_pods("edit", 2, "Running", attempt=2)
    assert {p["spec"]["containers"][0]["image"] for p in new} == {"telechat-runtime:v2"}
    eventually(lambda: condition(jobs.status("edit"), "SpecApplied").get("status") == "True", "SpecApplied=True")


def test_health_and_metrics_endpoints(jobs: Jobs, operator: OperatorProcess) -> None:
    assert operator.healthy()
    text = operator.metrics()
    for name in (
        "telechat_operator_jobs{",
        "telechat_operator_reconcile_duration_seconds_bucket",
        "telechat_operator_api_requests_total",
    ):
        assert name in text, name


def test_operator_log_is_free_of_errors(operator: OperatorProcess) -> None:
    """Runs last in this module: no reconcile raised and no request was refused (e.g. by RBAC) in any test."""
    lines = Path(operator.log_path).read_text(errors="replace").splitlines()
    # A test's namespace is deleted while its job may still be reconciled: that refusal is expected.
    errors = [
        line
        for line in lines
        if ("reconcile failed" in line or "forbidden" in line.lower()) and "being terminated" not in line
    ]
    assert not errors, "\n".join(errors)
