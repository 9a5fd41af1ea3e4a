"""Prometheus metrics of the server, in a registry of its own (several apps can live in one test process).

Requests are counted by route template (`/v2/models/{name}/ready`, never the raw path: bounded label values) and
status; latency runs until the last byte, so a stream's latency is its whole duration. Queue depth (requests
waiting) and batch size (requests decoding together) are read at scrape time from the scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

QUEUE_DEPTH = "telechat_queue_depth"  # charts/telechat-inference autoscaling.queueDepthMetric must say the same
BATCH_SIZE = "telechat_batch_size"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(
        self,
        queue_depth: Callable[[], int],
        running: Callable[[], int],
        ready: Callable[[], bool],
        max_batch: int = 1,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "telechat_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "telechat_request_duration_seconds",
            "HTTP request latency until the last byte (streams included)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("telechat_requests_in_flight", "HTTP requests being served now", registry=r)
        self.input_tokens = Counter("telechat_input_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generated_tokens = Counter("telechat_generated_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "telechat_time_to_first_token_seconds",
            "From accepting a request to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "telechat_queue_wait_seconds",
            "Time a request waited for the generation thread",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "telechat_queue_rejected", "Requests refused with 503 because the queue was full", registry=r
        )
        self.cancelled = Counter(
            "telechat_generations_cancelled", "Generations stopped because the client left", registry=r
        )
        Gauge(
            QUEUE_DEPTH, "Requests waiting for a row of the decode batch (the HPA's Pods metric)", registry=r
        ).set_function(queue_depth)
        Gauge(BATCH_SIZE, "Requests in the running decode batch now", registry=r).set_function(running)
        running_gauge = Gauge(
            "telechat_generation_running", "Generations running now (= telechat_batch_size)", registry=r
        )
        running_gauge.set_function(running)
        Gauge("telechat_batch_size_max", "Most requests decoded together (--max-batch-size)", registry=r).set(max_batch)
        Gauge("telechat_model_ready", "1 once the model is loaded", registry=r).set_function(lambda: float(ready()))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which buffers streams and hides client disconnects)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app raises before answering
        started = time.perf_counter()

        async def send_with_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # set by the router on a match
            self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
