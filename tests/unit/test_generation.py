"""Generation: logits processing by hand, greedy with cache == without, seeded sampling, stop/cancel/length."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from tiny_model import build_tiny_model

from telechat2.generation import (
    GenerationConfig,
    apply_repetition_penalty,
    apply_temperature,
    generate,
    next_token,
    softmax,
    stream_generate,
    top_k_filter,
    top_p_filter,
)


@pytest.fixture(autouse=True)
def _pynative_mode():
    """Eager execution, whatever mode an earlier test left behind (generation refuses graph mode)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


PROMPT = [1, 4, 37, 101, 250, 9, 5]
GREEDY = GenerationConfig(repetition_penalty=1.0, max_new_tokens=16, stop_token_ids=())


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=31)


@pytest.fixture(scope="module")
def greedy_tokens(model) -> list[int]:
    """16 greedy tokens with the KV cache, shared by the tests that need a reference continuation."""
    return generate(model, PROMPT, GREEDY)


# -- pure logits processing --------------------------------------------------------------------------------------------


def test_defaults_are_telechat2_generation_defaults():
    config = GenerationConfig()
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == (False, 0.3, 5, 0.85)
    assert (config.repetition_penalty, config.max_new_tokens, config.seed) == (1.03, 4096, None)
    assert config.stop_token_ids == (2,) and config.use_cache


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 0), ("top_k", -1), ("top_p", 0), ("top_p", 1.5), ("repetition_penalty", 0), ("max_new_tokens", 0)],
)
def test_invalid_settings_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once_per_token():
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1, 0], 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_allclose(logits, [2.0, -1.0, 0.5, 3.0])  # input untouched
    assert apply_repetition_penalty(logits, [0], 1.0) is logits


def test_temperature_and_top_k():
    np.testing.assert_allclose(apply_temperature(np.array([1.0, -2.0]), 0.5), [2.0, -4.0])
    out = top_k_filter(np.array([0.1, 3.0, 2.0, -1.0, 2.5]), 2)
    assert np.isfinite(out).tolist() == [False, True, False, False, True]
    assert np.isfinite(top_k_filter(np.array([1.0, 2.0]), 0)).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    assert np.isfinite(top_p_filter(logits, 0.7)).tolist() == [False, True, False, True]  # 0.5 + 0.3 >= 0.7
    assert np.isfinite(top_p_filter(logits, 0.5)).tolist() == [False, True, False, False]  # 0.5 reaches 0.5
    assert np.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, False, True]
    assert np.isfinite(top_p_filter(logits, 1.0)).all()


def test_greedy_applies_the_repetition_penalty():
    logits = np.array([0.0, 2.0, 1.9], np.float32)
    config = GenerationConfig(repetition_penalty=1.1)
    assert next_token(logits, [], config, np.random.default_rng()) == 1
    assert next_token(logits, [1], config, np.random.default_rng()) == 2  # 2.0 / 1.1 < 1.9


def test_sampling_follows_the_filtered_distribution():
    logits = np.log(np.array([0.1, 0.6, 0.05, 0.25]))
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0)
    rng = np.random.default_rng(0)
    draws = np.array([next_token(logits, [], config, rng) for _ in range(4000)])
    assert 2 not in draws  # outside the top 3
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(frequencies, [0.1 / 0.95, 0.6 / 0.95, 0, 0.25 / 0.95], atol=0.03)
    assert softmax(np.array([0.0, -np.inf])).tolist() == [1.0, 0.0]


# -- with the tiny model -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_with_the_kv_cache_equals_greedy_without_it(model, greedy_tokens):
    cached = greedy_tokens
    uncached = generate(model, PROMPT, GenerationConfig(**{**GREEDY.__dict__, "use_cache": False}))
    assert len(cached) == 16
    assert cached == uncached
    assert len(set(cached)) > 3  # a real sequence, not one token repeated


@pytest.mark.slow
def test_moe_and_qkv_concat_models_decode_the_same_with_and_without_the_cache():
    for overrides in ({"num_experts": 4, "num_experts_per_tok": 2}, {"qkv_concat": True}):
        variant = build_tiny_model(seed=32, **overrides)
        config = GenerationConfig(**{**GREEDY.__dict__, "max_new_tokens": 4})
        no_cache = GenerationConfig(**{**config.__dict__, "use_cache": False})
        assert generate(variant, PROMPT, config) == generate(variant, PROMPT, no_cache), overrides


def test_greedy_picks_the_argmax_of_the_full_forward(model):
    tokens = generate(model, PROMPT, GenerationConfig(repetition_penalty=1.0, max_new_tokens=3, stop_token_ids=()))
    sequence = list(PROMPT)
    for token in tokens:
        logits = model(ms.Tensor([sequence], ms.int32)).asnumpy()[0, -1]
        assert token == int(np.argmax(logits))
        sequence.append(token)


def test_seeded_sampling_is_reproducible(model):
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6, seed=7)
    first = generate(model, PROMPT, config)
    assert generate(model, PROMPT, config) == first
    assert generate(model, PROMPT, GenerationConfig(**{**config.__dict__, "seed": 8})) != first


def test_stop_token_ends_generation_and_is_not_yielded(model, greedy_tokens):
    free = greedy_tokens
    stop = free[5]
    first_stop = free.index(stop)
    stream = stream_generate(model, PROMPT, GenerationConfig(**{**GREEDY.__dict__, "stop_token_ids": (stop,)}))
    produced, reason = _drain(stream)
    assert produced == free[:first_stop]
    assert reason == "stop"


def test_cancellation_and_length_limits(model):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 4

    produced, reason = _drain(stream_generate(model, PROMPT, GREEDY, should_stop))
    assert (len(produced), reason) == (4, "cancelled")
    three = GenerationConfig(**{**GREEDY.__dict__, "max_new_tokens": 3})
    produced, reason = _drain(stream_generate(model, PROMPT, three))
    assert (len(produced), reason) == (3, "length")
    long_prompt = [7] * 60  # seq_length is 64: room for 4 tokens only
    produced, reason = _drain(stream_generate(model, long_prompt, GREEDY))
    assert (len(produced), reason) == (4, "length")
    with pytest.raises(ValueError, match="seq_length 64"):
        generate(model, [7] * 64, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], GREEDY)
    with pytest.raises(ValueError, match=r"\[512\] are outside the model's vocabulary of 512"):
        generate(model, [1, 512], GREEDY)


def _drain(stream) -> tuple[list[int], str]:
    """All yielded tokens and the generator's return value (the finish reason)."""
    produced = []
    while True:
        try:
            produced.append(next(stream))
        except StopIteration as done:
            return produced, done.value
