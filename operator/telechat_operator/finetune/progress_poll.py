"""Fetching rank 0's training progress (`GET http://<pod IP>:8119/progress`) without ever holding up a reconcile.

Glue, not API access: the Kubernetes API stays in `k8s.py`; this talks plain HTTP to a pod. A pass asks
`latest(key, url)` for the newest document fetched so far (never waits) and so registers the job; one background
thread fetches each registered job's document at most every `interval` seconds on a small pool, with a short
timeout, and after failures backs off exponentially (on the simulated cluster, or before the endpoint is up, pod
IPs do not answer: the job simply shows no progress). A fetch whose document differs from the previous one calls
`on_change(key)`, which triggers a pass; that pass puts the document through the pure `progress.progress_status`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from telechat_operator.common import constants as c

logger = logging.getLogger(__name__)
MAX_DOCUMENT_BYTES = 1 << 20
# Pod IPs are reached directly: an operator behind an HTTP(S)_PROXY must not send them to the proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_json(url: str, timeout: float) -> Any:
    with _OPENER.open(url, timeout=timeout) as response:
        return json.loads(response.read(MAX_DOCUMENT_BYTES))


def progress_url(attempt: int, pods: list[Mapping[str, Any]]) -> str | None:
    """Rank 0 of the given attempt, when it runs and has an IP: where its `telechat2 launch` serves progress."""
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        if (
            labels.get(c.LABEL_ROLE) == c.ROLE_WORKER
            and labels.get(c.LABEL_NODE_RANK) == "0"
            and labels.get(c.LABEL_ATTEMPT) == str(attempt)
            and not pod["metadata"].get("deletionTimestamp")
        ):
            status = pod.get("status") or {}
            ip = status.get("podIP")
            if status.get("phase") == "Running" and ip:
                host = f"[{ip}]" if ":" in ip else ip
                return f"http://{host}:{c.PROGRESS_PORT}{c.PROGRESS_PATH}"
    return None


@dataclasses.dataclass
class _Entry:
    url: str
    document: Any = None
    next_at: float = 0.0
    failures: int = 0
    in_flight: bool = False


class ProgressPoller:
    def __init__(
        self,
        interval: float,
        timeout: float,
        on_change: Callable[[Hashable], None] | None = None,
        fetch: Callable[[str, float], Any] = fetch_json,
        max_backoff: float = 300.0,
        workers: int = 4,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 1.0,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.on_change = on_change
        self.fetch = fetch
        self.max_backoff = max(max_backoff, interval)
        self.clock = clock
        self.tick = tick
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="progress-poll")
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def latest(self, key: Hashable, url: str) -> Any:
        """The newest document fetched from `url` for this job (None before the first success); never blocks."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.url != url:  # a new rank 0 (restart): its predecessor's document is stale
                entry = self._entries[key] = _Entry(url)
            document = entry.document
        self._ensure_thread()
        self.poll_due()
        return document

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def poll_due(self) -> None:
        """Start a fetch for every registered job whose turn has come (the background thread calls this)."""
        now = self.clock()
        with self._lock:
            due = [(key, e) for key, e in self._entries.items() if not e.in_flight and now >= e.next_at]
            for _, entry in due:
                entry.in_flight = True
        for key, entry in due:
            self._pool.submit(self._fetch, key, entry)

    def _fetch(self, key: Hashable, entry: _Entry) -> None:
        changed = False
        try:
            document = self.fetch(entry.url, self.timeout)
        except Exception as err:  # unreachable, refused, timed out, not JSON: no progress, try later
            with self._lock:
                entry.failures += 1
                entry.next_at = self.clock() + min(self.interval * 2**entry.failures, self.max_backoff)
                entry.in_flight = False
            logger.debug("progress of %s from %s: %s", key, entry.url, err)
            return
        with self._lock:
            changed = document != entry.document and self._entries.get(key) is entry
            entry.document, entry.failures = document, 0
            entry.next_at = self.clock() + self.interval
            entry.in_flight = False
        if changed and self.on_change is not None:
            self.on_change(key)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="progress-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.tick):
            try:
                self.poll_due()
            except Exception:  # never let the loop die: progress is informative
                logger.exception("progress polling failed")

    def stop(self) -> None:
        self._stopped.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
