"""Serving under msrun (several ranks): rank 0 serves HTTP, the others follow in lockstep.

`telechat2.msrun.plan_layout` decides what the ranks hold from the YAML's `parallel_config.model_parallel` and
msrun's world size N: model_parallel == N splits the model over the ranks (tensor parallel,
`telechat2.tensor_parallel`: each rank holds 1/N of the heads, FFN and vocabulary); model_parallel == 1 keeps a
whole replica on every rank (with a warning: N times the memory for one model's throughput); anything else is
refused. This module is only the serving side: rank 0 leads, the other ranks follow.

Either way every rank must run the same forward passes in the same order: with tensor parallelism the collectives
inside the model deadlock otherwise. So rank 0 runs the HTTP server and the scheduler as usual, and its engine is a
`LeaderEngine`. With continuous batching its decode batch is a `LeaderBatch`: every batch operation (open, add a
request with its ids and sampling parameters, the seed already resolved; one batched step; remove a cancelled
request) goes to the followers before it runs on rank 0, and each follower's `BatchMirror` applies the same
operations to its own batch, so all ranks run the same prefills and steps and pick the same tokens (same logits,
same seeds). For a stream-only engine, rank 0 sends each job and, at each step, its `should_stop` decision; a
follower runs the same `stream` with a `should_stop` that reads that decision. Either way ranks stop together,
including on client disconnects. The channel is a TCP connection per follower to rank 0
(JSON lines) on `--control-port` (default --port + 1), found through msrun's MS_SCHED_HOST (rank 0 runs on the
master node). Both layouts run, and are tested, on CPU with real msrun processes.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from telechat2.serve.engine import Batch, Emission, Engine, SamplingParams

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 600.0  # seconds a follower keeps trying to reach rank 0 (msrun's cluster_time_out default)


class _Channel:
    """One JSON-lines TCP connection."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.reader = sock.makefile("r", encoding="utf-8")

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def receive(self) -> dict[str, Any] | None:
        line = self.reader.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _params(sent: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**{**sent, "stop_token_ids": tuple(sent["stop_token_ids"])})


class LeaderBatch:
    """Rank 0's decode batch: each operation goes to the followers first, then runs here.

    Followers apply the same operations to their own batch in the same order, so every rank runs the same prefills
    and batched steps (the collectives inside match) and picks the same tokens (same logits, same seeds); a
    sequence that ends on a stop token or its budget ends on every rank by itself.
    """

    def __init__(self, batch: Batch, broadcast: Callable[[dict[str, Any]], None]) -> None:
        self.batch = batch
        self.broadcast = broadcast

    def add(self, seq_id: int, input_ids: list[int], params: SamplingParams) -> Emission | None:
        self.broadcast({"type": "add", "seq": seq_id, "input_ids": list(input_ids), "params": asdict(params)})
        return self.batch.add(seq_id, input_ids, params)

    def step(self) -> list[Emission]:
        self.broadcast({"type": "step_batch"})
        return self.batch.step()

    def remove(self, seq_id: int) -> None:
        self.broadcast({"type": "remove", "seq": seq_id})
        self.batch.remove(seq_id)


class LeaderEngine:
    """Rank 0's engine: the real one, plus broadcasting each job and each step's stop decision to followers."""

    def __init__(self, engine: Engine, followers: list[_Channel]) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.defaults = engine.defaults
        self.followers = followers
        self._job = 0
        if callable(getattr(engine, "open_batch", None)):
            self.open_batch = self._open_batch  # batched lockstep only when the real engine can batch

    def _open_batch(self, max_batch: int) -> LeaderBatch:
        self._broadcast({"type": "open_batch", "max_batch": max_batch})
        return LeaderBatch(self.engine.open_batch(max_batch), self._broadcast)  # type: ignore[attr-defined]

    def _broadcast(self, message: dict[str, Any]) -> None:
        for follower in self.followers:
            follower.send(message)

    def stream(self, input_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool]) -> Iterator[int]:
        self._job += 1
        job = self._job
        self._broadcast({"type": "job", "job": job, "input_ids": list(input_ids), "params": asdict(params)})

        def decide() -> bool:
            stop = bool(should_stop())
            self._broadcast({"type": "step", "job": job, "stop": stop})
            return stop

        return self._lockstep(self.engine.stream(input_ids, params, decide), job)

    def _lockstep(self, tokens: Iterator[int], job: int) -> Iterator[int]:
        """Pass tokens through; if the consumer stops early, tell the followers waiting for the next decision."""
        exhausted = False
        try:
            result = yield from tokens
            exhausted = True
            return result
        finally:
            if not exhausted:
                self._broadcast({"type": "step", "job": job, "stop": True})


