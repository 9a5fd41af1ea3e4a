"""Training progress in the job's status (pure): rank 0's `GET /progress` document in, `status.progress` out.

The document (`telechat2.progress`) is `{"workers": N, "ranks": [record, ...]}`, one record per training rank as
that rank last wrote it: step, totalSteps, loss, stepSeconds, tokensPerSecond, time, checkpointSteps. The status
shows the slowest rank's step (synchronous training moves together; a lagging rank is what the job waits for),
the mean of the ranks' latest losses, rank 0's throughput (each record estimates the whole job's), the ETA from
the remaining steps at the ranks' mean step time, and the newest complete checkpoint: the newest step whose
checkpoint file every one of the N ranks has (what a restart resumes from).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def format_duration(seconds: float) -> str:
    """Compact, for the ETA printer column: 45s, 12m05s, 3h07m, 2d04h."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def newest_complete_checkpoint(records: list[Mapping[str, Any]], workers: int) -> dict[str, Any] | None:
    """`{"step", "ranks"}`: the newest step every rank 0..workers-1 has a checkpoint file for (what a restart
    resumes from), and with `newer` the newest step only some ranks have yet (a save in progress, or a rank that
    died before saving) and how many have it. None when no rank has saved anything."""
    by_rank: dict[int, set[int]] = {}
    for record in records:
        steps = record.get("checkpointSteps") or []
        by_rank[int(record["rank"])] = {int(s) for s in steps if isinstance(s, int) and not isinstance(s, bool)}
    ranks = [by_rank.get(rank, set()) for rank in range(workers)]
    every = set.union(*ranks) if ranks else set()
    if not every:
        return None
    complete = set.intersection(*ranks)
    result: dict[str, Any] = {"step": max(complete), "ranks": workers} if complete else {"ranks": 0}
    newest = max(every)
    if not complete or newest > max(complete):
        result["newer"] = {"step": newest, "ranks": sum(newest in steps for steps in ranks)}
    return result


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_status(document: Any) -> dict[str, Any] | None:
    """`status.progress` from a progress document, or None when it holds nothing usable (no error: no progress)."""
    if not isinstance(document, Mapping):
        return None
    workers = document.get("workers")
    records = [r for r in document.get("ranks") or [] if isinstance(r, Mapping) and isinstance(r.get("rank"), int)]
    if not isinstance(workers, int) or workers < 1:
        return None
    records = [r for r in records if 0 <= r["rank"] < workers and isinstance(r.get("step"), int)]
    if not records:
        return None
    step = min(int(r["step"]) for r in records)
    totals = [int(r["totalSteps"]) for r in records if isinstance(r.get("totalSteps"), int) and r["totalSteps"] > 0]
    total = max(totals) if totals else None
    progress: dict[str, Any] = {"step": step, "ranksReporting": len(records), "ranks": workers}
    if total is not None:
        progress["totalSteps"] = total
    losses = [loss for r in records if (loss := _number(r.get("loss"))) is not None]
    if losses:
        progress["loss"] = round(sum(losses) / len(losses), 6)
    rank0 = next((r for r in records if r["rank"] == 0), records[0])
    if (throughput := _number(rank0.get("tokensPerSecond"))) is not None:
        progress["tokensPerSecond"] = round(throughput, 1)
    step_times = [t for r in records if (t := _number(r.get("stepSeconds"))) is not None and t > 0]
    if step_times:
        progress["stepSeconds"] = round(sum(step_times) / len(step_times), 4)
    if total is not None and step_times:
        eta = max(total - step, 0) * sum(step_times) / len(step_times)
        progress["etaSeconds"] = round(eta)
        progress["eta"] = format_duration(eta)
    times = [t for r in records if (t := _number(r.get("time"))) is not None]
    if times:
        progress["updateTime"] = _timestamp(max(times))  # the newest record's, so an idle job's status stays put
    checkpoint = newest_complete_checkpoint(records, workers)
    if checkpoint is not None:
        progress["checkpoint"] = checkpoint
    return progress
