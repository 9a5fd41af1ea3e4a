"""`telechat2 serve` end to end on the real tiny model and tokenizer: TGI and OpenAI shapes, streaming, bad input,
auth, readiness, metrics, and the official `openai` client against a real uvicorn server.

Expected outputs come from calling `telechat2.generation.generate` directly on the same model, so every check
that the server returns "the right text" compares against the generator, not against a recorded string.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import mindspore as ms
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import build_tiny_model

from telechat2.chat import chat_input_ids
from telechat2.generation import GenerationConfig, generate
from telechat2.serve.app import create_app, serve_in_background
from telechat2.serve.auth import ApiKeySource
from telechat2.serve.engine import TeleChat2Engine
from telechat2.serve.runtime import ServeSettings
from telechat2.tokenizer import TeleChat2Tokenizer

MODEL = "telechat2-tiny"
# Room for the official tool prompt (about 400 tiny-tokenizer tokens: its Chinese text is mostly byte pieces).
SETTINGS = ServeSettings(model_name=MODEL, max_seq_len=512, max_input_token_len=480, max_queue=16)
PROMPT = "<_start><_user>生抽与老抽的区别？<_bot>"


@pytest.fixture(scope="module")
def engine(tiny_tokenizer: TeleChat2Tokenizer) -> TeleChat2Engine:
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return TeleChat2Engine(build_tiny_model(seed=0, seq_length=SETTINGS.max_seq_len), tiny_tokenizer)


def wait_ready(client: TestClient | httpx.Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def client(engine: TeleChat2Engine) -> Iterator[TestClient]:
    with TestClient(create_app(SETTINGS, lambda: engine)) as test_client:
        wait_ready(test_client)
        yield test_client


_expected: dict[tuple, list[int]] = {}


def expected_ids(engine: TeleChat2Engine, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """What `generate` gives with the default (greedy) config; memoised, tokens are slow on a busy CPU."""
    key = (tuple(input_ids), max_new_tokens)
    if key not in _expected:
        _expected[key] = generate(engine.model, input_ids, GenerationConfig(max_new_tokens=max_new_tokens))
    return _expected[key]


def sse_data(body: str) -> list[str]:
    return [line[len("data:") :].strip() for line in body.splitlines() if line.startswith("data:")]


# -- TGI / MindIE -----------------------------------------------------------------------------------------------------


def test_generate_returns_what_the_generator_produces(client: TestClient, engine: TeleChat2Engine) -> None:
    ids = expected_ids(engine, engine.tokenizer.encode(PROMPT), max_new_tokens=5)
    response = client.post(
        "/generate",
        json={"inputs": PROMPT, "parameters": {"do_sample": False, "max_new_tokens": 5, "details": True}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["generated_text"] == engine.tokenizer.decode(ids, skip_special_tokens=True)
    details = body["details"]
    assert [t["id"] for t in details["tokens"]] == ids
    assert details["generated_tokens"] == len(ids)
    assert details["finish_reason"] == ("length" if len(ids) == 5 else "eos_token")
    assert details["seed"] is None  # greedy


def test_generate_stream_sends_one_event_per_token_and_the_text_last(
    client: TestClient, engine: TeleChat2Engine
) -> None:
    ids = expected_ids(engine, engine.tokenizer.encode("hello"), max_new_tokens=4)
    response = client.post("/generate_stream", json={"inputs": "hello", "parameters": {"max_new_tokens": 4}})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith('data:{"index":1,"token":{')  # TGI's exact framing: no space, compact JSON
    events = [json.loads(data) for data in sse_data(response.text)]
    assert [e["token"]["id"] for e in events] == ids
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert events[-1]["details"]["generated_tokens"] == len(ids)
    # "stream": true on /generate streams too, as MindIE does.
    again = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}, "stream": True})
    assert [json.loads(d)["token"]["id"] for d in sse_data(again.text)] == ids[:2]  # greedy: a prefix


def test_sampling_is_reproducible_with_the_reported_seed(client: TestClient) -> None:
    params = {"do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_new_tokens": 3}
    first = client.post("/generate", json={"inputs": "hello", "parameters": params}).json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = client.post("/generate", json={"inputs": "hello", "parameters": {**params, "seed": seed}}).json()
    assert again["generated_text"] == first["generated_text"]
    assert again["details"]["seed"] == seed


def test_stop_string_ends_generation_tgi_keeps_it_openai_cuts_it(client: TestClient, engine: TeleChat2Engine) -> None:
    full = engine.tokenizer.decode(expected_ids(engine, engine.tokenizer.encode("hello"), max_new_tokens=8), True)
    stop = full[3:5]  # some text in the middle of the greedy answer
    cut = full.index(stop)
    tgi = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 8, "stop": [stop]}})
    assert tgi.json()["generated_text"] == full[: cut + len(stop)]
    assert tgi.json()["details"]["finish_reason"] == "stop_sequence"
    openai = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "stop": stop}).json()
    assert openai["choices"][0]["text"] == full[:cut]
    assert openai["choices"][0]["finish_reason"] == "stop"
    streamed = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 8, "stop": [stop], "stream": True})
    chunks = [json.loads(d) for d in sse_data(streamed.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:cut]


def test_return_full_text_and_truncate(client: TestClient, engine: TeleChat2Engine) -> None:
    prompt = "the model reads a question and writes an answer"
    ids = engine.tokenizer.encode(prompt)
    expected = engine.tokenizer.decode(expected_ids(engine, ids[-4:], max_new_tokens=3), True)
    body = client.post(
        "/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": 3, "truncate": 4, "return_full_text": True}},
    ).json()
    assert body["generated_text"] == prompt + expected


# -- OpenAI -----------------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "生抽与老抽的区别？"}]


def test_chat_completion_goes_through_the_chat_template(client: TestClient, engine: TeleChat2Engine) -> None:
    input_ids = chat_input_ids(engine.tokenizer, MESSAGES)
    ids = expected_ids(engine, input_ids, max_new_tokens=4)
    body = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4}).json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": engine.tokenizer.decode(ids, True)}
    assert body["usage"] == {
        "prompt_tokens": len(input_ids),
        "completion_tokens": len(ids),
        "total_tokens": len(input_ids) + len(ids),
    }


def test_chat_stream_deltas_add_up_and_end_with_done(client: TestClient, engine: TeleChat2Engine) -> None:
    request = {"messages": MESSAGES, "max_tokens": 4}
    whole = engine.tokenizer.decode(expected_ids(engine, chat_input_ids(engine.tokenizer, MESSAGES), 4), True)
    response = client.post(
        "/v1/chat/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_tools_reach_the_template(client: TestClient, engine: TeleChat2Engine) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = chat_input_ids(engine.tokenizer, MESSAGES, tools=tools)
    body = client.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": tools, "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] == len(with_tools) > len(chat_input_ids(engine.tokenizer, MESSAGES))


def test_completions_echo_and_models_list(client: TestClient, engine: TeleChat2Engine) -> None:
    ids = expected_ids(engine, engine.tokenizer.encode("hello"), max_new_tokens=4)
    body = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "echo": True}).json()
    assert body["choices"][0]["text"] == "hello" + engine.tokenizer.decode(ids, True)
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]


# -- bad input --------------------------------------------------------------------------------------------------------

LONG = "the model reads a question " * 40  # 641 tokens, more than the limit of 480
HUGE_INT_TGI = b'{"inputs": "hi", "parameters": {"max_new_tokens": ' + b"9" * 5000 + b"}}"
HUGE_INT_OPENAI = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"7" * 5000 + b"}"


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/generate", b"{not json", 400, "body"),
        ("/generate", {"parameters": {}}, 422, "inputs"),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, 422, "parameters.max_new_tokens"),
        ("/generate", {"inputs": "hi", "parameters": {"do_sample": 1}}, 422, "parameters.do_sample"),
        ("/generate", {"inputs": "hi", "parameters": {"top_p": 1.5}}, 422, "parameters.top_p"),
        ("/generate", {"inputs": LONG}, 400, "inputs"),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 1000}}, 400, "parameters.max_new_tokens"),
        ("/v1/chat/completions", b"[1, 2", 400, "body"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 500}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, 400, "n"),
        ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": MESSAGES, "model": "gpt-4"}, 404, "model"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        # hardening: huge integers, non-finite numbers, unknown TGI parameters name their field (once a 500 / ignored)
        ("/generate", HUGE_INT_TGI, 422, "parameters.max_new_tokens"),
        ("/v1/chat/completions", HUGE_INT_OPENAI, 400, "max_tokens"),
        ("/generate", b'{"inputs": "hi", "parameters": {"temperature": NaN}}', 422, "parameters.temperature"),
        ("/generate", b'{"inputs": "hi", "parameters": {"temperature": Infinity}}', 422, "parameters.temperature"),
        ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
        ("/v1/completions", b'{"prompt": "hi", "top_p": -Infinity}', 400, "top_p"),
        ("/generate", {"inputs": "hi", "parameters": {"max_new_token": 5}}, 422, "parameters.max_new_token"),
        ("/generate", {"inputs": "hi", "parameters": {"watermark": True}}, 422, "parameters.watermark"),
        ("/generate", {"inputs": "hi", "parameters": {"best_of": 2}}, 422, "parameters.best_of"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(
    client: TestClient, path: str, body: object, status: int, field: str
) -> None:
    response = (
        client.post(path, content=body, headers={"content-type": "application/json"})
        if isinstance(body, bytes)
        else client.post(path, json=body)
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if path.startswith("/v1/"):  # OpenAI's error shape
        assert error["param"] == field and field in error["message"]
    else:  # TGI's
        assert response.json()["field"] == field and error.startswith(field)


def test_deeply_nested_json_is_a_400_naming_where(client: TestClient) -> None:
    """100,000 nested lists overflow json's recursion (once a 500); 40 levels parse but exceed the depth limit."""
    for depth in (100_000, 40):
        body = b'{"inputs": "hi", "parameters": {"stop": ' + b"[" * depth + b"]" * depth + b"}}"
        response = client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["field"].startswith("parameters.stop[0][0]"), response.json()
        assert "nested deeper than" in response.json()["error"]
    body = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages[0]")


