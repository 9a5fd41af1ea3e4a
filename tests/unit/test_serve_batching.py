"""The server with continuous batching on the real tiny model: concurrent requests decode together and each gets
its lone greedy answer; a cancelled request frees its row; the event loop never waits for a big body.

`RecordingEngine` wraps the real engine and logs every batch operation, so the tests can see requests joining a
running batch and leaving it, not only the answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import mindspore as ms
import pytest
from test_serve_scheduling import metric, wait_until
from tiny_model import build_tiny_model

from telechat2.cli import build_parser
from telechat2.generation import GenerationConfig, generate
from telechat2.serve.app import create_app, serve_in_background, settings_from_args
from telechat2.serve.engine import SamplingParams, TeleChat2Engine
from telechat2.serve.runtime import ServeSettings
from telechat2.tokenizer import TeleChat2Tokenizer

SETTINGS = ServeSettings(model_name="tiny", max_seq_len=160, max_input_token_len=120, max_queue=16, max_batch_size=4)


class RecordingBatch:
    def __init__(self, batch: Any, log: list[tuple[str, Any]]) -> None:
        self.batch, self.log = batch, log

    def add(self, seq_id: int, input_ids: list[int], params: SamplingParams) -> Any:
        self.log.append(("add", seq_id))
        return self.batch.add(seq_id, input_ids, params)

    def step(self) -> Any:
        emitted = self.batch.step()
        # sequences that got a token or ended (a prompt prefilled by this step gives two: its first and its next)
        self.log.append(("step", len({emission.seq_id for emission in emitted})))
        return emitted

    def remove(self, seq_id: int) -> None:
        self.log.append(("remove", seq_id))
        self.batch.remove(seq_id)


class RecordingEngine:
    def __init__(self, engine: TeleChat2Engine, delay: float = 0.0) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.defaults = engine.defaults
        self.log: list[tuple[str, Any]] = []

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[int]:
        return self.engine.stream(*args, **kwargs)

    def open_batch(self, max_batch: int) -> RecordingBatch:
        return RecordingBatch(self.engine.open_batch(max_batch), self.log)


@pytest.fixture(scope="module")
def engine(tiny_tokenizer: TeleChat2Tokenizer) -> TeleChat2Engine:
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return TeleChat2Engine(build_tiny_model(seed=0, seq_length=SETTINGS.max_seq_len), tiny_tokenizer)


def lone(engine: TeleChat2Engine, prompt: str, max_new_tokens: int) -> str:
    ids = generate(engine.model, engine.tokenizer.encode(prompt), GenerationConfig(max_new_tokens=max_new_tokens))
    return engine.tokenizer.decode(ids, True)


def test_concurrent_requests_decode_together_and_each_gets_its_lone_answer(engine: TeleChat2Engine) -> None:
    requests = [
        ("<_start><_user>tell me about data<_bot>", 12),
        ("hi", 5),
        ("<_start><_user>a much longer question about the training of models on clusters<_bot>", 20),
        ("the model", 3),
        ("<_start><_user>memory<_bot>", 16),
        ("checkpoints and parallel layers", 9),
    ]
    expected = [lone(engine, prompt, n) for prompt, n in requests]
    recording = RecordingEngine(engine)
    with serve_in_background(create_app(SETTINGS, lambda: recording)) as url, ThreadPoolExecutor(6) as pool:
        wait_until(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 200, timeout=60)

        def ask(request: tuple[str, int]) -> str:
            prompt, max_new = request
            body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new}}
            response = httpx.post(f"{url}/generate", json=body, timeout=300)
            assert response.status_code == 200, response.text
            return response.json()["generated_text"]

        first = [pool.submit(ask, r) for r in requests[:3]]
        wait_until(lambda: any(kind == "step" for kind, _ in recording.log), timeout=120)
        later = [pool.submit(ask, r) for r in requests[3:]]  # join a batch that is already decoding
        answers = [f.result() for f in first + later]
        assert metric(url, "telechat_batch_size") == 0
        assert metric(url, "telechat_batch_size_max") == SETTINGS.max_batch_size
    assert answers == expected
    steps = [n for kind, n in recording.log if kind == "step"]
    assert max(steps) > 1, f"requests never decoded together: {steps}"
    first_step = recording.log.index(next(e for e in recording.log if e[0] == "step"))
    assert any(kind == "add" for kind, _ in recording.log[first_step:]), "no request joined mid-flight"


def test_a_cancelled_request_frees_its_row_for_a_waiting_one(engine: TeleChat2Engine) -> None:
    recording = RecordingEngine(engine)
    settings = ServeSettings(model_name="tiny", max_seq_len=160, max_input_token_len=120, max_batch_size=2)
    long = {"inputs": "hello", "parameters": {"max_new_tokens": 150}}
    with serve_in_background(create_app(settings, lambda: recording)) as url, ThreadPoolExecutor(2) as pool:
        wait_until(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 200, timeout=60)
        keeper = pool.submit(httpx.post, f"{url}/generate", json=long, timeout=300)
        with httpx.stream("POST", f"{url}/generate_stream", json=long, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # one token seen: hang up
        wait_until(lambda: ("remove", 2) in recording.log or ("remove", 1) in recording.log, timeout=60)
        third = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=300)
        assert third.status_code == 200
        assert keeper.result().status_code == 200
        wait_until(lambda: metric(url, "telechat_generations_cancelled_total") == 1)
    removed = next(e for e in recording.log if e[0] == "remove")
    after = recording.log[recording.log.index(removed) :]
    assert ("add", 3) in after, "the third request ran in the freed row"
    assert max(n for kind, n in after if kind == "step") == 2, "...while the long one was still decoding"


def test_big_bodies_get_413_and_never_stall_the_health_probe(engine: TeleChat2Engine) -> None:
    """A 50 MB prompt (over the default 8 MiB limit) gets 413; a 2 MB one under a raised limit is read and
    tokenized off the event loop. Either way /v2/health/live keeps answering within a second."""
    settings = ServeSettings(model_name="tiny", max_seq_len=160, max_input_token_len=120, max_body_bytes=4 << 20)
    huge = b'{"inputs": "' + b"word " * (10 << 20) + b'"}'  # 50 MiB
    big = {"inputs": "word " * (400 << 10)}  # 2 MiB: allowed, then too many tokens
    with serve_in_background(create_app(settings, lambda: engine)) as url:
        wait_until(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 200, timeout=60)
        for send in (
            lambda: httpx.post(f"{url}/generate", content=huge, timeout=300),
            lambda: httpx.post(f"{url}/generate", json=big, timeout=300),
            lambda: httpx.post(f"{url}/v1/completions", json={"prompt": big["inputs"]}, timeout=300),
        ):
            result: list[httpx.Response] = []
            sender = threading.Thread(target=lambda send=send, result=result: result.append(send()))
            sender.start()
            probes = 0
            while sender.is_alive() or probes < 3:
                assert httpx.get(f"{url}/v2/health/live", timeout=1.0).status_code == 200  # raises on timeout
                probes += 1
                time.sleep(0.05)
            sender.join()
            answer = result[0]
            if answer.request.url.path == "/generate" and len(answer.request.content) > settings.max_body_bytes:
                assert answer.status_code == 413
                assert answer.json()["field"] == "body" and "--max-body-bytes" in answer.json()["error"]
            else:
                assert answer.status_code == 400, answer.text
                assert "more than the limit" in answer.text


def test_max_seq_len_defaults_to_the_models_seq_length() -> None:
    argv = ["serve", "--config", "telechat2-tiny", "--vocab_file", "tok.model"]
    settings = settings_from_args(build_parser(argv).parse_args(argv))
    assert (settings.max_seq_len, settings.max_input_token_len) == (64, 48)  # telechat2-tiny's seq_length
    assert settings.max_batch_size == ServeSettings.max_batch_size
    argv += ["--max-batch-size", "16", "--max-body-bytes", "65536"]
    settings = settings_from_args(build_parser(argv).parse_args(argv))
    assert (settings.max_batch_size, settings.max_body_bytes) == (16, 65536)
