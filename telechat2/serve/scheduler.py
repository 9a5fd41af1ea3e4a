"""One generation thread fed by a bounded queue: many clients, one model, no request lost.

The thread owns the model (MindSpore is not re-entrant; the event loop stays free for other clients, health checks
and streaming). With an engine that can batch (`open_batch`), it runs continuous batching: at every step boundary
it first drops cancelled sequences, then admits waiting requests into free rows of the decode batch (at most
`prefill_tokens` prompt tokens per boundary, so a burst of long prompts does not stall the running sequences for
long), then runs one batch step: the prompts just admitted are prefilled together (one packed pass with the
`telechat2.batched` generator) and give their first tokens, then one batched decode step gives every running
sequence its next token. An idle batch that gets a request waits for more before its first step, until no new
request came for `admit_wait` (10 ms) or `admit_wait_max` (50 ms) after the first, so a burst of clients arriving a
few milliseconds apart shares one prefill instead of one prefill each (a lone request waits 10 ms).
Up to `max_batch` requests run together; up to `max_queue` more wait; the next gets `QueueFull` (HTTP 503 +
Retry-After). A stream-only engine runs one request at a time, first come first served.

Tokens cross from the worker thread to the request's event loop through `loop.call_soon_threadsafe`, once per batch
step for all of its rows (one wake-up of the loop per step, not one per token). A job is
cancelled by setting its event: a waiting job is skipped, a running one leaves the batch at the next step boundary
(its row is free for the next request).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from telechat2.serve.engine import Batch, Emission, Engine, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting line is full; `retry_after` is an estimate in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"server busy: the request queue is full, retry in {retry_after}s")
        self.retry_after = retry_after


class NotReady(Exception):
    """The model is still loading (or failed to load)."""


@dataclass
class Job:
    input_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[tuple[str, object]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished: bool = False  # set by the worker before it reports the end
    end_reason: str | None = None  # the generator's: "stop" (stop token), "length", "cancelled"
    cancel_reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this job; the first reason wins and a finished job stays finished (safe from any thread)."""
        if not self.finished and self.cancel_reason is None:
            self.cancel_reason = reason
        self.cancelled.set()

    def _emit(self, kind: str, value: object) -> None:
        _hand_over(self.loop, [(self, kind, value)])

    async def token_batches(self) -> AsyncIterator[list[int]]:
        """Like `tokens`, but every token already waiting comes at once (one hop to a detokenizing thread)."""
        while True:
            kind, value = await self.events.get()
            batch: list[int] = []
            while kind == "token":
                batch.append(value)  # type: ignore[arg-type]
                if self.events.empty():
                    break
                kind, value = self.events.get_nowait()
            if batch:
                yield batch
            if kind == "error":
                raise value  # type: ignore[misc]
            if kind != "token":
                return

    async def tokens(self) -> AsyncIterator[int]:
        """Generated ids as they come; raises the generator's exception if it failed."""
        while True:
            kind, value = await self.events.get()
            if kind == "token":
                yield value  # type: ignore[misc]
            elif kind == "error":
                raise value  # type: ignore[misc]
            else:
                return


def _put_all(items: list[tuple[Job, str, object]]) -> None:
    """On the event loop: events for its requests (one, or a whole batch step's), in order."""
    for job, kind, value in items:
        job.events.put_nowait((kind, value))


