"""One generation thread fed by a bounded queue: many clients, one model, no request lost.

Why not batching: the generator decodes one sequence with its KV cache; batching would need padded batched decode
in the model. Requests therefore run one at a time, first come first served, on a single worker thread (MindSpore
is not re-entrant, and the event loop must stay free for other clients, health checks and streaming). Up to
`max_queue` requests wait behind the running one; the next gets `QueueFull` (HTTP 503 + Retry-After).

Tokens cross from the worker thread to the request's event loop through `loop.call_soon_threadsafe`. A job is
cancelled by setting its event: a waiting job is skipped, a running one stops at the next token because the
generator polls `should_stop`.
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

from telechat2.serve.engine import Engine, SamplingParams

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
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the request's loop is closed (server shutting down): nobody is listening
            self.cancelled.set()

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


class Scheduler:
    """Owns the worker thread and the waiting line; `engine` is set once the model has loaded."""

    def __init__(
        self,
        max_queue: int,
        on_job_done: Callable[[Job, int, float], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.engine: Engine | None = None
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._running = 0
        self._current: Job | None = None
        self._avg_seconds = 1.0  # moving average of a job's run time, for Retry-After
        self._on_job_done = on_job_done

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return self._running

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="telechat2-generate", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running and the waiting jobs, then stop the worker."""
        if self._current is not None:
            self._current.cancel("server shutting down")
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
        """Seconds until a slot is likely free: a slot frees when the running job ends, so about one job's time."""
        return max(1, math.ceil(self._avg_seconds))

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left while waiting
                job.finished, job.end_reason = True, "cancelled"
                job._emit("done", "cancelled")
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        assert self.engine is not None
        self._running, self._current = 1, job
        job.started_at = time.monotonic()
        generated = 0
        tokens = None
        try:
            tokens = self.engine.stream(job.input_ids, job.params, should_stop=job.cancelled.is_set)
            while True:
                try:
                    token = next(tokens)
                except StopIteration as end:  # the generator's return value says why: stop, length, cancelled
                    job.end_reason = end.value
                    break
                generated += 1
                job._emit("token", int(token))
                if job.cancelled.is_set():
                    job.end_reason = "cancelled"
                    break
            job.finished = True
            job._emit("done", job.end_reason)
        except Exception as exc:  # reported to the one request that caused it; the worker lives on
            log.exception("generation failed")
            job.finished = True
            job._emit("error", exc)
        finally:
            if tokens is not None and hasattr(tokens, "close"):
                tokens.close()  # a generator left early runs its cleanup now, not at garbage collection
            elapsed = time.monotonic() - job.started_at
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * elapsed
            self._running, self._current = 0, None
            if self._on_job_done is not None:
                self._on_job_done(job, generated, elapsed)
