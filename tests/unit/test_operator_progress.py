"""Training progress: the pure document -> status.progress function and the non-blocking poller."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from telechat_operator.common import constants as c
from telechat_operator.finetune.progress import format_duration, newest_complete_checkpoint, progress_status
from telechat_operator.finetune.progress_poll import ProgressPoller, progress_url


def record(rank: int, step: int, **extra: Any) -> dict[str, Any]:
    base = {
        "rank": rank,
        "step": step,
        "totalSteps": 100,
        "loss": 2.0 + rank,
        "stepSeconds": 1.5,
        "tokensPerSecond": 1000.0 + rank,
        "time": 1767322800.0 + rank,
        "checkpointSteps": [],
    }
    return {**base, **extra}


def test_progress_shows_the_slowest_step_mean_loss_rank0_throughput_and_eta() -> None:
    doc = {"workers": 2, "ranks": [record(0, 40), record(1, 38, stepSeconds=2.5)]}
    progress = progress_status(doc)
    assert progress is not None
    assert (progress["step"], progress["totalSteps"], progress["loss"]) == (38, 100, 2.5)
    assert progress["tokensPerSecond"] == 1000.0
    assert progress["stepSeconds"] == 2.0 and progress["etaSeconds"] == 124 and progress["eta"] == "2m04s"
    assert progress["updateTime"] == "2026-01-02T03:00:01Z"
    assert (progress["ranks"], progress["ranksReporting"]) == (2, 2)
    assert "checkpoint" not in progress


def test_the_newest_complete_checkpoint_is_the_newest_step_every_rank_saved() -> None:
    records = [record(0, 30, checkpointSteps=[10, 20, 30]), record(1, 30, checkpointSteps=[10, 20])]
    assert newest_complete_checkpoint(records, 2) == {"step": 20, "ranks": 2, "newer": {"step": 30, "ranks": 1}}
    records[1]["checkpointSteps"].append(30)
    assert newest_complete_checkpoint(records, 2) == {"step": 30, "ranks": 2}
    # A rank that never reported has nothing: no step is complete yet.
    assert newest_complete_checkpoint(records, 3) == {"ranks": 0, "newer": {"step": 30, "ranks": 2}}
    assert newest_complete_checkpoint([record(0, 5)], 1) is None


@pytest.mark.parametrize(
    "doc",
    [None, "text", {}, {"workers": 0, "ranks": [record(0, 1)]}, {"workers": 2, "ranks": []},
     {"workers": 2, "ranks": [{"rank": "0", "step": 1}, {"rank": 5, "step": 1}, {"rank": 1}]}],
)  # fmt: skip
def test_documents_without_a_usable_record_give_no_progress(doc: Any) -> None:
    assert progress_status(doc) is None


def test_non_finite_and_missing_numbers_are_left_out() -> None:
    doc = {"workers": 1, "ranks": [{"rank": 0, "step": 3, "loss": float("nan"), "tokensPerSecond": None}]}
    assert progress_status(doc) == {"step": 3, "ranks": 1, "ranksReporting": 1}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45.4, "45s"), (725, "12m05s"), (3 * 3600 + 7 * 60, "3h07m"), (2 * 86400 + 4 * 3600, "2d04h")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def pod(rank: int, attempt: int = 1, phase: str = "Running", ip: str | None = "10.0.0.5") -> dict[str, Any]:
    labels = {c.LABEL_ROLE: c.ROLE_WORKER, c.LABEL_NODE_RANK: str(rank), c.LABEL_ATTEMPT: str(attempt)}
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": f"ft-a{attempt}-rank-{rank}", "labels": labels}, "status": status}


def test_progress_url_is_rank_0_of_the_current_attempt_once_it_runs() -> None:
    assert progress_url(1, [pod(1), pod(0)]) == "http://10.0.0.5:8119/progress"
    assert progress_url(2, [pod(0)]) is None  # an old attempt's rank 0
    assert progress_url(1, [pod(0, phase="Pending")]) is None
    assert progress_url(1, [pod(0, ip=None)]) is None
    assert progress_url(1, [pod(0, ip="fd00::5")]) == "http://[fd00::5]:8119/progress"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_poller_never_blocks_fetches_in_the_background_and_reports_changes() -> None:
    release = threading.Event()
    fetched: list[str] = []
    changes: list[Any] = []

    def fetch(url: str, timeout: float) -> Any:
        fetched.append(url)
        release.wait(10)
        return {"workers": 1, "n": len(fetched)}

    clock = FakeClock()
    poller = ProgressPoller(30, 2, on_change=changes.append, fetch=fetch, clock=clock, tick=3600)
    try:
        started = time.monotonic()
        assert poller.latest("job", "http://a/progress") is None  # the fetch hangs: the pass does not
        assert time.monotonic() - started < 1
        release.set()
        wait_until(lambda: changes == ["job"])
        assert poller.latest("job", "http://a/progress") == {"workers": 1, "n": 1}
        assert fetched == ["http://a/progress"]  # not due again before the interval
        clock.now = 31
        poller.poll_due()
        wait_until(lambda: len(changes) == 2)
        # A new rank 0 (after a restart): the old document is not shown for it.
        assert poller.latest("job", "http://b/progress") is None
    finally:
        poller.stop()


def test_unreachable_pods_back_off_and_report_nothing() -> None:
    calls: list[float] = []
    clock = FakeClock()

    def fetch(url: str, timeout: float) -> Any:
        calls.append(clock.now)
        raise OSError("no route to host")

    changes: list[Any] = []
    poller = ProgressPoller(10, 2, on_change=changes.append, fetch=fetch, clock=clock, tick=3600, max_backoff=60)
    try:
        assert poller.latest("job", "http://10.0.0.9:8119/progress") is None
        wait_until(lambda: len(calls) == 1)
        for now in (15, 19, 21, 41, 61, 100, 161):
            clock.now = now
            poller.poll_due()
            time.sleep(0.05)
        # Retries after 20 s, then 40 s, then capped at 60 s: at 0, 21, 61, 161 (15, 19, 41, 100 too early).
        wait_until(lambda: len(calls) == 4)
        assert calls == [0, 21, 61, 161] and changes == []
        assert poller.latest("job", "http://10.0.0.9:8119/progress") is None
    finally:
        poller.stop()


def test_polling_off_when_the_interval_is_zero() -> None:
    poller = ProgressPoller(0, 2, fetch=lambda url, timeout: pytest.fail("fetched"))
    assert poller.latest("job", "http://a/progress") is None
    poller.stop()