def _hand_over(loop: asyncio.AbstractEventLoop, items: list[tuple[Job, str, object]]) -> None:
    """From the worker thread: the events to their requests' loop, in one wake-up of it."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
        for job, _, _ in items:
            job.cancelled.set()


class Scheduler:
    """Owns the worker thread and the waiting line; `engine` is set once the model has loaded."""

    def __init__(
        self,
        max_queue: int,
        on_job_done: Callable[[Job, int, float], None] | None = None,
        max_batch: int = 1,
        prefill_tokens: int = 2048,
        admit_wait: float = 0.01,
        admit_wait_max: float = 0.05,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.engine: Engine | None = None
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.admit_wait = admit_wait  # seconds an idle batch waits for the next request of a burst
        self.admit_wait_max = max(admit_wait, admit_wait_max)  # and at most this long after the burst's first one
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._active: dict[int, Job] = {}  # running jobs by sequence id (one at most without batching)
        self._generated: dict[int, int] = {}
        self._next_id = 0
        # A batch step's events, per event loop, handed over in one call: one loop wake-up per step, not one per
        # token of every row (`None`: outside a step's delivery, events go out one by one).
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Job, str, object]]] | None = None
        self._avg_seconds = 1.0  # moving average of a job's run time, for Retry-After
        self._on_job_done = on_job_done

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        """Requests generating now: the decode batch's size."""
        return len(self._active)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="telechat2-generate", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running and the waiting jobs, then stop the worker."""
        for job in list(self._active.values()):
            job.cancel("server shutting down")
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel("server shutting down")
                job._emit("error", NotReady("server shutting down"))
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, input_ids: list[int], params: SamplingParams) -> Job:
        """Queue a job from the event loop; raises NotReady or QueueFull at once, never blocks."""
        if self.engine is None:
            raise NotReady("model is loading")
        job = Job(input_ids=list(input_ids), params=params, loop=asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.retry_after()) from None
        return job

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: a slot frees when a running job ends, so about one job's time."""
        return max(1, math.ceil(self._avg_seconds))

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._skip_cancelled(job):
                continue
            assert self.engine is not None
            if hasattr(self.engine, "open_batch") and self.max_batch > 1:
                self._run_batched(job)  # runs until the server stops
                return
            self._run(job)

    def _skip_cancelled(self, job: Job) -> bool:
        if not job.cancelled.is_set():
            return False
        job.finished, job.end_reason = True, "cancelled"  # the client left while waiting
        job._emit("done", "cancelled")
        return True

    def _post(self, job: Job, kind: str, value: object) -> None:
        if self._outbox is None:
            job._emit(kind, value)
        else:
            self._outbox.setdefault(job.loop, []).append((job, kind, value))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox or {}, None
        for loop, items in outbox.items():
            _hand_over(loop, items)

    def _finish(self, seq_id: int, reason: str | None, error: BaseException | None = None) -> None:
        job = self._active.pop(seq_id)
        generated = self._generated.pop(seq_id, 0)
        job.finished, job.end_reason = True, reason
        if error is not None:
            self._post(job, "error", error)
        else:
            self._post(job, "done", reason)
        assert job.started_at is not None
        elapsed = time.monotonic() - job.started_at
        self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * elapsed
        if self._on_job_done is not None:
            self._on_job_done(job, generated, elapsed)

    # -- continuous batching ---------------------------------------------------------------------------------------

    def _run_batched(self, first: Job) -> None:
        """Admit, step, repeat; returns when stop() queues the end marker."""
        assert self.engine is not None
        batch = self.engine.open_batch(self.max_batch)  # type: ignore[attr-defined]
        pending: Job | None = first
        while True:
            for seq_id, job in list(self._active.items()):
                if job.cancelled.is_set():
                    batch.remove(seq_id)
                    self._finish(seq_id, "cancelled")
            prefilled = admitted = 0
            was_idle = not self._active
            gather_until: float | None = None
            gather_deadline = 0.0
            while len(self._active) < self.max_batch and prefilled < self.prefill_tokens:
                if pending is not None:
                    job, pending = pending, None
                else:
                    try:
                        if not self._active:
                            job = self._queue.get()  # idle: wait for work
                        elif gather_until is not None:  # a burst is arriving: its requests share one prefill
                            job = self._queue.get(timeout=max(0.0, gather_until - time.monotonic()))
                        else:
                            job = self._queue.get_nowait()  # busy: take what waits
                    except queue.Empty:
                        break
                if job is None:
                    for seq_id in list(self._active):
                        batch.remove(seq_id)
                        self._finish(seq_id, "cancelled")
                    return
                if self._skip_cancelled(job):
                    continue
                prefilled += len(job.input_ids)
                admitted += 1
                self._admit(batch, job)
                if was_idle and self.admit_wait > 0:  # a burst: wait until it pauses for admit_wait, within limits
                    now = time.monotonic()
                    if gather_until is None:
                        gather_deadline = now + self.admit_wait_max
                    gather_until = min(now + self.admit_wait, gather_deadline)
            if self._active:
                rows, step_started = len(self._active), time.monotonic()
                try:
                    emitted = batch.step()
                except Exception as exc:  # a failed step leaves no row trustworthy: fail the batch, start afresh
                    log.exception("batched decode step failed")
                    for seq_id in list(self._active):
                        self._finish(seq_id, "error", exc)
                    batch = self.engine.open_batch(self.max_batch)  # type: ignore[attr-defined]
                    continue
                stepped = time.monotonic()
                self._outbox = {}
                try:
                    for emission in emitted:
                        self._deliver(emission)
                finally:
                    self._flush()
                if log.isEnabledFor(logging.DEBUG):  # the step trace the serving benchmark's profile reads
                    log.debug(
                        "step rows=%d admitted=%d step_ms=%.1f deliver_ms=%.1f",
                        rows,
                        admitted,
                        1e3 * (stepped - step_started),
                        1e3 * (time.monotonic() - stepped),
                    )

    def _admit(self, batch: Batch, job: Job) -> None:
        self._next_id += 1
        seq_id = self._next_id
        job.started_at = time.monotonic()
        self._active[seq_id] = job
        try:
            emission = batch.add(seq_id, job.input_ids, job.params)
        except Exception as exc:  # reported to the one request that caused it (bad ids, say); the batch lives on
            log.exception("prefill failed")
            batch.remove(seq_id)
            self._finish(seq_id, "error", exc)
            return
        if emission is not None:
            self._deliver(emission)

    def _deliver(self, emission: Emission) -> None:
        seq_id = emission.seq_id
        job = self._active[seq_id]
        if emission.token is not None:
            self._generated[seq_id] = self._generated.get(seq_id, 0) + 1
            self._post(job, "token", int(emission.token))
        if emission.finish is not None:
            self._finish(seq_id, emission.finish)

    # -- one request at a time (stream-only engines) ----------------------------------------------------------------

    def _run(self, job: Job) -> None:
        assert self.engine is not None
        self._next_id += 1
        seq_id = self._next_id
        self._active[seq_id] = job
        job.started_at = time.monotonic()
        tokens = None
        reason: str | None = None
        error: BaseException | None = None
        try:
            tokens = self.engine.stream(job.input_ids, job.params, should_stop=job.cancelled.is_set)
            while True:
                try:
                    token = next(tokens)
                except StopIteration as end:  # the generator's return value says why: stop, length, cancelled
                    reason = end.value
                    break
                self._generated[seq_id] = self._generated.get(seq_id, 0) + 1
                job._emit("token", int(token))
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
        except Exception as exc:  # reported to the one request that caused it; the worker lives on
            log.exception("generation failed")
            error = exc
        finally:
            if tokens is not None and hasattr(tokens, "close"):
                tokens.close()  # a generator left early runs its cleanup now, not at garbage collection
            self._finish(seq_id, reason, error)
