"""API refusals the operator cannot fix by retrying at once, for both kinds: what to tell the user, when to retry.

A write the apiserver refuses with a 4xx the user can only fix in the spec (400 malformed or strict-decoding error,
422 invalid) is an InvalidSpec. Anything else that is not the reconciler's own race (409) or a deletion under way
is a *refusal*: a 403 from admission (no PriorityClass or ServiceAccount of that name, a quota, a policy), a 500
(other than a server-side apply's schema error, see `is_spec_error`), a 404 for a missing namespaced dependency.
The cause may go away without a spec change (someone creates the PriorityClass), so the operator keeps retrying,
with exponential backoff, and says in a condition which object was refused and why.

Pure: no API calls, no clock reads. `RefusalTracker` is the per-resource count of consecutive refusals the
controllers keep in memory (an operator restart starts the backoff over, which is harmless).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from datetime import datetime
from typing import Any

from telechat_operator.common.conditions import Backoff, Event, condition_is, set_condition

REASON_REQUEST_REFUSED = "RequestRefused"
# TeleChatFinetune: a condition of its own, True while the operator's requests are refused (like a Deployment's
# ReplicaFailure), False once they are accepted again; the job's state is left as it was (usually Pending).
COND_REQUEST_REFUSED = "RequestRefused"
REASON_REQUESTS_ACCEPTED = "RequestsAccepted"
# Statuses that are a problem with the object built from the spec: reported as InvalidSpec, not retried.
SPEC_ERROR_STATUSES = frozenset({400, 422})
# A server-side apply whose body does not fit the schema (an unknown field passed through from the spec, a list
# with duplicate keys) is answered 500 with this message: as deterministic as a 422, so an InvalidSpec too.
TYPED_PATCH_ERROR = "failed to create typed patch object"


def is_spec_error(status: int, message: str = "") -> bool:
    return status in SPEC_ERROR_STATUSES or (status == 500 and TYPED_PATCH_ERROR in message)


def refusal_message(described: str, refusals: int, delay: float) -> str:
    """The condition message: the refused request with the apiserver's words, and when the operator tries again."""
    return f"{described} (refused {refusals} time(s) in a row; retrying in {delay:g}s)"


class RefusalTracker:
    """Consecutive refusals per key; the n-th waits `backoff.delay(n)` before the next attempt."""

    def __init__(self) -> None:
        self._counts: dict[Hashable, int] = {}
        self._lock = threading.Lock()  # reconcile passes run on worker threads

    def refused(self, key: Hashable, backoff: Backoff) -> tuple[int, float]:
        """Record one more refusal; returns (consecutive refusals, seconds until the next attempt)."""
        with self._lock:
            count = self._counts[key] = self._counts.get(key, 0) + 1
        return count, backoff.delay(count)

    def succeeded(self, key: Hashable) -> None:
        with self._lock:
            self._counts.pop(key, None)

    def count(self, key: Hashable) -> int:
        with self._lock:
            return self._counts.get(key, 0)


def mark_refused(status: dict[str, Any], message: str, now: datetime, generation: int) -> Event | None:
    """A finetune's status after a refusal (in place); the Event to post, on the first refusal of a run only."""
    first = not condition_is(status, COND_REQUEST_REFUSED)
    set_condition(status, COND_REQUEST_REFUSED, True, REASON_REQUEST_REFUSED, message, now, generation)
    status["message"] = message
    return Event("Warning", REASON_REQUEST_REFUSED, message) if first else None


def clear_refused(status: dict[str, Any], now: datetime, generation: int) -> None:
    """Every request of a pass was accepted: lower the condition, if it was raised."""
    if condition_is(status, COND_REQUEST_REFUSED):
        message = "the apiserver accepts the operator's requests again"
        set_condition(status, COND_REQUEST_REFUSED, False, REASON_REQUESTS_ACCEPTED, message, now, generation)
