"""Status conditions, Events and the restart backoff, as both kinds write them.

Pure: no API calls, no clock reads (the caller passes `now`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from telechat_operator.common import constants as c


def to_timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_timestamp(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1 after the n-th restart: base * 2^(n-1), capped."""

    base_seconds: float = 10.0
    max_seconds: float = 300.0

    def delay(self, restarts: int) -> float:
        return min(self.base_seconds * (2 ** max(restarts - 1, 0)), self.max_seconds)


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def set_condition(
    status: dict[str, Any], kind: str, value: bool, reason: str, message: str, now: datetime, generation: int
) -> None:
    """Upsert one condition; lastTransitionTime moves only when the True/False value flips."""
    wanted = "True" if value else "False"
    conditions: list[dict[str, Any]] = status.setdefault("conditions", [])
    current = next((cond for cond in conditions if cond["type"] == kind), None)
    if current is None:
        current = {"type": kind}
        conditions.append(current)
    if current.get("status") != wanted:
        current["lastTransitionTime"] = to_timestamp(now)
    current.update(status=wanted, reason=reason, message=message, observedGeneration=generation)
    order = {kind: index for index, kind in enumerate(c.CONDITION_TYPES)}
    conditions.sort(key=lambda cond: order.get(cond["type"], len(order)))


def condition_is(status: Mapping[str, Any], kind: str, value: bool = True) -> bool:
    wanted = "True" if value else "False"
    return any(cond["type"] == kind and cond.get("status") == wanted for cond in status.get("conditions") or [])