def test_neutral_tgi_parameters_are_accepted(client: TestClient) -> None:
    parameters = {"max_new_tokens": 1, "watermark": False, "best_of": 1, "decoder_input_details": False}
    response = client.post("/generate", json={"inputs": "hi", "parameters": parameters})
    assert response.status_code == 200, response.text


def test_body_over_the_limit_is_413_even_without_a_content_length(engine: TeleChat2Engine) -> None:
    settings = ServeSettings(model_name=MODEL, max_seq_len=96, max_input_token_len=64, max_body_bytes=4096)
    body = json.dumps({"inputs": "x" * 5000}).encode()
    with TestClient(create_app(settings, lambda: engine)) as small:
        wait_ready(small)
        declared = small.post("/generate", content=body, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and declared.json()["field"] == "body"
        chunked = small.post("/v1/completions", content=iter([body[:3000], body[3000:]]))  # no Content-Length
        assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "payload_too_large"
        assert small.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}}).status_code == 200


# -- auth, readiness, metrics -----------------------------------------------------------------------------------------


def test_bearer_auth_guards_the_api_but_not_health_or_metrics(engine: TeleChat2Engine, tmp_path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret\n")
    settings = ServeSettings(
        model_name=MODEL, max_seq_len=96, max_input_token_len=64, api_key=ApiKeySource(path=key_file)
    )
    request = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
    with TestClient(create_app(settings, lambda: engine)) as client:
        wait_ready(client)
        missing = client.post("/generate", json=request)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert client.post("/generate", json=request, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/v1/models").json()["error"]["type"] == "authentication_error"
        assert client.post("/generate", json=request, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", "/metrics"):
            assert client.get(open_path).status_code == 200
        key_file.write_text("rotated")  # a Secret update: the new token works without a restart
        later = time.time() + 5
        os.utime(key_file, (later, later))
        assert client.post("/generate", json=request, headers={"Authorization": "Bearer rotated"}).status_code == 200


def test_ready_only_once_the_model_has_loaded(engine: TeleChat2Engine) -> None:
    release = threading.Event()

    def slow_load() -> TeleChat2Engine:
        release.wait(30)
        return engine

    with TestClient(create_app(SETTINGS, slow_load)) as client:
        assert client.get("/v2/health/live").status_code == 200  # the port is open while loading
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get(f"/v2/models/{MODEL}/ready").status_code == 503
        loading = client.post("/generate", json={"inputs": "hi"})
        assert loading.status_code == 503 and int(loading.headers["retry-after"]) > 0
        release.set()
        wait_ready(client)
        assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200
        assert client.get("/v2/models/other/ready").status_code == 404
        assert client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 1}}).status_code == 200


