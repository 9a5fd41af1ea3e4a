"""A keyed, coalescing work queue on the operator's event loop (the controller-runtime pattern).

Watch events only *trigger* a key; the reconcile itself reads the current state. At most one reconcile per key runs at
a time; triggers arriving meanwhile collapse into one more pass, so 64 pod events in a burst cost a handful of
passes, not 64. A pass returns an optional "look again in N seconds" (backoff, deadlines, TTL); one that raises
is retried with exponential delay. Reconcile functions are synchronous and run in the queue's own worker threads:
asyncio's default executor has min(32, CPUs + 4) threads (6 on a 2-CPU node) shared with everything else, which
silently capped `workers` and left new jobs waiting for a thread behind other jobs' passes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

from telechat_operator.common import metrics

logger = logging.getLogger(__name__)

ReconcileFn = Callable[[Hashable], float | None]


class WorkQueue:
    def __init__(self, name: str, reconcile: ReconcileFn, workers: int = 8, max_error_delay: float = 60.0) -> None:
        self.name = name
        self._reconcile = reconcile
        self._workers = asyncio.Semaphore(workers)
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"reconcile-{name}")
        self._max_error_delay = max_error_delay
        self._running: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._errors: dict[Hashable, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def trigger(self, key: Hashable, delay: float | None = None) -> None:
        """Reconcile `key` now (or after `delay` seconds; an earlier pending timer wins)."""
        loop = asyncio.get_running_loop()
        if delay is not None and delay > 0:
            deadline = loop.time() + delay
            timer = self._timers.get(key)
            if timer is not None and timer.when() <= deadline:
                return
            if timer is not None:
                timer.cancel()
            self._timers[key] = loop.call_at(deadline, self._fire, key)
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        task = loop.create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._errors.pop(key, None)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.trigger(key)

    async def _run(self, key: Hashable) -> None:
        try:
            while True:
                self._dirty.discard(key)
                requeue: float | None = None
                async with self._workers:
                    try:
                        context = contextvars.copy_context()  # as asyncio.to_thread does
                        loop = asyncio.get_running_loop()
                        requeue = await loop.run_in_executor(self._threads, context.run, self._reconcile, key)
                        self._errors.pop(key, None)
                    except Exception as err:
                        metrics.RECONCILE_ERRORS.labels(kind=self.name).inc()
                        failures = self._errors[key] = self._errors.get(key, 0) + 1
                        requeue = min(0.5 * 2**failures, self._max_error_delay)
                        logger.exception(
                            "%s %s: reconcile failed (%d in a row), retrying in %.1fs: %s",
                            *(self.name, key, failures, requeue, err),
                        )
                if requeue is not None:
                    self.trigger(key, delay=requeue)
                if key not in self._dirty:
                    break
        finally:
            self._running.discard(key)

    async def drain(self) -> None:
        """Wait for running passes (used on shutdown and in tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
