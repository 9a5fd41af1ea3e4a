"""Narrow tests of the server's plumbing: the bounded queue (503 + Retry-After), client disconnects cancelling
generation, incremental detokenization and stop strings, API-key sources, msrun lockstep, the CLI settings.

Queue and disconnect tests need control over timing, so they use `GatedEngine` (a fake that yields plain tokens
slowly and records how it ended) behind a real uvicorn server; everything else uses the real tiny tokenizer.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from telechat2 import msrun
from telechat2.batched import Emitted
from telechat2.cli import build_parser
from telechat2.serve import distributed
from telechat2.serve.app import create_app, default_model_name, serve_in_background, settings_from_args
from telechat2.serve.auth import ApiKeySource
from telechat2.serve.engine import SamplingParams
from telechat2.serve.runtime import ServeSettings
from telechat2.serve.scheduler import Scheduler
from telechat2.serve.text import TextStream
from telechat2.tokenizer import TeleChat2Tokenizer


class GatedEngine:
    """Fake engine: yields plain tokens `delay` apart once `gate` opens; records how many each call produced."""

    def __init__(self, tokenizer: TeleChat2Tokenizer, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.tokenizer = tokenizer
        self.defaults = SamplingParams(max_new_tokens=8)
        self.delay = delay
        self.gate = gate or threading.Event()
        if gate is None:
            self.gate.set()
        self.started = threading.Event()
        self.ended = threading.Event()
        self.produced: list[int] = []  # tokens per call

    def stream(self, input_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool]) -> Iterator[int]:
        self.started.set()
        self.produced.append(0)
        try:
            for step in range(params.max_new_tokens):
                if should_stop():
                    return "cancelled"
                self.gate.wait(30)
                time.sleep(self.delay)
                self.produced[-1] += 1
                yield 100 + (sum(input_ids) + step) % 200  # plain pieces of the tiny vocabulary
            return "length"
        finally:
            self.ended.set()


def wait_until(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_full_queue_answers_503_with_retry_after_and_loses_nothing(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    gate = threading.Event()
    engine = GatedEngine(tiny_tokenizer, gate=gate)
    app = create_app(ServeSettings(max_seq_len=64, max_input_token_len=32, max_queue=2), lambda: engine)
    with serve_in_background(app) as url, ThreadPoolExecutor(max_workers=3) as pool:
        wait_until(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 200)
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
        running = pool.submit(httpx.post, f"{url}/generate", json=body, timeout=30)
        wait_until(engine.started.is_set)
        waiting = [pool.submit(httpx.post, f"{url}/generate", json=body, timeout=30) for _ in range(2)]
        wait_until(lambda: metric(url, "telechat_queue_depth") == 2)

        refused = httpx.post(f"{url}/generate", json=body)
        assert refused.status_code == 503
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error_type"] == "overloaded"
        refused_openai = httpx.post(f"{url}/v1/completions", json={"prompt": "hello"})
        assert refused_openai.status_code == 503 and "queue is full" in refused_openai.json()["error"]["message"]
        assert metric(url, "telechat_queue_rejected_total") == 2

        gate.set()
        answers = [future.result() for future in [running, *waiting]]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(a.json()["details"]["generated_tokens"] == 3 for a in answers)
        assert metric(url, "telechat_queue_depth") == 0


def test_stream_disconnect_cancels_generation(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    engine = GatedEngine(tiny_tokenizer, delay=0.05)
    app = create_app(ServeSettings(max_seq_len=1024, max_input_token_len=32), lambda: engine)
    with serve_in_background(app) as url:
        wait_until(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 200)
        request = {"inputs": "hello", "parameters": {"max_new_tokens": 500}}
        with httpx.stream("POST", f"{url}/generate_stream", json=request, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # one token seen: hang up
        assert engine.ended.wait(15), "generation kept running after the client left"
        assert engine.produced[-1] < 500
        wait_until(lambda: metric(url, "telechat_generations_cancelled_total") == 1)


def test_non_streaming_disconnect_cancels_generation(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    engine = GatedEngine(tiny_tokenizer, delay=0.05)
    app = create_app(ServeSettings(max_seq_len=1024, max_input_token_len=32), lambda: engine)
    with serve_in_background(app) as url:
        wait_until(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 200)
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        messages = [{"role": "system", "content": "hi"}, {"role": "user", "content": "hi"}]  # short: no default
        body = json.dumps({"messages": messages, "max_tokens": 500})
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert engine.started.wait(15)
        connection.close()  # the client gives up before the answer
        assert engine.ended.wait(15), "generation kept running after the client left"
        assert engine.produced[-1] < 500


class ScriptedEngine:
    """Fake engine that "generates" a fixed answer: lets a test see tool-call parsing a random model never reaches."""

    def __init__(self, tokenizer: TeleChat2Tokenizer, answer: str) -> None:
        self.tokenizer = tokenizer
        self.defaults = SamplingParams(max_new_tokens=64)
        self.answer_ids = tokenizer.encode(answer)

    def stream(self, input_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool]) -> Iterator[int]:
        yield from self.answer_ids[: params.max_new_tokens]
        return "stop"


def test_tool_calls_come_back_as_openai_tool_calls(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    answer = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Beijing"}}\n</tool_call>'
    engine = ScriptedEngine(tiny_tokenizer, answer)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"}]  # fits 448
    request = {"messages": messages, "tools": tools}
    with TestClient(create_app(ServeSettings(max_seq_len=512, max_input_token_len=448), lambda: engine)) as client:
        wait_until(lambda: client.get("/v2/health/ready").status_code == 200)
        choice = client.post("/v1/chat/completions", json=request).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Let me check."
        [call] = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Beijing"}'}
        streamed = client.post("/v1/chat/completions", json={**request, "stream": True}).text
        data = [line.removeprefix("data:").strip() for line in streamed.splitlines() if line.startswith("data:")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(payload) for payload in data[:-1]]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert deltas[-2]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# -- text: incremental detokenization and stop strings ----------------------------------------------------------------


def pushed(stream: TextStream, ids: list[int]) -> list[str]:
    released = [stream.push(token_id)[1] for token_id in ids]
    return [*released, stream.finish()]


def test_split_characters_are_held_until_complete(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    text = "ok 😀 done"  # the emoji is four byte-fallback tokens in the tiny vocabulary
    ids = tiny_tokenizer.encode(text)
    chunks = pushed(TextStream(tiny_tokenizer), ids)
    assert "".join(chunks) == text
    assert all("\ufffd" not in chunk for chunk in chunks)


def test_openai_stop_strings_are_cut_and_never_leak_while_streaming(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    ids = tiny_tokenizer.encode("the model writes an answer about data")
    stream = TextStream(tiny_tokenizer, stop=["answer"], keep_stop=False)
    chunks = pushed(stream, ids)
    assert "".join(chunks) == "the model writes an "
    assert stream.stopped_by == "answer"
    kept = TextStream(tiny_tokenizer, stop=["answer"], keep_stop=True)
    assert "".join(pushed(kept, ids)) == "the model writes an answer"


def test_control_tokens_are_hidden_but_tool_markers_stay(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    ids = [*tiny_tokenizer.encode(text), tiny_tokenizer.eos_token_id]
    stream = TextStream(tiny_tokenizer)
    token_texts = [stream.push(token_id)[0] for token_id in ids]
    stream.finish()
    assert stream.text == text
    assert token_texts[-1] == "<_end>"  # TGI's per-token text still names the control token


# -- auth, settings -----------------------------------------------------------------------------------------------


def test_api_key_sources(tmp_path) -> None:
    assert ApiKeySource.from_args(None, environ={}) is None
    from_env = ApiKeySource.from_args(None, environ={"TELECHAT_API_KEY": "k1"})
    assert from_env is not None and from_env.check("Bearer k1") and not from_env.check("Bearer k2")
    assert not from_env.check("Basic k1") and not from_env.check(None)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="api-key-file"):
        ApiKeySource.from_args(str(empty), environ={})
    with pytest.raises(ValueError, match="api-key-file"):
        ApiKeySource.from_args(str(tmp_path / "missing"), environ={})


def test_cli_flags_become_settings(tmp_path) -> None:
    argv = [
        "serve",
        "--config",
        "configs/predict_telechat2_7b.yaml",
        "--vocab_file",
        "tok.model",
        "--max-seq-len",
        "4096",
    ]
    args = build_parser(argv).parse_args(argv)
    settings = settings_from_args(args)
    assert (args.port, args.host) == (1025, "0.0.0.0")
    assert settings.model_name == "telechat2-7b"
    assert default_model_name("telechat2-tiny") == "telechat2-tiny"
    assert default_model_name("/etc/telechat2/predict.yaml") == "telechat2"
    assert (settings.max_seq_len, settings.max_input_token_len) == (4096, 3072)
    assert args.warm_up is False and build_parser([*argv, "--warm-up"]).parse_args([*argv, "--warm-up"]).warm_up
    with pytest.raises(ValueError, match="max-input-token-len"):
        ServeSettings(max_seq_len=100, max_input_token_len=100)


class CountingBatch:
    """Fake decode batch: each sequence gets `tokens` tokens, one per step; logs adds and steps."""

    def __init__(self, log: list[tuple[str, int]], tokens: int = 3) -> None:
        self.log, self.tokens = log, tokens
        self.left: dict[int, int] = {}

    def add(self, seq_id: int, input_ids: list[int], params: SamplingParams) -> None:
        self.log.append(("add", seq_id))
        self.left[seq_id] = self.tokens

    def step(self) -> list[Emitted]:
        self.log.append(("step", len(self.left)))
        time.sleep(0.005)
        emitted = []
        for seq_id in list(self.left):
            self.left[seq_id] -= 1
            emitted.append(Emitted(seq_id, 100, "length" if self.left[seq_id] == 0 else None))
            if self.left[seq_id] == 0:
                del self.left[seq_id]
        return emitted

    def remove(self, seq_id: int) -> None:
        self.left.pop(seq_id, None)


@pytest.mark.parametrize(
    ("admit_wait", "admit_wait_max", "gap", "requests", "joined"),
    [
        (0.0, 0.05, 0.03, 3, 1),  # no wait: the first request steps alone, the others join at later boundaries
        (0.5, 0.05, 0.03, 3, 3),  # a wait longer than the burst: all join the first step (one prefill)
        (0.1, 2.0, 0.04, 6, 6),  # each arrival extends the wait: a burst longer than admit_wait still shares it
        (0.2, 0.3, 0.12, 5, 3),  # but not past admit_wait_max after the first request (0, 0.12, 0.24 < 0.3)
    ],
)
def test_an_idle_batch_waits_briefly_so_a_burst_shares_its_first_step(
    tiny_tokenizer: TeleChat2Tokenizer,
    admit_wait: float,
    admit_wait_max: float,
    gap: float,
    requests: int,
    joined: int,
) -> None:
    """Requests `gap` seconds apart reach an idle batch: how many are added before its first step."""
    log: list[tuple[str, int]] = []
    engine = GatedEngine(tiny_tokenizer)
    engine.open_batch = lambda max_batch: CountingBatch(log)  # type: ignore[attr-defined]
    scheduler = Scheduler(max_queue=8, max_batch=8, admit_wait=admit_wait, admit_wait_max=admit_wait_max)
    scheduler.engine = engine
    scheduler.start()

    async def burst() -> list[list[int]]:
        jobs = []
        for index in range(requests):
            jobs.append(scheduler.submit([5, index], SamplingParams(max_new_tokens=3)))
            await asyncio.sleep(gap)
        return [[token async for token in job.tokens()] for job in jobs]

    try:
        assert asyncio.run(burst()) == [[100] * 3] * requests
    finally:
        scheduler.stop()
    first_step = log.index(next(entry for entry in log if entry[0] == "step"))
    assert log[:first_step] == [("add", seq_id) for seq_id in range(1, joined + 1)]


def test_a_batch_step_hands_all_its_rows_events_to_the_loop_at_once(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    """Four requests decoding together: one loop wake-up per step (their tokens and ends together), not one per
    token; every request still gets its own tokens in order."""
    log: list[tuple[str, int]] = []
    engine = GatedEngine(tiny_tokenizer)
    engine.open_batch = lambda max_batch: CountingBatch(log, tokens=3)  # type: ignore[attr-defined]
    scheduler = Scheduler(max_queue=8, max_batch=4, admit_wait=0.2)
    scheduler.engine = engine
    scheduler.start()
    handovers: list[int] = []

    async def four() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counted(callback, *args):  # type: ignore[no-untyped-def]
            handovers.append(len(args[0]) if args and isinstance(args[0], list) else 1)
            return original(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        jobs = [scheduler.submit([5, index], SamplingParams(max_new_tokens=3)) for index in range(4)]
        return [[token async for token in job.tokens()] for job in jobs]

    try:
        assert asyncio.run(four()) == [[100] * 3] * 4
    finally:
        scheduler.stop()
    assert [entry for entry in log if entry[0] == "step"] == [("step", 4)] * 3
    assert handovers == [4, 4, 8]  # 4 tokens a step, the last step's 4 tokens and 4 ends


# -- msrun: rank 0 leads, the others follow in lockstep -----------------------------------------------------------


def test_followers_run_the_same_steps_as_rank_0(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    group = msrun.ProcessGroup.from_env({"RANK_ID": "1", "RANK_SIZE": "2", "MS_SCHED_HOST": "10.0.0.1"})
    assert (group.rank, group.world_size, group.leader_host) == (1, 2, "10.0.0.1")
    assert msrun.ProcessGroup.from_env({}).world_size == 1
    assert msrun.layout_warning({"parallel_config": {"model_parallel": 2}}, group) is None
    assert "model_parallel=4" in msrun.layout_warning({"parallel_config": {"model_parallel": 4}}, group)

    leader_inner, follower_engine = GatedEngine(tiny_tokenizer), GatedEngine(tiny_tokenizer)
    port = free_port()
    load_leader = distributed.lead(lambda: leader_inner, world_size=2, control_port=port)
    follower_exit: list[int] = []
    follower = threading.Thread(
        target=lambda: follower_exit.append(distributed.follow(lambda: follower_engine, "127.0.0.1", port))
    )
    follower.start()
    leader = load_leader()
    params = SamplingParams(max_new_tokens=6)
    assert len(list(leader.stream([5, 6], params, lambda: False))) == 6  # runs to the end
    early = leader.stream([7], params, lambda: False)
    next(early), next(early)
    early.close()  # the consumer left after two tokens (a stop string, say)
    polls = iter([False, False, False, True])
    assert len(list(leader.stream([8], params, lambda: next(polls)))) == 3  # cancelled by should_stop
    for channel in leader.followers:
        channel.close()
    follower.join(15)
    assert follower_exit == [0]
    assert follower_engine.produced == leader_inner.produced == [6, 2, 3]