def test_failed_load_turns_liveness_red(tiny_tokenizer: TeleChat2Tokenizer) -> None:
    def broken_load() -> TeleChat2Engine:
        raise FileNotFoundError("no checkpoint")

    with TestClient(create_app(SETTINGS, broken_load)) as client:
        deadline = time.monotonic() + 10
        while client.get("/v2/health/live").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/v2/health/ready").status_code == 503


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_counters_move(client: TestClient) -> None:
    ok = ("telechat_requests_total", (("method", "POST"), ("route", "/generate"), ("status", "200")))
    bad = ("telechat_requests_total", (("method", "POST"), ("route", "/generate"), ("status", "422")))
    before = scrape(client)
    response = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2, "details": True}})
    client.post("/generate", json={"inputs": 7})
    after = scrape(client)
    prompt_tokens = len(client.app.state.serve.scheduler.engine.tokenizer.encode("hello"))
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    assert after[("telechat_input_tokens_total", ())] == before[("telechat_input_tokens_total", ())] + prompt_tokens
    generated = response.json()["details"]["generated_tokens"]
    assert after[("telechat_generated_tokens_total", ())] == before[("telechat_generated_tokens_total", ())] + generated
    latency = ("telechat_request_duration_seconds_count", (("route", "/generate"),))
    assert after[latency] == before.get(latency, 0) + 2
    assert after[("telechat_queue_depth", ())] == 0
    assert after[("telechat_model_ready", ())] == 1


