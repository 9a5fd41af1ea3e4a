"""Prometheus metrics (prometheus_client's default registry, served by `telechat-operator run --metrics-port`).

Names follow Kubeflow's training_operator_jobs_*_total so existing dashboards translate directly.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_BY_STATE = Gauge(
    "telechat_operator_jobs",
    "TeleChat jobs currently known to this operator, by kind and state",
    ["kind", "state"],
)
RECONCILE_SECONDS = Histogram(
    "telechat_operator_reconcile_duration_seconds",
    "Wall time of one reconcile pass (read, decide, write)",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "telechat_operator_reconcile_errors_total", "Reconcile passes that raised and were retried", ["kind"]
)
RESTARTS = Counter(
    "telechat_operator_jobs_restarted_total", "Whole-group restarts (new attempts after a failure)", ["kind"]
)
MERGES = Counter("telechat_operator_merges_total", "Merge pods created", ["kind"])
JOBS_FINISHED = Counter(
    "telechat_operator_jobs_finished_total", "Jobs that reached a terminal state", ["kind", "state"]
)
API_REQUESTS = Counter(
    "telechat_operator_api_requests_total",
    "Kubernetes API requests made by the reconcilers (kopf's long-lived watch streams not included)",
    ["verb", "resource"],
)


class StateTracker:
    """Keeps JOBS_BY_STATE equal to the last state seen per object (set, never incremented blindly)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._states: dict[tuple[str, str], str] = {}

    def observe(self, key: tuple[str, str], state: str | None) -> None:
        previous = self._states.pop(key, None)
        if previous is not None:
            JOBS_BY_STATE.labels(kind=self.kind, state=previous).dec()
        if state is not None:
            self._states[key] = state
            JOBS_BY_STATE.labels(kind=self.kind, state=state).inc()
