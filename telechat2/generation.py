"""Token generation for TeleChat2: greedy or sampled, with or without the KV cache, one token at a time.

Used by `telechat2 predict` and the HTTP server. The logits processing (repetition penalty, temperature, top-k,
top-p) is plain numpy on one row of logits, so it is testable without a model. The model runs in PyNative mode
(`telechat2.loading.load_model` sets it): graph mode would recompile for every new sequence length.

Stop tokens end generation and are not yielded. `stream_generate` returns (as the generator's return value, seen
by `yield from`) why it ended: "stop" (a stop token), "length" (max_new_tokens or the model's seq_length) or
"cancelled" (should_stop returned True).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

FinishReason = str  # "stop" | "length" | "cancelled"


@dataclass
class GenerationConfig:
    """Decoding settings; defaults are TeleChat2's published ones (115B generation_config)."""

    do_sample: bool = False  # greedy unless asked
    temperature: float = 0.3
    top_k: int = 5  # 0 = no top-k filter
    top_p: float = 0.85  # 1.0 = no nucleus filter
    repetition_penalty: float = 1.03  # 1.0 = none; applied to every token of the prompt and the output, greedy too
    max_new_tokens: int = 4096
    seed: int | None = None  # None = fresh randomness for each call
    stop_token_ids: tuple[int, ...] = (2,)  # <_end>
    use_cache: bool = True

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        problems = []
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if problems:
            raise ValueError("invalid generation config: " + "; ".join(problems))


# -- logits processing: pure functions on one row [V] --------------------------------------------------------------


def apply_repetition_penalty(logits: np.ndarray, previous_ids: Sequence[int], penalty: float) -> np.ndarray:
    """Make tokens already seen less likely (CTRL / Hugging Face rule): positive logits / penalty, negative * it."""
    if penalty == 1.0 or len(previous_ids) == 0:
        return logits
    logits = logits.copy()
    seen = np.unique(np.asarray(previous_ids, dtype=np.int64))
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide by the temperature: below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Keep the top_k largest logits (ties at the k-th value kept too); the rest become -inf. 0 = keep all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = np.partition(logits, -top_k)[-top_k]
    return np.where(logits < kth_largest, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax in float64 (-inf entries get probability 0)."""
    shifted = logits.astype(np.float64) - np.max(logits)
    weights = np.exp(shifted)
    return weights / weights.sum()


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter: keep the most likely tokens until their probability reaches top_p (at least one token)."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits)[order]
    before = np.cumsum(probs) - probs  # probability mass of the more likely tokens
    drop = order[before >= top_p]
    logits = logits.copy()
    logits[drop] = -np.inf
    return logits


def next_token(
    logits: np.ndarray, previous_ids: Sequence[int], config: GenerationConfig, rng: np.random.Generator
) -> int:
    """Pick the next token from one row of logits: penalty, then argmax or temperature/top-k/top-p sampling."""
    logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), previous_ids, config.repetition_penalty)
    if not config.do_sample:
        return int(np.argmax(logits))
    logits = apply_temperature(logits, config.temperature)
    logits = top_p_filter(top_k_filter(logits, config.top_k), config.top_p)
    return int(rng.choice(logits.shape[-1], p=softmax(logits)))


# -- decoding loop ---------------------------------------------------------------------------------------------------


def stream_generate(
    model,
    input_ids: Sequence[int],
    config: GenerationConfig | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one for a single prompt; returns the finish reason (see the module docstring).

    With `use_cache` the prompt is run once (PyNative) and each later step feeds one token to the compiled
    static-cache decoder (`TeleChat2StaticCacheDecoder`); without it every step reruns the whole sequence (slow,
    the reference the cache is tested against). `should_stop` is polled before each step, so a
    server can cancel when its client disconnects.
    """
    import mindspore as ms

    config = config or GenerationConfig()
    if ms.get_context("mode") != ms.PYNATIVE_MODE:
        raise RuntimeError("generation needs PyNative mode: mindspore.set_context(mode=mindspore.PYNATIVE_MODE)")
    ids = [int(t) for t in input_ids]
    if not ids:
        raise ValueError("input_ids is empty: generation needs at least one prompt token")
    vocab_size = model.architecture.vocab_size
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise ValueError(f"token ids {outside[:5]} are outside the model's vocabulary of {vocab_size}")
    max_length = model.architecture.seq_length
    if len(ids) >= max_length:
        raise ValueError(f"prompt of {len(ids)} tokens leaves no room under the model's seq_length {max_length}")
    model.set_train(False)
    rng = np.random.default_rng(config.seed)
    stop_ids = set(config.stop_token_ids)
    budget = min(config.max_new_tokens, max_length - len(ids))

    decoder = model.static_decoder() if config.use_cache else None
    keys = values = None
    for _ in range(budget):
        if should_stop is not None and should_stop():
            return "cancelled"
        if decoder is None:  # no cache: rerun the whole sequence
            logits, _ = model.forward(_as_tensor(ids), last_only=True)
        elif keys is None:  # prefill: the prompt in one pass, its keys and values into fixed-size caches
            logits, cache = model.forward(_as_tensor(ids), last_only=True)
            keys, values = decoder.empty_cache(cache)
        else:  # one compiled step for the newest token
            logits, keys, values = decoder.step(ids[-1], len(ids) - 1, keys, values)
        token = next_token(logits.asnumpy()[0, -1], ids, config, rng)
        if token in stop_ids:
            return "stop"
        ids.append(token)
        yield token
    return "length"


def generate(model, input_ids: Sequence[int], config: GenerationConfig | None = None) -> list[int]:
    """All new token ids for one prompt (stop token excluded)."""
    return list(stream_generate(model, input_ids, config))


def _as_tensor(ids: Sequence[int]):
    import mindspore as ms

    return ms.Tensor(np.asarray([ids], dtype=np.int32))