def accept_followers(server: socket.socket, count: int, timeout: float = CONNECT_TIMEOUT) -> list[_Channel]:
    server.settimeout(timeout)
    followers = []
    for _ in range(count):
        sock, address = server.accept()
        sock.settimeout(None)
        log.info("follower connected from %s", address[0])
        followers.append(_Channel(sock))
    return followers


def lead(load: Callable[[], Engine], world_size: int, control_port: int) -> Callable[[], Engine]:
    """Rank 0's loader: open the control port now, load, then wait for every follower to connect."""
    server = socket.create_server(("0.0.0.0", control_port), reuse_port=False, backlog=world_size)

    def load_and_gather() -> Engine:
        try:
            engine = load()
            return LeaderEngine(engine, accept_followers(server, world_size - 1))
        finally:
            server.close()

    return load_and_gather


def connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> _Channel:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _Channel(socket.create_connection((host, port), timeout=10))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def follow(load: Callable[[], Engine], host: str, control_port: int) -> int:
    """A follower rank: load, connect to rank 0, mirror every job until rank 0 closes the connection."""
    engine = load()
    channel = connect(host, control_port)
    channel.sock.settimeout(None)
    log.info("following rank 0 at %s:%d", host, control_port)
    stashed: list[dict[str, Any]] = []

    def next_message() -> dict[str, Any] | None:
        return stashed.pop() if stashed else channel.receive()

    mirror = BatchMirror(engine)
    try:
        while (message := next_message()) is not None:
            if mirror.apply(message):
                continue
            if message["type"] != "job":
                continue  # a stray decision of a job this rank already finished
            job = message["job"]
            params = _params(message["params"])

            def should_stop(job: int = job) -> bool:
                decision = next_message()
                if decision is None:
                    return True
                if decision["type"] != "step" or decision["job"] != job:
                    stashed.append(decision)  # rank 0 moved on (it failed mid-job): stop and take the next job
                    return True
                return bool(decision["stop"])

            generated = sum(1 for _ in engine.stream(message["input_ids"], params, should_stop))
            log.info("job %d: %d tokens in lockstep with rank 0", job, generated)
    finally:
        channel.close()
    return 0


class BatchMirror:
    """A follower's copy of rank 0's decode batch: applies rank 0's batch operations in the order they come.

    A failure here is the failure rank 0 had with the same operation (same inputs, same model), so it is logged
    and the follower goes on, as rank 0's scheduler does.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batch: Batch | None = None
        self.generated: dict[int, int] = {}

    def apply(self, message: dict[str, Any]) -> bool:
        """True if `message` was a batch operation (and it has been applied)."""
        kind = message["type"]
        if kind not in ("open_batch", "add", "step_batch", "remove"):
            return False
        try:
            if kind == "open_batch":
                self.batch = self.engine.open_batch(message["max_batch"])  # type: ignore[attr-defined]
                self.generated.clear()
            elif self.batch is None:
                raise RuntimeError(f"rank 0 sent {kind!r} before opening a batch")
            elif kind == "add":
                self.generated[message["seq"]] = 0
                emission = self.batch.add(message["seq"], message["input_ids"], _params(message["params"]))
                self._count([emission] if emission is not None else [])
            elif kind == "step_batch":
                self._count(self.batch.step())
            else:
                self.batch.remove(message["seq"])
                self._ended(message["seq"])
        except Exception:
            log.exception("batch operation %r failed (as it did on rank 0)", kind)
        return True

    def _count(self, emitted: list[Emission]) -> None:
        for emission in emitted:
            if emission.token is not None:
                self.generated[emission.seq_id] = self.generated.get(emission.seq_id, 0) + 1
            if emission.finish is not None:
                self._ended(emission.seq_id)

    def _ended(self, seq_id: int) -> None:
        if seq_id in self.generated:
            log.info("job %d: %d tokens in lockstep with rank 0", seq_id, self.generated.pop(seq_id))
