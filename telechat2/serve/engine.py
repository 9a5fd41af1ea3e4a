"""The model behind the server, as a small interface: ids in, a stream of ids out.

The HTTP layer only needs `Engine`: a tokenizer, default sampling parameters and `stream(...)`; an engine that also
has `open_batch(max_batch)` is run with continuous batching (`Batch`). `TeleChat2Engine` is the real one (MindSpore
model + TeleChat2 tokenizer; `telechat2.batched.BatchGenerator` for batches, `telechat2.generation.stream_generate`
for one sequence); narrow unit tests (queue full, disconnects) plug in a slow stream-only fake to control timing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from telechat2.tokenizer import EOS_ID

log = logging.getLogger(__name__)

_YAML_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the generator; field names follow `telechat2.generation.GenerationConfig`.

    Defaults are TeleChat2's published generation defaults (facts file, section 3).
    """

    do_sample: bool = False
    temperature: float = 0.3
    top_k: int = 5
    top_p: float = 0.85
    repetition_penalty: float = 1.03
    max_new_tokens: int = 4096
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = (EOS_ID,)

    def replace(self, **changes: Any) -> SamplingParams:
        """Copy with the given fields changed; None values mean "keep the default"."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


class Tokenizer(Protocol):
    special_ids: frozenset[int]
    special_piece_to_id: dict[str, int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...


class Engine(Protocol):
    tokenizer: Tokenizer
    defaults: SamplingParams

    def stream(self, input_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool]) -> Iterator[int]:
        """Generated ids one by one; stops early once should_stop() is true. Runs on the generation thread."""
        ...


class Emission(Protocol):
    """One sequence's output of a batch operation (`telechat2.batched.Emitted`)."""

    seq_id: int
    token: int | None  # None when the sequence ended without a token (a stop token)
    finish: str | None  # "stop" or "length" once the sequence has ended, else None


class Batch(Protocol):
    """A running decode batch (continuous batching); used by the scheduler thread only.

    Engines that can batch have `open_batch(max_batch) -> Batch`; the scheduler then runs requests together.
    Engines with `stream` only (the narrow tests' fakes) run one request at a time.
    """

    def add(self, seq_id: int, input_ids: list[int], params: SamplingParams) -> Emission | None:
        """Join the batch; the first token now, or None (it comes from the next `step`, which prefills every
        prompt added since the last one together)."""
        ...

    def step(self) -> list[Emission]: ...

    def remove(self, seq_id: int) -> None: ...


class TeleChat2Engine:
    """TeleChat2 on MindSpore: `telechat2.loading.load_model` + `telechat2.generation.stream_generate`."""

    def __init__(self, model: Any, tokenizer: Tokenizer, defaults: SamplingParams | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults or generation_defaults()

    @classmethod
    def load(
        cls,
        config: str,
        checkpoint: str | None,
        vocab_file: str | None,
        seq_length: int,
        tensor_parallel: Any = None,
    ) -> TeleChat2Engine:
        """Load weights and tokenizer; slow (seconds to minutes), so the server calls it after the port opens.

        Generation defaults: TeleChat2's, overridden by the YAML's model_config keys (as `telechat2 predict`).
        `tensor_parallel` (a `telechat2.tensor_parallel.TensorParallel`, under msrun) loads this rank's share.
        """
        from telechat2.loading import load_model, read_run_config
        from telechat2.tokenizer import TeleChat2Tokenizer

        run_config = read_run_config(config)
        vocab = vocab_file or ((run_config.get("processor") or {}).get("tokenizer") or {}).get("vocab_file")
        if not vocab:
            raise ValueError("no tokenizer: pass --vocab_file or set processor.tokenizer.vocab_file in the YAML")
        tokenizer = TeleChat2Tokenizer(vocab)
        checkpoint = checkpoint or run_config.get("load_checkpoint") or None
        if not checkpoint:
            log.warning("no checkpoint (--load_checkpoint or the YAML's load_checkpoint): serving RANDOM weights")
        model = load_model(config, checkpoint, seq_length=seq_length, tensor_parallel=tensor_parallel)
        model_config = run_config["model"]["model_config"]
        defaults = generation_defaults().replace(
            **{f.name: model_config.get(f.name) for f in dataclasses.fields(SamplingParams) if f.name in _YAML_KEYS}
        )
        return cls(model, tokenizer, defaults)

    def stream(self, input_ids: list[int], params: SamplingParams, should_stop: Callable[[], bool]) -> Iterator[int]:
        from telechat2.generation import stream_generate

        return stream_generate(self.model, input_ids, to_generation_config(params), should_stop=should_stop)

    def open_batch(self, max_batch: int) -> ModelBatch:
        """A decode batch of up to `max_batch` sequences over this model (`telechat2.batched.BatchGenerator`).

        On CPU the prompts admitted at a step boundary are prefilled together by one compiled pass per pack
        (`telechat2.batched.TeleChat2PackedPrefill`): the operator-by-operator prefill costs dozens of steps there,
        and a prefill per request held the whole batch back once per arrival. On Ascend each prompt runs through
        the model's own (flash attention) prefill.
        """
        return ModelBatch(self._generator(max_batch))

    def warm_up(self, max_batch: int) -> None:
        """Compile the batch's shapes now (`BatchGenerator.warm_up`), before the server reports ready, so the first
        requests of each batch size and prompt length do not wait seconds for a compile."""
        started = time.monotonic()
        calls = self._generator(max_batch).warm_up()
        log.info("warm-up: %d compiled shapes in %.1fs", calls, time.monotonic() - started)

    def _generator(self, max_batch: int) -> Any:
        import mindspore as ms

        from telechat2.batched import BatchGenerator

        compiled = ms.get_context("device_target") == "CPU"
        return BatchGenerator(self.model, max_batch, compile_prefill=compiled)


class ModelBatch:
    """`BatchGenerator` behind the `Batch` interface: sampling parameters in the server's terms."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator

    def add(self, seq_id: int, input_ids: list[int], params: SamplingParams) -> Emission | None:
        return self.generator.add(seq_id, input_ids, to_generation_config(params))

    def step(self) -> list[Emission]:
        return self.generator.step()

    def remove(self, seq_id: int) -> None:
        self.generator.remove(seq_id)


def generation_defaults() -> SamplingParams:
    """`GenerationConfig()`'s defaults as SamplingParams, so server and `telechat2 predict` agree."""
    from telechat2.generation import GenerationConfig

    defaults = dataclasses.asdict(GenerationConfig())
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    values = {k: v for k, v in defaults.items() if k in names}
    if "stop_token_ids" in values:
        values["stop_token_ids"] = tuple(values["stop_token_ids"] or (EOS_ID,))
    return SamplingParams(**values)


def to_generation_config(params: SamplingParams) -> Any:
    from telechat2.generation import GenerationConfig

    values = dataclasses.asdict(params)
    values["stop_token_ids"] = list(params.stop_token_ids)
    return GenerationConfig(**values)
