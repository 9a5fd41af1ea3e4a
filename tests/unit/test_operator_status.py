"""The state machine, as table tests: status + pods + clock in, next status and actions out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from operator_factories import NOW, init_pod, make_spec, merge_pod, worker
from telechat_operator.common import constants as c
from telechat_operator.common.conditions import Backoff, condition_is, to_timestamp
from telechat_operator.common.spec import SpecError
from telechat_operator.finetune.status import (
    Plan,
    PodView,
    classify_failure,
    invalid_spec_plan,
    reconcile,
    rests_on_absence,
)

BACKOFF = Backoff(base_seconds=10, max_seconds=60)


def run(status: dict[str, Any], pods: list[PodView], seconds: float = 0, **spec: Any) -> Plan:
    return reconcile(make_spec(**spec), status, pods, NOW + timedelta(seconds=seconds), BACKOFF)


def running_status(**extra: Any) -> dict[str, Any]:
    """A job whose attempt-1 group was created and observed running."""
    plan = run({}, [])
    plan = run(plan.status, [worker(0, phase="Pending"), worker(1, phase="Pending")])
    plan = run(plan.status, [worker(0), worker(1)])
    assert plan.status["state"] == c.STATE_RUNNING
    return {**plan.status, **extra}


def reason(status: dict[str, Any], kind: str) -> str | None:
    return next((cond["reason"] for cond in status["conditions"] if cond["type"] == kind), None)


def test_a_new_job_creates_every_rank_of_attempt_one() -> None:
    plan = run({}, [])
    assert plan.create_ranks == [0, 1] and plan.ensure_children
    assert plan.status["attempt"] == 1 and plan.status["state"] == c.STATE_PENDING
    assert plan.status["startTime"] == to_timestamp(NOW)
    assert (plan.status["nodes"], plan.status["npus"], plan.status["observedGeneration"]) == (2, 2, 1)


def test_a_restarted_operator_creates_only_the_missing_ranks() -> None:
    status = {"attempt": 1, "state": c.STATE_PENDING, "restarts": 0}
    plan = run(status, [worker(0, phase="Pending")])
    assert plan.create_ranks == [1]
    assert plan.status.get("launchedAttempt", 0) == 0  # not launched until every rank is seen
    assert plan.status["restarts"] == 0


def test_all_ranks_seen_marks_the_attempt_launched_then_running() -> None:
    plan = run({"attempt": 1, "state": c.STATE_PENDING}, [worker(0, phase="Pending"), worker(1, phase="Pending")])
    assert plan.create_ranks == [] and plan.status["launchedAttempt"] == 1
    assert condition_is(plan.status, c.COND_CREATED) and plan.status["state"] == c.STATE_PENDING
    plan = run(plan.status, [worker(0), worker(1, phase="Pending")])
    assert plan.status["state"] == c.STATE_PENDING and plan.status["pods"] == {
        "pending": 1, "running": 1, "succeeded": 0, "failed": 0,
    }  # fmt: skip
    plan = run(plan.status, [worker(0), worker(1)], seconds=5)
    assert plan.status["state"] == c.STATE_RUNNING and condition_is(plan.status, c.COND_RUNNING)
    assert [e.reason for e in plan.events] == ["Running"]


def test_reconciling_an_unchanged_world_changes_nothing() -> None:
    status = running_status()
    plan = run(status, [worker(0), worker(1)], seconds=30)
    assert plan.status == status
    assert (plan.create_ranks, plan.delete_pods, plan.create_merge, plan.events) == ([], [], None, [])


def test_condition_transition_time_moves_only_when_the_value_flips() -> None:
    status = running_status()
    before = next(cond for cond in status["conditions"] if cond["type"] == c.COND_RUNNING)
    plan = reconcile(make_spec(), status, [worker(0), worker(1)], NOW + timedelta(seconds=60), BACKOFF)
    after = next(cond for cond in plan.status["conditions"] if cond["type"] == c.COND_RUNNING)
    assert after["lastTransitionTime"] == before["lastTransitionTime"]


@pytest.mark.parametrize(
    ("pod", "policy", "retryable", "cause"),
    [
        (worker(0, phase="Failed", exit_code=137), c.RESTART_POLICY_EXIT_CODE, True, "ExitCode137"),
        (worker(0, phase="Failed", exit_code=255), c.RESTART_POLICY_EXIT_CODE, True, "ExitCode255"),
        (worker(0, phase="Failed", exit_code=128), c.RESTART_POLICY_EXIT_CODE, True, "ExitCode128"),
        (worker(0, phase="Failed", exit_code=127), c.RESTART_POLICY_EXIT_CODE, False, "ExitCode127"),
        (worker(0, phase="Failed", exit_code=1), c.RESTART_POLICY_EXIT_CODE, False, "ExitCode1"),
        (worker(0, phase="Failed", exit_code=1), c.RESTART_POLICY_ON_FAILURE, True, "ExitCode1"),
        (worker(0, phase="Failed", exit_code=137), c.RESTART_POLICY_NEVER, False, "ExitCode137"),
        (worker(0, phase="Failed", reason="Evicted"), c.RESTART_POLICY_EXIT_CODE, True, "Evicted"),
        (worker(0, phase="Unknown"), c.RESTART_POLICY_EXIT_CODE, True, "NodeLost"),
        (worker(0, phase="Running", deleting=True), c.RESTART_POLICY_EXIT_CODE, True, "PodDeleted"),
        (worker(0, phase="Failed"), c.RESTART_POLICY_EXIT_CODE, True, "PodFailed"),
    ],
)
def test_failure_classification(pod: PodView, policy: str, retryable: bool, cause: str) -> None:
    failure = classify_failure(pod, policy)
    assert failure is not None and (failure.retryable, failure.reason) == (retryable, cause)


@pytest.mark.parametrize("pod", [worker(0), worker(0, phase="Pending"), worker(0, phase="Succeeded", exit_code=0)])
def test_healthy_pods_are_not_failures(pod: PodView) -> None:
    assert classify_failure(pod, c.RESTART_POLICY_EXIT_CODE) is None


def test_a_retryable_failure_restarts_the_whole_group_as_a_new_attempt_after_backoff() -> None:
    status = running_status()
    plan = run(status, [worker(0), worker(1, phase="Failed", exit_code=137)], seconds=10)
    assert plan.status["state"] == c.STATE_RESTARTING and plan.status["restarts"] == 1
    assert plan.status["attempt"] == 2
    assert sorted(plan.delete_pods) == ["ft-a1-rank-0", "ft-a1-rank-1"]
    assert plan.create_ranks == []
    assert plan.requeue_after == 10  # base backoff
    assert plan.status["nextAttemptTime"] == to_timestamp(NOW + timedelta(seconds=20))
    assert reason(plan.status, c.COND_RESTARTING) == "ExitCode137"
    assert not condition_is(plan.status, c.COND_RUNNING)
    assert plan.status["lastFailure"]["rank"] == 1 and plan.status["lastFailure"]["exitCode"] == 137
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Restarting")]

    # Old pods still terminating: wait, create nothing.
    waiting = run(plan.status, [worker(0, deleting=True), worker(1, phase="Failed", exit_code=137)], seconds=12)
    assert waiting.create_ranks == [] and waiting.status["restarts"] == 1 and waiting.requeue_after == 8
    # Backoff over, old group gone: attempt 2 is created (its command resumes).
    relaunch = run(waiting.status, [], seconds=25)
    assert relaunch.create_ranks == [0, 1] and relaunch.status["state"] == c.STATE_PENDING
    assert relaunch.status["restarts"] == 1
    # Running again clears Restarting.
    seen = run(relaunch.status, [worker(0, attempt=2), worker(1, attempt=2)], seconds=26)
    final = run(seen.status, [worker(0, attempt=2), worker(1, attempt=2)], seconds=27)
    assert final.status["state"] == c.STATE_RUNNING and not condition_is(final.status, c.COND_RESTARTING)


def test_backoff_grows_exponentially_and_is_capped() -> None:
    assert [BACKOFF.delay(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_past_the_backoff_limit_the_job_fails() -> None:
    status = running_status(restarts=3)
    plan = run(status, [worker(0), worker(1, phase="Failed", exit_code=137)])
    assert plan.status["state"] == c.STATE_FAILED and reason(plan.status, c.COND_FAILED) == c.REASON_BACKOFF_LIMIT
    # The running rank is stopped (issue 10 item 11: stopped in place, not deleted), the failed one kept for logs.
    assert plan.delete_pods == [] and plan.stop_pods == ["ft-a1-rank-0"]
    assert plan.status["completionTime"] == to_timestamp(NOW)


def test_exit_code_1_fails_at_once_even_with_retries_left() -> None:
    plan = run(running_status(), [worker(0, phase="Failed", exit_code=1), worker(1)])
    assert plan.status["state"] == c.STATE_FAILED
    assert reason(plan.status, c.COND_FAILED) == c.REASON_NON_RETRYABLE_EXIT
    assert plan.status["restarts"] == 0


def test_a_non_retryable_failure_wins_over_a_retryable_one() -> None:
    pods = [worker(0, phase="Failed", exit_code=137), worker(1, phase="Failed", exit_code=2)]
    plan = run(running_status(), pods)
    assert reason(plan.status, c.COND_FAILED) == c.REASON_NON_RETRYABLE_EXIT
    assert plan.status["lastFailure"]["rank"] == 1


def test_restart_policy_never_fails_on_any_failure() -> None:
    status = running_status()
    plan = run(status, [worker(0, phase="Failed", exit_code=137), worker(1)], runPolicy={"restartPolicy": "Never"})
    assert reason(plan.status, c.COND_FAILED) == c.REASON_POD_FAILED


def test_a_missing_rank_pod_counts_as_a_retryable_failure() -> None:
    plan = run(running_status(), [worker(0)])
    assert plan.status["state"] == c.STATE_RESTARTING and reason(plan.status, c.COND_RESTARTING) == "PodDeleted"


def test_all_ranks_succeeded_starts_the_merge_then_succeeds_with_the_checkpoint() -> None:
    done = [worker(0, phase="Succeeded", exit_code=0), worker(1, phase="Succeeded", exit_code=0)]
    plan = run(running_status(), done, seconds=100)
    assert plan.status["state"] == c.STATE_MERGING and plan.create_merge == 1
    assert condition_is(plan.status, c.COND_MERGING) and not condition_is(plan.status, c.COND_RUNNING)
    again = run(plan.status, [*done, merge_pod(1, phase="Pending")], seconds=101)
    assert again.create_merge is None and again.status["state"] == c.STATE_MERGING
    final = run(again.status, [*done, merge_pod(1, phase="Succeeded", exit_code=0)], seconds=130)
    assert final.status["state"] == c.STATE_SUCCEEDED and condition_is(final.status, c.COND_SUCCEEDED)
    assert final.status["checkpoint"] == "/out/run1/merged/rank_0/telechat20.ckpt"
    assert final.status["completionTime"] == to_timestamp(NOW + timedelta(seconds=130))
    assert not condition_is(final.status, c.COND_MERGING) and final.delete_pods == []


def test_merge_disabled_succeeds_directly_with_the_shards() -> None:
    done = [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")]
    plan = run(running_status(), done, merge={"enabled": False})
    assert plan.status["state"] == c.STATE_SUCCEEDED and plan.create_merge is None
    assert plan.status["checkpoint"] == "/out/run1/checkpoint"


def test_a_failed_merge_is_retried_then_fails_with_merge_failed() -> None:
    done = [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")]
    status = run(running_status(), done).status
    for attempt in range(1, c.MERGE_BACKOFF_LIMIT + 1):
        plan = run(status, [*done, merge_pod(attempt, phase="Failed", exit_code=1)])
        assert plan.create_merge == attempt + 1 and plan.status["state"] == c.STATE_MERGING
        status = plan.status
    last = c.MERGE_BACKOFF_LIMIT + 1
    plan = run(status, [*done, merge_pod(last, phase="Failed", exit_code=1)])
    assert plan.status["state"] == c.STATE_FAILED and reason(plan.status, c.COND_FAILED) == c.REASON_MERGE_FAILED
    assert "shards kept" in plan.status["message"]


def test_suspend_removes_pods_and_resume_starts_a_new_attempt_that_resumes() -> None:
    pods = [worker(0), worker(1)]
    plan = run(running_status(), pods, runPolicy={"suspend": True})
    assert plan.status["state"] == c.STATE_SUSPENDED and condition_is(plan.status, c.COND_SUSPENDED)
    assert sorted(plan.delete_pods) == ["ft-a1-rank-0", "ft-a1-rank-1"]
    assert not condition_is(plan.status, c.COND_RUNNING)
    still = run(plan.status, [], seconds=5, runPolicy={"suspend": True})
    assert still.events == [] and still.create_ranks == []
    resumed = run(still.status, [], seconds=60)
    assert resumed.status["attempt"] == 2 and resumed.create_ranks == [0, 1]
    assert condition_is(resumed.status, c.COND_SUSPENDED, False) and resumed.status["restarts"] == 0
    assert resumed.status["startTime"] == to_timestamp(NOW + timedelta(seconds=60))


def test_a_job_created_suspended_starts_attempt_one_on_resume() -> None:
    plan = run({}, [], runPolicy={"suspend": True})
    assert plan.status["state"] == c.STATE_SUSPENDED and plan.create_ranks == [] and "startTime" not in plan.status
    resumed = run(plan.status, [])
    assert resumed.status["attempt"] == 1 and resumed.create_ranks == [0, 1]


def test_suspending_during_the_merge_merges_again_on_resume() -> None:
    done = [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")]
    merging = run(running_status(), done).status
    suspended = run(merging, [*done, merge_pod(1)], runPolicy={"suspend": True})
    assert "ft-merge-1" in suspended.delete_pods
    resumed = run(suspended.status, [])
    assert resumed.status["state"] == c.STATE_MERGING and resumed.create_merge == 2


def test_active_deadline_fails_the_job() -> None:
    status = running_status()
    early = run(status, [worker(0), worker(1)], seconds=50, runPolicy={"activeDeadlineSeconds": 100})
    assert early.status["state"] == c.STATE_RUNNING and early.requeue_after == 50
    late = run(status, [worker(0), worker(1)], seconds=101, runPolicy={"activeDeadlineSeconds": 100})
    assert late.status["state"] == c.STATE_FAILED and reason(late.status, c.COND_FAILED) == c.REASON_DEADLINE
    assert sorted(late.delete_pods) == ["ft-a1-rank-0", "ft-a1-rank-1"]


def test_ttl_after_finished_removes_the_pods_but_not_before() -> None:
    done = [worker(0, phase="Succeeded"), worker(1, phase="Succeeded"), merge_pod(1, phase="Succeeded")]
    status = run(running_status(), done[:2]).status
    finished = run(status, done, merge={"enabled": True}).status
    assert finished["state"] == c.STATE_SUCCEEDED
    before = run(finished, done, seconds=30, runPolicy={"ttlSecondsAfterFinished": 60})
    assert before.delete_pods == [] and before.requeue_after == 30
    after = run(finished, done, seconds=61, runPolicy={"ttlSecondsAfterFinished": 60})
    assert sorted(after.delete_pods) == ["ft-a1-rank-0", "ft-a1-rank-1", "ft-merge-1"]
    assert after.status["state"] == c.STATE_SUCCEEDED


def test_the_pass_that_finishes_a_job_schedules_its_ttl() -> None:
    done = [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")]
    plan = run(running_status(), done, merge={"enabled": False}, runPolicy={"ttlSecondsAfterFinished": 30})
    assert plan.status["state"] == c.STATE_SUCCEEDED and plan.requeue_after == 30


def test_a_new_generation_updates_observed_generation_on_every_condition() -> None:
    status = running_status()
    spec = make_spec()
    spec = type(spec)(**{**spec.__dict__, "generation": 2})
    plan = reconcile(spec, status, [worker(0), worker(1)], NOW, BACKOFF)
    assert plan.status["observedGeneration"] == 2
    assert {cond["observedGeneration"] for cond in plan.status["conditions"]} == {2}


def test_an_invalid_spec_fails_with_invalid_spec_and_recovers_once_fixed() -> None:
    plan = invalid_spec_plan({}, SpecError("spec.parallel", "bad layout"), generation=3, now=NOW)
    assert plan.status["state"] == c.STATE_FAILED and reason(plan.status, c.COND_FAILED) == c.REASON_INVALID_SPEC
    assert plan.status["message"] == "spec.parallel: bad layout" and plan.events[0].reason == c.REASON_INVALID_SPEC
    assert invalid_spec_plan(plan.status, SpecError("spec.parallel", "bad layout"), 3, NOW).events == []
    fixed = run(plan.status, [])
    assert fixed.status["state"] == c.STATE_PENDING and fixed.create_ranks == [0, 1]
    assert condition_is(fixed.status, c.COND_FAILED, False)


def test_pod_view_reads_the_exit_code_of_the_trainer_container() -> None:
    body = {
        "metadata": {
            "name": "ft-a2-rank-1",
            "labels": {c.LABEL_ROLE: "worker", c.LABEL_ATTEMPT: "2", c.LABEL_NODE_RANK: "1"},
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}],
        },
    }
    view = PodView.from_body(body)
    assert (view.attempt, view.rank, view.exit_code, view.reason) == (2, 1, 137, "Error")


def test_only_plans_set_off_by_a_missing_pod_need_a_consistent_read() -> None:
    """A cached pod list may trail: creates, launches and successes rest on pods seen; deletes, restarts, merge
    retries and failures are what a pod absent only from the cache could set off."""
    running = running_status()
    assert not rests_on_absence({}, run({}, []))  # a new job: creates only
    assert not rests_on_absence(running, run(running, [worker(0), worker(1)]))
    assert not rests_on_absence(running, run(running, [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")]))
    assert rests_on_absence(running, run(running, [worker(0)]))  # rank 1 missing: a restart
    assert rests_on_absence(running, run(running, [worker(0), worker(1, phase="Failed", exit_code=1)]))
    assert rests_on_absence(running, run(running, [worker(0), worker(1)], runPolicy={"suspend": True}))
    merging = run(running, [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")]).status
    assert merging["state"] == c.STATE_MERGING
    ranks_done = [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")]
    merge_missing = run(merging, ranks_done)
    assert merge_missing.create_merge == 1 and not rests_on_absence(merging, merge_missing)  # create: 409-safe
    merge_failed = run(merging, [*ranks_done, merge_pod(1, phase="Failed", exit_code=1)])
    assert merge_failed.create_merge == 2 and rests_on_absence(merging, merge_failed)  # a retry counted


# --- issue 10: why a job is stuck, kept logs, the Restarting reason, deferred edits, progress ---------------------


def unschedulable(rank: int, **extra: Any) -> PodView:
    message = "0/4 nodes are available: 4 Insufficient huawei.com/Ascend910."
    return worker(rank, phase="Pending", blocked=("Unschedulable", message), **extra)


def test_pods_created_by_a_pass_count_as_pending_at_once() -> None:
    plan = run({}, [])
    assert plan.create_ranks == [0, 1] and plan.status["pods"]["pending"] == 2


def test_unschedulable_ranks_stall_the_job_with_the_schedulers_message() -> None:
    launched = run({"attempt": 1, "state": c.STATE_PENDING}, [worker(0, phase="Pending"), worker(1, phase="Pending")])
    plan = run(launched.status, [worker(0, phase="Pending"), unschedulable(1)], seconds=1)
    assert plan.status["state"] == c.STATE_PENDING and condition_is(plan.status, c.COND_STALLED)
    assert reason(plan.status, c.COND_STALLED) == "Unschedulable"
    assert plan.status["message"] == (
        "rank 1 pod ft-a1-rank-1 is Pending: Unschedulable: 0/4 nodes are available: 4 Insufficient"
        " huawei.com/Ascend910."
    )
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Unschedulable")]
    assert plan.status["pods"]["pending"] == 2
    again = run(plan.status, [worker(0, phase="Pending"), unschedulable(1)], seconds=2)
    assert again.events == [] and again.status == plan.status  # one Event per cause, no status churn
    pulling = [
        worker(0, phase="Pending", blocked=("ImagePullBackOff", "container trainer: back-off")),
        unschedulable(1),
    ]
    changed = run(again.status, pulling, seconds=3)
    assert (
        reason(changed.status, c.COND_STALLED) == "ImagePullBackOff"
        and "(and 1 more rank(s))" in changed.status["message"]
    )
    running = run(changed.status, [worker(0), worker(1)], seconds=4)
    assert running.status["state"] == c.STATE_RUNNING and condition_is(running.status, c.COND_STALLED, False)


def test_a_rank_that_is_no_longer_blocked_lowers_stalled_while_still_pending() -> None:
    launched = run({"attempt": 1, "state": c.STATE_PENDING}, [worker(0, phase="Pending"), unschedulable(1)])
    assert condition_is(launched.status, c.COND_STALLED)
    plan = run(launched.status, [worker(0, phase="Pending"), worker(1, phase="Pending")], seconds=1)
    assert condition_is(plan.status, c.COND_STALLED, False) and reason(plan.status, c.COND_STALLED) == "PodsProgressing"


def pending_body(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"phase": "Pending", **status}}


def test_pod_blocker_reads_the_scheduler_condition_and_container_waiting_reasons() -> None:
    from telechat_operator.finetune.status import pod_blocker

    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes fit"}
    assert pod_blocker(pending_body(conditions=[scheduled])) == ("Unschedulable", "0/4 nodes fit")
    pull = {"name": "init", "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}
    assert pod_blocker(pending_body(initContainerStatuses=[pull])) == ("ErrImagePull", "container init: not found")
    creating = {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}
    assert pod_blocker(pending_body(containerStatuses=[creating])) is None
    config = {"name": "trainer", "state": {"waiting": {"reason": "CreateContainerConfigError"}}}
    assert pod_blocker(pending_body(containerStatuses=[config]))[0] == "CreateContainerConfigError"  # type: ignore[index]
    assert pod_blocker({"metadata": {"name": "p"}, "status": {"phase": "Running"}}) is None
    view = PodView.from_body(
        {
            "metadata": {"name": "p", "labels": {}},
            "spec": {"activeDeadlineSeconds": 1},
            **pending_body(conditions=[scheduled]),
        }
    )
    assert view.blocked == ("Unschedulable", "0/4 nodes fit") and view.stopping


def test_a_non_retryable_failure_keeps_every_rank_pod_and_stops_the_running_ones() -> None:
    pods = [worker(0), worker(1, phase="Failed", exit_code=1), worker(2, phase="Pending")]
    status = running_status()
    plan = run(status, pods, nodes=3, parallel={"dataParallel": 3})
    assert plan.status["state"] == c.STATE_FAILED and reason(plan.status, c.COND_FAILED) == c.REASON_NON_RETRYABLE_EXIT
    assert plan.stop_pods == ["ft-a1-rank-0"]  # its log stays: it is stopped in place
    assert plan.delete_pods == ["ft-a1-rank-2"]  # never started: nothing to keep
    # Later passes leave the stopping and the stopped pods alone until the TTL.
    later = run(plan.status, [worker(0, stopping=True), pods[1]], seconds=5, nodes=3, parallel={"dataParallel": 3})
    assert (later.stop_pods, later.delete_pods) == ([], [])
    stopped = [worker(0, phase="Failed", reason="DeadlineExceeded", stopping=True), pods[1]]
    ttl = {"ttlSecondsAfterFinished": 60}
    kept = run(plan.status, stopped, seconds=30, nodes=3, parallel={"dataParallel": 3}, runPolicy=ttl)
    assert (kept.stop_pods, kept.delete_pods, kept.requeue_after) == ([], [], 30)
    expired = run(plan.status, stopped, seconds=61, nodes=3, parallel={"dataParallel": 3}, runPolicy=ttl)
    assert sorted(expired.delete_pods) == ["ft-a1-rank-0", "ft-a1-rank-1"]


def test_the_restarting_condition_and_event_name_the_failed_rank_and_exit_code() -> None:
    plan = run(running_status(), [worker(0), worker(1, phase="Failed", exit_code=137)], seconds=10)
    cond = next(cond for cond in plan.status["conditions"] if cond["type"] == c.COND_RESTARTING)
    assert cond["reason"] == "ExitCode137"
    assert cond["message"].startswith("rank 1 failed with exit code 137 (pod ft-a1-rank-1); restarting all ranks")
    (event,) = plan.events
    assert (event.reason, event.message) == ("Restarting", cond["message"])
    lost = run(running_status(), [worker(0)], seconds=10)
    assert "rank 1 failed: PodDeleted" in lost.status["message"]


def test_editing_a_mutable_field_of_a_running_job_says_it_waits_for_the_next_restart() -> None:
    status = running_status()
    assert status["podSpecHashes"]["image"]
    plan = run(
        status, [worker(0), worker(1)], seconds=5, image="telechat-runtime:v2", env=[{"name": "X", "value": "1"}]
    )
    cond = next(cond for cond in plan.status["conditions"] if cond["type"] == c.COND_SPEC_APPLIED)
    assert (cond["status"], cond["reason"]) == ("False", "WaitingForRestart")
    assert cond["message"].startswith("spec.image, spec.env changed while attempt 1 runs")
    assert [e.reason for e in plan.events] == ["SpecChangeDeferred"]
    assert plan.create_ranks == [] and plan.delete_pods == []  # nothing is restarted for it
    again = run(
        plan.status, [worker(0), worker(1)], seconds=6, image="telechat-runtime:v2", env=[{"name": "X", "value": "1"}]
    )
    assert again.events == []
    # Fields that act on the job itself are not deferred.
    policy = run(status, [worker(0), worker(1)], seconds=5, runPolicy={"backoffLimit": 9, "ttlSecondsAfterFinished": 5})
    assert not any(cond["type"] == c.COND_SPEC_APPLIED for cond in policy.status["conditions"])
    # The next group is built from the edited spec: applied.
    failed = run(
        plan.status,
        [worker(0), worker(1, phase="Failed", exit_code=137)],
        seconds=10,
        image="telechat-runtime:v2",
        env=[{"name": "X", "value": "1"}],
    )
    relaunch = run(failed.status, [], seconds=60, image="telechat-runtime:v2", env=[{"name": "X", "value": "1"}])
    assert relaunch.create_ranks == [0, 1] and condition_is(relaunch.status, c.COND_SPEC_APPLIED)
    assert "SpecApplied" in [e.reason for e in relaunch.events]


def test_progress_from_rank_0_lands_in_the_status_and_is_kept_without_a_new_document() -> None:
    doc = {
        "workers": 2,
        "ranks": [
            {"rank": 0, "step": 8, "totalSteps": 16, "loss": 3.0, "stepSeconds": 2.0, "tokensPerSecond": 512.0,
             "time": 1767322800.0, "checkpointSteps": [4, 8]},
            {"rank": 1, "step": 8, "totalSteps": 16, "loss": 3.5, "stepSeconds": 2.0, "time": 1767322800.0,
             "checkpointSteps": [4]},
        ],
    }  # fmt: skip
    status = running_status()
    plan = reconcile(make_spec(), status, [worker(0), worker(1)], NOW, BACKOFF, progress=doc)
    progress = plan.status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["loss"], progress["eta"]) == (8, 16, 3.25, "16s")
    assert progress["checkpoint"] == {"step": 4, "ranks": 2, "newer": {"step": 8, "ranks": 1}}
    kept = reconcile(make_spec(), plan.status, [worker(0), worker(1)], NOW, BACKOFF, progress=None)
    assert kept.status["progress"] == progress


INIT = {
    "dataset": {"path": "/d/train.mindrecord", "jsonl": "/d/train.jsonl", "tokenizer": "/d/tokenizer.model"},
    "checkpoint": {"huggingface": "/models/hf"},
}


def test_the_chosen_layout_is_in_the_status() -> None:
    status = run({}, [], parallel=None).status
    assert status["layout"]["source"] == "Planned"
    assert (status["layout"]["dataParallel"], status["layout"]["modelParallel"]) == (2, 1)
    assert status["layout"]["estimatedMemoryPerDevice"].endswith("Gi")
    assert run({}, []).status["layout"]["source"] == "Spec"


def test_a_job_with_initializers_creates_the_init_pod_before_any_rank() -> None:
    plan = run({}, [], **INIT)
    assert plan.create_init and plan.create_ranks == [] and not plan.ensure_children
    assert plan.status["state"] == c.STATE_INITIALIZING
    assert reason(plan.status, c.COND_INITIALIZED) == "Initializing"
    assert "telechat2 preprocess and telechat2 convert" in plan.status["message"]
    again = run(plan.status, [init_pod("Running")], **INIT)  # running: nothing to create, no new event
    assert not again.create_init and again.create_ranks == [] and again.events == []
    assert again.status["state"] == c.STATE_INITIALIZING


def test_ranks_start_in_the_pass_that_sees_the_init_pod_succeed_and_never_look_back() -> None:
    plan = run({}, [], **INIT)
    done = run(plan.status, [init_pod("Succeeded")], **INIT)
    assert condition_is(done.status, c.COND_INITIALIZED)
    assert done.create_ranks == [0, 1] and done.ensure_children and not done.create_init
    assert [e.reason for e in done.events] == ["Initialized"]
    # The init pod gone (TTL, a user) changes nothing once the status says Initialized.
    later = run(done.status, [worker(0), worker(1)], **INIT)
    assert not later.create_init and later.status["state"] == c.STATE_RUNNING


def test_a_failed_init_pod_fails_the_job_with_its_termination_message() -> None:
    plan = run({}, [], **INIT)
    message = "preprocess: telechat2 preprocess: 1 malformed line(s): line 3: invalid JSON"
    failed = run(plan.status, [init_pod("Failed", exit_code=1, message=message)], **INIT)
    assert failed.status["state"] == c.STATE_FAILED and failed.create_ranks == []
    assert reason(failed.status, c.COND_FAILED) == c.REASON_INITIALIZER_FAILED
    failed_condition = next(cond for cond in failed.status["conditions"] if cond["type"] == c.COND_FAILED)
    assert "line 3: invalid JSON" in failed_condition["message"] and "ft-init" in failed_condition["message"]
    assert failed.status["lastFailure"]["reason"] == c.REASON_INITIALIZER_FAILED
    assert failed.status["lastFailure"]["exitCode"] == 1
    assert rests_on_absence(plan.status, failed)  # decided again on a consistent read before it is written


def test_a_suspended_job_recreates_its_init_pod_once_the_old_one_is_gone() -> None:
    plan = run({}, [], **INIT)
    suspended = run(plan.status, [init_pod("Running")], runPolicy={"suspend": True}, **INIT)
    assert suspended.delete_pods == ["ft-init"]
    resumed = run(suspended.status, [init_pod("Running", deleting=True)], **INIT)
    assert not resumed.create_init and resumed.requeue_after is not None
    assert run(resumed.status, [], **INIT).create_init


def test_init_pod_view_reads_the_failed_containers_termination_message() -> None:
    body = {
        "metadata": {"name": "ft-init", "labels": {c.LABEL_ROLE: c.ROLE_INITIALIZER, c.LABEL_ATTEMPT: "1"}},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"name": c.PREPROCESS_CONTAINER, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
                {
                    "name": c.CONVERT_CONTAINER,
                    "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "1 missing tensor(s): x\n"}},
                },
            ],
        },
    }
    view = PodView.from_body(body)
    assert (view.exit_code, view.message) == (1, "convert: 1 missing tensor(s): x")
