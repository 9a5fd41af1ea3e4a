"""Serving under msrun (several ranks, one model split across devices): rank 0 serves, the others follow.

With model parallelism every rank must run the same forward passes in the same order, or the collectives inside
the model deadlock. So rank 0 runs the HTTP server and the scheduler as usual, and its engine is a `LeaderEngine`:
before each job it sends the job (ids + sampling parameters, the seed already resolved) to every follower, and at
each step it sends its `should_stop` decision. A follower runs the same `stream` with a `should_stop` that reads
that decision, so all ranks do the same steps, pick the same tokens (same logits, same seed) and stop together,
including on client disconnects. The channel is a TCP connection per follower to rank 0 (JSON lines) on
`--control-port` (default --port + 1), found through msrun's MS_SCHED_HOST (rank 0 runs on the master node).

The lockstep needs nothing from the model beyond determinism, so it runs (and is tested) on CPU with full
replicas; on Ascend it is what tensor-parallel TeleChat2 needs once the model shards its layers.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from telechat2.serve.engine import Engine, SamplingParams

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 600.0  # seconds a follower keeps trying to reach rank 0 (msrun's cluster_time_out default)


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int
    leader_host: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProcessGroup:
        """msrun exports RANK_ID, RANK_SIZE (or MS_WORKER_NUM) and MS_SCHED_HOST; absent means one process."""
        world = int(environ.get("RANK_SIZE") or environ.get("MS_WORKER_NUM") or 1)
        rank = int(environ.get("RANK_ID") or 0)
        if not 0 <= rank < world:
            raise ValueError(f"RANK_ID {rank} is outside 0..{world - 1} (RANK_SIZE {world})")
        return cls(rank=rank, world_size=world, leader_host=environ.get("MS_SCHED_HOST", "127.0.0.1"))


def layout_warning(run_config: Mapping[str, Any], group: ProcessGroup) -> str | None:
    """Say so when the YAML's model_parallel and the number of ranks disagree (the model then runs whole per rank)."""
    model_parallel = int((run_config.get("parallel_config") or {}).get("model_parallel") or 1)
    if model_parallel == group.world_size or (model_parallel == 1 and group.world_size == 1):
        return None
    return (
        f"the config asks for model_parallel={model_parallel} but {group.world_size} rank(s) run: "
        "every rank holds the whole model (telechat2's network is single-device; use the mindie backend to shard)"
    )


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


class LeaderEngine:
    """Rank 0's engine: the real one, plus broadcasting each job and each step's stop decision to followers."""

    def __init__(self, engine: Engine, followers: list[_Channel]) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.defaults = engine.defaults
        self.followers = followers
        self._job = 0

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

    try:
        while (message := next_message()) is not None:
            if message["type"] != "job":
                continue  # a stray decision of a job this rank already finished
            job = message["job"]
            sent = message["params"]
            params = SamplingParams(**{**sent, "stop_token_ids": tuple(sent["stop_token_ids"])})

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