# -- a real server: the official openai client, concurrent clients ----------------------------------------------------


@pytest.fixture(scope="module")
def server_url(engine: TeleChat2Engine) -> Iterator[str]:
    with serve_in_background(create_app(SETTINGS, lambda: engine)) as url:
        with httpx.Client(base_url=url) as http:
            wait_ready(http)
        yield url


def test_openai_client_against_a_real_server(server_url: str, engine: TeleChat2Engine) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    expected_chat = expected_ids(engine, chat_input_ids(engine.tokenizer, MESSAGES), max_new_tokens=4)
    expected = engine.tokenizer.decode(expected_chat, True)
    assert completion.choices[0].message.content == expected
    assert completion.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected
    text = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    expected_text = expected_ids(engine, engine.tokenizer.encode("hello"), max_new_tokens=4)
    assert text.choices[0].text == engine.tokenizer.decode(expected_text, True)
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert error.value.param == "n"


def test_concurrent_clients_all_get_their_own_answer(server_url: str, engine: TeleChat2Engine) -> None:
    prompts = [f"question {i}: what is the model" for i in range(4)]
    expected = [engine.tokenizer.decode(expected_ids(engine, engine.tokenizer.encode(p), 2), True) for p in prompts]

    def ask(prompt: str) -> str:
        with httpx.Client(base_url=server_url, timeout=60) as http:
            response = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 2}})
            assert response.status_code == 200, response.text
            return response.json()["generated_text"]

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == expected
