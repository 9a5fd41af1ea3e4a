"""What the TGI and OpenAI routes share: settings, server state, limits, and running one generation.

A request goes: validate -> ids -> `ServerState.check_limits` -> `ServerState.submit` (queue) -> `GenerationRun`
turns the job's token stream into text events and a finish reason. Non-streaming routes wrap the run in
`run_unless_disconnected` so a client that hangs up stops its generation, as streaming routes do through
sse-starlette's disconnect watcher.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.requests import Request

from telechat2.serve.auth import ApiKeySource
from telechat2.serve.engine import Engine, SamplingParams
from telechat2.serve.metrics import ServerMetrics
from telechat2.serve.scheduler import Job, QueueFull, Scheduler
from telechat2.serve.schemas import MAX_SEED, ApiError
from telechat2.serve.text import TextStream

log = logging.getLogger(__name__)

LOADING_RETRY_AFTER = 5  # seconds suggested to clients while the model loads
INLINE_TOKENS = 4  # token batches up to this size are detokenized on the event loop, larger ones on a thread


@dataclass(frozen=True)
class ServeSettings:
    """Limits and identity of one server (MindIE's names in brackets)."""

    model_name: str = "telechat2"
    max_seq_len: int = 8192  # prompt + generated tokens [maxSeqLen]
    max_input_token_len: int = 6144  # prompt tokens [maxInputTokenLen]
    max_queue: int = 64  # requests waiting behind the running ones
    api_key: ApiKeySource | None = None
    max_batch_size: int = 8  # requests decoded together [maxBatchSize]; each holds a seq_length KV-cache row
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get 413 before they are read to the end

    def __post_init__(self) -> None:
        if not 0 < self.max_input_token_len < self.max_seq_len:
            raise ValueError(
                f"--max-input-token-len ({self.max_input_token_len}) must be positive and smaller than "
                f"--max-seq-len ({self.max_seq_len}) so at least one token can be generated"
            )
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")


class ServerState:
    """One per app: the scheduler, the metrics, and whether the model has loaded."""

    def __init__(self, settings: ServeSettings, load_engine: Callable[[], Engine]) -> None:
        self.settings = settings
        self.load_engine = load_engine
        self.scheduler = Scheduler(settings.max_queue, on_job_done=self._job_done, max_batch=settings.max_batch_size)
        self.metrics = ServerMetrics(
            queue_depth=lambda: self.scheduler.queue_depth,
            running=lambda: self.scheduler.running,
            ready=lambda: self.ready,
            max_batch=settings.max_batch_size,
        )
        self.load_error: BaseException | None = None
        self.on_load_failure: Callable[[], None] | None = None
        self.created = int(time.time())
        self._loader: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.scheduler.engine is not None

    def start(self) -> None:
        """Start the generation thread and load the model in the background (the port is already open)."""
        self.scheduler.start()
        self._loader = threading.Thread(target=self._load, name="telechat2-load", daemon=True)
        self._loader.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            engine = self.load_engine()
        except BaseException as exc:  # reported by /v2/health/live and the exit code
            self.load_error = exc
            log.exception("loading the model failed")
            if self.on_load_failure is not None:
                self.on_load_failure()
            return
        self.scheduler.engine = engine
        log.info("model %s ready after %.1fs", self.settings.model_name, time.monotonic() - started)

    def engine(self) -> Engine:
        engine = self.scheduler.engine
        if engine is None:
            message = "model failed to load" if self.load_error else "model is loading, retry shortly"
            raise ApiError(503, message, error_type="unavailable", headers={"Retry-After": str(LOADING_RETRY_AFTER)})
        return engine

    async def encode(self, text: str) -> list[int]:
        """Token ids of `text`, computed on a worker thread: a long prompt must not stall the event loop (health
        probes, other clients' streams). The body limit bounds how long this can take."""
        tokenizer = self.engine().tokenizer
        return await asyncio.to_thread(tokenizer.encode, text)

    def check_limits(self, input_len: int, requested: int | None, input_field: str, max_field: str) -> int:
        """max_new_tokens for this request: the one asked for if it fits, else a 4xx naming the field."""
        s = self.settings
        if input_len == 0:
            raise ApiError(400, f"{input_field}: the prompt has no tokens", input_field)
        if input_len > s.max_input_token_len:
            raise ApiError(
                400,
                f"{input_field}: the prompt is {input_len} tokens, more than the limit of "
                f"{s.max_input_token_len} (--max-input-token-len)",
                input_field,
            )
        room = s.max_seq_len - input_len
        if requested is not None and requested > room:
            raise ApiError(
                400,
                f"{max_field}: {requested} new tokens do not fit: prompt ({input_len}) + {max_field} must be "
                f"<= {s.max_seq_len} (--max-seq-len), so at most {room}",
                max_field,
            )
        return requested if requested is not None else min(self.engine().defaults.max_new_tokens, room)

    def submit(self, input_ids: list[int], params: SamplingParams) -> Job:
        try:
            job = self.scheduler.submit(input_ids, params)
        except QueueFull as exc:
            self.metrics.rejected.inc()
            raise ApiError(
                503, str(exc), error_type="overloaded", headers={"Retry-After": str(exc.retry_after)}
            ) from None
        self.metrics.input_tokens.inc(len(input_ids))
        return job

    def _job_done(self, job: Job, generated: int, elapsed: float) -> None:
        self.metrics.generated_tokens.inc(generated)
        if job.started_at is not None:
            self.metrics.queue_wait.observe(job.started_at - job.enqueued_at)
        if job.cancel_reason == CLIENT_GONE:
            self.metrics.cancelled.inc()


CLIENT_GONE = "client disconnected"


def resolve_seed(params: SamplingParams) -> SamplingParams:
    """Sampling without a seed gets a random one, reported back so the answer can be reproduced."""
    if params.do_sample and params.seed is None:
        return params.replace(seed=random.randrange(MAX_SEED + 1))
    return params


@dataclass(frozen=True)
class TokenEvent:
    id: int
    text: str  # this token's text (TGI's per-token field); a control token shows as its piece
    special: bool
    released: str  # new text safe to send (stop strings handled)


class GenerationRun:
    """Reads one job's tokens, decodes them, applies stop strings and knows why generation ended."""

    def __init__(self, state: ServerState, job: Job, text: TextStream, max_new_tokens: int) -> None:
        self.state = state
        self.job = job
        self.text = text
        self.max_new_tokens = max_new_tokens
        self.tail = ""  # text released by `finish` after the last token
        self.seen: list[TokenEvent] = []

    def _push(self, tokens: list[int]) -> list[TokenEvent]:
        """Detokenize tokens (on a worker thread); stops after the token that completes a stop string."""
        special_ids = self.text.tokenizer.special_ids
        events = []
        for token in tokens:
            token_text, released = self.text.push(token)
            events.append(TokenEvent(token, token_text, token in special_ids, released))
            if self.text.stopped_by is not None:
                break
        return events

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Decoded tokens as they come. A few tokens are decoded on the event loop (microseconds each); a burst
        goes to a worker thread in one hop. A thread hop per token for every request in a 32-row batch costs more
        than the decoding, and those threads compete with the generation thread for the CPU and the GIL."""
        first = True
        async for tokens in self.job.token_batches():
            if first:
                self.state.metrics.time_to_first_token.observe(time.monotonic() - self.job.enqueued_at)
                first = False
            pushed = self._push(tokens) if len(tokens) <= INLINE_TOKENS else await asyncio.to_thread(self._push, tokens)
            for event in pushed:
                self.seen.append(event)
                yield event
            if self.text.stopped_by is not None:
                self.job.cancel("stop string")
                break
        self.tail = await asyncio.to_thread(self.text.finish)  # decodes the whole answer once: off the loop

    async def run(self) -> None:
        async for _ in self.events():
            pass

    @property
    def token_ids(self) -> list[int]:
        return self.text.ids

    @property
    def finish_reason(self) -> str:
        """TGI's vocabulary: stop_sequence, eos_token or length."""
        if self.text.stopped_by is not None:
            return "stop_sequence"
        if self.job.end_reason == "stop":
            return "eos_token"
        return "length"


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is already read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, run: GenerationRun) -> bool:
    """Run to the end; False (and the job cancelled) if the client disconnected first."""
    generation = asyncio.ensure_future(run.run())
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({generation, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if generation in done:
            generation.result()
            return True
        run.job.cancel(CLIENT_GONE)
        return False
    except asyncio.CancelledError:  # the server is shutting down under us
        run.job.cancel(CLIENT_GONE)
        raise
    finally:
        for task in (generation, watcher):
            task.cancel()
