"""Batched decoding for continuous batching: many sequences, each at its own position, one compiled step.

`telechat2.generation.stream_generate` decodes one sequence; a server with N clients would run N of them one after
another. `BatchGenerator` keeps up to `max_batch` sequences in a preallocated slot cache (one row of fixed length
L = seq_length per sequence, per layer) and advances all of them with one `TeleChat2BatchedDecoder` step, so the
weights are read once per step for the whole batch. Sequences join (`add`: the prompt runs alone, as in
`stream_generate`, and its cache is copied into a free row) and leave (`remove`, or on a stop token / their budget)
between steps, which is continuous batching.

Shapes stay static for `mindspore.jit`: the step runs over a bucket of rows (1, 2, 4, ... max_batch, so a lone
request does not pay for 32 rows) and is compiled once per bucket; empty rows in a bucket compute garbage nobody
reads. Per-sequence positions come in as a tensor, and so do the per-sequence rotary rows (cos/sin [B, D]): the
default `TableRotary` gives each row the official per-length dynamic NTK (the shared table up to training_seqlen);
another `rotary` callable plugs in without touching the compiled step.

Every sequence gets exactly the tokens `stream_generate` gives it alone (same prefill, same per-row arithmetic,
same logits processing and seeded generator per sequence); tested in tests/unit/test_batched.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from telechat2.generation import GenerationConfig, next_token

# (positions [B] int) -> (cos [B, D], sin [B, D]) float32 numpy rows for those positions, one per sequence row.
Rotary = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class TableRotary:
    """Rotary rows per sequence, as the official model computes them (dynamic NTK from each sequence's length).

    Up to training_seqlen tokens every sequence shares the model's precomputed table, so those rows are gathered
    from it; a row whose sequence is longer gets its own alpha and mscale (`modeling.decode_rotary`).
    """

    def __init__(self, model) -> None:
        self.cos = model.model.rope_cos.asnumpy().astype(np.float32)
        self.sin = model.model.rope_sin.asnumpy().astype(np.float32)
        self.training_seqlen = int(model.model.training_seqlen)
        self.architecture = model.architecture

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        long = positions + 1 > self.training_seqlen  # the sequence, this token included, is past the trained length
        if not long.any():
            return self.cos[positions], self.sin[positions]
        from telechat2.modeling import decode_rotary

        cos, sin = self.cos[np.where(long, 0, positions)], self.sin[np.where(long, 0, positions)]
        cos[long], sin[long] = decode_rotary(positions[long], self.architecture)
        return cos, sin


def buckets(max_batch: int) -> tuple[int, ...]:
    """Row counts the step is compiled for: powers of two below max_batch, then max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


class TeleChat2BatchedDecoder(nn.Cell):
    """One decoding step for B sequences, each at its own position, with slot caches [B, K, L, D] per layer.

    Reuses each layer's `decode_static` (the single-sequence compiled step) with per-row tensors: the write slot
    [B, 1, L, 1] and the hidden keys [B, 1, 1, L] come from each row's position, cos/sin [B, 1, 1, D] from the
    caller. Tensor-parallel models work unchanged (their layers hold this rank's heads; collectives run in the
    graph).
    """

    def __init__(self, lm) -> None:
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.lm = lm
        self.max_length = lm.architecture.seq_length

    def step(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        cos: np.ndarray,
        sin: np.ndarray,
        keys: tuple[Tensor, ...],
        values: tuple[Tensor, ...],
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """tokens/positions [B] ints, cos/sin [B, D] -> (float32 logits [B, 1, V], keys, values)."""
        dtype = self.lm.model.rope_cos.dtype
        return self(
            Tensor(np.asarray(tokens, np.int32).reshape(-1, 1)),
            Tensor(np.asarray(positions, np.int32)),
            Tensor(np.asarray(cos, np.float32)).astype(dtype),
            Tensor(np.asarray(sin, np.float32)).astype(dtype),
            ms.mutable(keys),
            ms.mutable(values),
        )

    @ms.jit
    def construct(
        self,
        tokens: Tensor,
        positions: Tensor,
        cos: Tensor,
        sin: Tensor,
        keys: tuple[Tensor, ...],
        values: tuple[Tensor, ...],
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        model = self.lm.model
        batch = tokens.shape[0]
        x = model.tok_embeddings(tokens)  # [B, 1, H]
        cos = cos.reshape(batch, 1, 1, -1)  # broadcasts over heads like the single-sequence [1, D]
        sin = sin.reshape(batch, 1, 1, -1)
        key_pos = ops.arange(self.max_length, dtype=ms.int32).reshape(1, self.max_length)
        where = positions.reshape(batch, 1)
        slot = (key_pos == where).astype(x.dtype).reshape(batch, 1, self.max_length, 1)
        hidden_keys = (key_pos > where).reshape(batch, 1, 1, self.max_length)
        kv_heads = keys[0].shape[1]  # (row, kv head, position) of every new K/V row: scattered, not blended in
        rows = ops.broadcast_to(ops.arange(batch, dtype=ms.int32).reshape(batch, 1, 1), (batch, kv_heads, 1))
        heads = ops.broadcast_to(ops.arange(kv_heads, dtype=ms.int32).reshape(1, kv_heads, 1), (batch, kv_heads, 1))
        at = ops.broadcast_to(positions.reshape(batch, 1, 1), (batch, kv_heads, 1))
        write_index = ops.cat((rows, heads, at), axis=-1)  # [B, K, 3]
        new_keys, new_values = (), ()
        for index, layer in enumerate(model.layers):
            x, key_cache, value_cache = layer.decode_static(
                x, cos, sin, slot, hidden_keys, keys[index], values[index], write_index
            )
            new_keys = new_keys + (key_cache,)  # noqa: RUF005 (graph mode)
            new_values = new_values + (value_cache,)  # noqa: RUF005
        return self.lm.lm_head(model.norm_out(x)).astype(ms.float32), new_keys, new_values


def prefill_length(length: int, max_length: int) -> int:
    """Padded prompt length the compiled prefill runs at: the next power of two from 16, capped at max_length."""
    size = 16
    while size < length:
        size *= 2
    return min(size, max_length)


class TeleChat2CompiledPrefill(nn.Cell):
    """A new prompt in one compiled pass (`mindspore.jit`), padded at the end to a length bucket (16, 32, ...).

    On CPU the operator-by-operator (PyNative) prefill costs more than dozens of compiled steps, which is why
    prompts used to be read a token per batched step (a 20-token prompt then held its row, and delayed its first
    token, for 20 steps). Padding goes after the prompt, so causal attention keeps the real positions' outputs
    those of the unpadded prompt; the padded positions' keys land in the slot cache past the sequence's position,
    where the decode step hides them until it overwrites them. Returns the logits of the last real token [1, 1, V]
    and caches [1, K, L, D] per layer, ready for a slot row. Compiled once per length bucket.
    """

    def __init__(self, lm) -> None:
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.lm = lm
        self.max_length = lm.architecture.seq_length

    def run(self, ids: Sequence[int]) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        padded = np.zeros((1, prefill_length(len(ids), self.max_length)), np.int32)
        padded[0, : len(ids)] = ids
        return self(Tensor(padded), Tensor(np.asarray([len(ids) - 1], np.int32)))

    @ms.jit
    def construct(self, input_ids: Tensor, last: Tensor) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        hidden, cache, _ = self.lm.model(input_ids)
        logits = self.lm.lm_head(ops.gather(hidden, last, 1)).astype(ms.float32)  # [1, 1, V]
        keys, values = (), ()
        for key, value in cache:
            batch, kv_heads, length, dim = key.shape
            if length < self.max_length:
                padding = ops.zeros((batch, kv_heads, self.max_length - length, dim), key.dtype)
                key, value = ops.cat((key, padding), axis=2), ops.cat((value, padding), axis=2)
            keys = keys + (key,)  # noqa: RUF005 (graph mode)
            values = values + (value,)  # noqa: RUF005
        return logits, keys, values


def compiled_prefill(model) -> TeleChat2CompiledPrefill:
    """The model's compiled prefill (built on first use, then reused, so compiled length buckets are kept)."""
    prefill = model.__dict__.get("_compiled_prefill")
    if prefill is None:
        prefill = TeleChat2CompiledPrefill(model)
        object.__setattr__(model, "_compiled_prefill", prefill)  # a plain reference, not a child cell
    return prefill


def batched_decoder(model) -> TeleChat2BatchedDecoder:
    """The model's batched decoder (built on first use, then reused, so compiled buckets are kept)."""
    decoder = model.__dict__.get("_batched_decoder")
    if decoder is None:
        decoder = TeleChat2BatchedDecoder(model)
        object.__setattr__(model, "_batched_decoder", decoder)  # a plain reference, not a child cell
    return decoder


@dataclass(frozen=True)
class Emitted:
    """What one sequence produced in an `add` or a `step`: a token, or the reason it ended (then token is None)."""

    seq_id: int
    token: int | None
    finish: str | None = None  # "stop" (a stop token, not emitted) or "length" (after the last allowed token)


@dataclass
class _Sequence:
    ids: list[int]
    config: GenerationConfig
    rng: np.random.Generator
    budget: int
    generated: int = 0
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    fed: int | None = None  # prompt tokens already through the step (None: prefilled at `add`)


class BatchGenerator:
    """Up to `max_batch` sequences decoded together; owned by one thread (MindSpore is not re-entrant).

    `add` runs a prompt and returns its first token; `step` returns one token (or an end) for every running
    sequence; a sequence that ends leaves the batch by itself, `remove` takes one out early (cancellation).
    Finish rules are `stream_generate`'s: a stop token ends it unreported, `budget` = min(max_new_tokens,
    seq_length - prompt) tokens at most.
    """

    def __init__(
        self,
        model,
        max_batch: int,
        rotary: Rotary | None = None,
        prompt_in_step: int = 0,
        compile_prefill: bool = False,
    ) -> None:
        if ms.get_context("mode") != ms.PYNATIVE_MODE:
            raise RuntimeError("generation needs PyNative mode: mindspore.set_context(mode=mindspore.PYNATIVE_MODE)")
        self.model = model
        self.max_batch = max_batch
        self.buckets = buckets(max_batch)
        self.decoder = batched_decoder(model)
        self.rotary = rotary or TableRotary(model)
        self.max_length = model.architecture.seq_length
        self.vocab_size = model.architecture.vocab_size
        self.prompt_in_step = prompt_in_step
        self.prefill = compiled_prefill(model) if compile_prefill else None
        self.sequences: dict[int, _Sequence] = {}
        self.rows: list[int | None] = []  # row -> seq_id (None: free); len == the current bucket
        self.keys: tuple[Tensor, ...] = ()
        self.values: tuple[Tensor, ...] = ()
        model.set_train(False)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def capacity(self) -> int:
        """Rows of the current cache (the bucket the next step compiles for)."""
        return len(self.rows)

    def has_room(self) -> bool:
        return len(self.sequences) < self.max_batch

    # -- joining -----------------------------------------------------------------------------------------------------

    def check(self, input_ids: Sequence[int]) -> list[int]:
        """The prompt as ints, or ValueError for what `stream_generate` refuses too."""
        ids = [int(t) for t in input_ids]
        if not ids:
            raise ValueError("input_ids is empty: generation needs at least one prompt token")
        outside = [t for t in ids if not 0 <= t < self.vocab_size]
        if outside:
            raise ValueError(f"token ids {outside[:5]} are outside the model's vocabulary of {self.vocab_size}")
        if len(ids) >= self.max_length:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room under the model's seq_length {self.max_length}"
            )
        return ids

    def add(self, seq_id: int, input_ids: Sequence[int], config: GenerationConfig) -> Emitted | None:
        """Take a sequence in; a prompt longer than `prompt_in_step` tokens is prefilled now, alone (as
        `stream_generate` does), and its first token returned. A shorter one goes through the batched step a token
        per step alongside the others (None now; its first token comes from the step that reads its last prompt
        token): on CPU a compiled step costs far less than the operator-by-operator prefill."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} is already running")
        if not self.has_room():
            raise RuntimeError(f"the batch is full ({self.max_batch} sequences)")
        ids = self.check(input_ids)
        seq = _Sequence(
            ids=ids,
            config=config,
            rng=np.random.default_rng(config.seed),
            budget=min(config.max_new_tokens, self.max_length - len(ids)),
            stop_ids=frozenset(config.stop_token_ids),
        )
        row = self._free_row()
        if len(ids) <= self.prompt_in_step:
            seq.fed = 0
            self.rows[row] = seq_id
            self.sequences[seq_id] = seq
            return None
        padded = prefill_length(len(ids), self.max_length)
        if self.prefill is not None and padded <= self.model.model.training_seqlen:  # longer: per-length rotary
            logits, keys, values = self.prefill.run(ids)
            self._write_row(row, tuple(zip(keys, values, strict=True)))
        else:
            logits, cache = self.model.forward(Tensor(np.asarray([ids], np.int32)), last_only=True)
            self._write_row(row, cache)
        self.rows[row] = seq_id
        self.sequences[seq_id] = seq
        return self._pick(seq_id, seq, logits.asnumpy()[0, -1])

    def _free_row(self) -> int:
        if None not in self.rows:
            self._resize(next(b for b in self.buckets if b > len(self.rows)))
        return self.rows.index(None)

    def _write_row(self, row: int, cache: tuple[tuple[Tensor, Tensor], ...]) -> None:
        """Copy a prefill cache [1, K, T, D] per layer into row `row` of the slot caches (positions 0..T-1)."""
        keys, values = [], []
        where = Tensor(np.asarray([[row]], np.int32))  # one scatter per cache: same shapes for every row
        for index, (key, value) in enumerate(cache):
            _, kv_heads, length, dim = key.shape
            padding = None
            if length < self.max_length:
                padding = ops.zeros((1, kv_heads, self.max_length - length, dim), key.dtype)
            for new, old, out in ((key, self.keys[index], keys), (value, self.values[index], values)):
                full = new if padding is None else ops.cat((new, padding), axis=2)
                out.append(ops.tensor_scatter_update(old, where, full) if self.capacity > 1 else full)
        self.keys, self.values = tuple(keys), tuple(values)

    def _resize(self, size: int) -> None:
        """Move the running rows into caches of `size` rows (compacting them to the front when shrinking)."""
        kept = [row for row, seq_id in enumerate(self.rows) if seq_id is not None]
        if size < len(kept):
            raise AssertionError(f"cannot shrink to {size} rows with {len(kept)} running")
        shape = self._cache_shape(size)
        if not self.keys:
            self.keys = tuple(ops.zeros(shape, self._cache_dtype()) for _ in self.model.model.layers)
            self.values = tuple(ops.zeros(shape, self._cache_dtype()) for _ in self.model.model.layers)
            self.rows = [None] * size
            return
        if size > len(self.rows):  # grow: rows keep their index, new ones are zeros
            extra = ops.zeros((size - len(self.rows), *shape[1:]), self.keys[0].dtype)
            self.keys = tuple(ops.cat((k, extra), axis=0) for k in self.keys)
            self.values = tuple(ops.cat((v, extra), axis=0) for v in self.values)
            self.rows = self.rows + [None] * (size - len(self.rows))
            return
        order = Tensor(np.asarray(kept + [r for r in range(len(self.rows)) if r not in kept][: size - len(kept)]))
        self.keys = tuple(ops.gather(k, order, 0) for k in self.keys)
        self.values = tuple(ops.gather(v, order, 0) for v in self.values)
        self.rows = [self.rows[r] for r in kept] + [None] * (size - len(kept))

    def _cache_shape(self, rows: int) -> tuple[int, int, int, int]:
        attention = self.model.model.layers[0].attention
        return (rows, attention.n_kv_heads, self.max_length, attention.head_dim)

    def _cache_dtype(self):
        return self.model.model.rope_cos.dtype

    # -- leaving -----------------------------------------------------------------------------------------------------

    def remove(self, seq_id: int) -> None:
        """Take a sequence out (cancelled, or ended); its row is free for the next `add`. Unknown ids are ignored."""
        if self.sequences.pop(seq_id, None) is None:
            return
        self.rows[self.rows.index(seq_id)] = None
        self._maybe_shrink()

    def _maybe_shrink(self) -> None:
        """Drop to a smaller bucket once the running sequences fit in a quarter of the rows (hysteresis: a batch
        hovering around a bucket edge does not copy caches back and forth)."""
        running = len(self.sequences)
        if running == 0:
            self.rows, self.keys, self.values = [], (), ()  # frees the memory; the next add starts at one row
            return
        if running * 4 <= self.capacity:
            self._resize(next(b for b in self.buckets if b >= running))

    # -- decoding ----------------------------------------------------------------------------------------------------

    def step(self) -> list[Emitted]:
        """One token for every running sequence (in row order); ended sequences leave the batch."""
        if not self.sequences:
            return []
        tokens = np.zeros(self.capacity, np.int64)
        positions = np.zeros(self.capacity, np.int64)
        reading_prompt: set[int] = set()  # rows whose step reads a prompt token that is not the last one
        for row, seq_id in enumerate(self.rows):
            if seq_id is None:
                continue
            seq = self.sequences[seq_id]
            if seq.fed is not None and seq.fed < len(seq.ids):  # still reading its prompt
                tokens[row], positions[row] = seq.ids[seq.fed], seq.fed
                seq.fed += 1
                if seq.fed < len(seq.ids):
                    reading_prompt.add(row)
                else:
                    seq.fed = None  # the last prompt token: this step's logits give the first new token
            else:
                tokens[row], positions[row] = seq.ids[-1], len(seq.ids) - 1
        cos, sin = self.rotary(positions)
        logits, self.keys, self.values = self.decoder.step(tokens, positions, cos, sin, self.keys, self.values)
        rows = logits.asnumpy()[:, -1]
        emitted = []
        for row, seq_id in enumerate(list(self.rows)):
            if seq_id is not None and row not in reading_prompt:
                emitted.append(self._pick(seq_id, self.sequences[seq_id], rows[row]))
        return emitted

    def _pick(self, seq_id: int, seq: _Sequence, logits: np.ndarray) -> Emitted:
        token = next_token(logits, seq.ids, seq.config, seq.rng)
        if token in seq.stop_ids:
            self.remove(seq_id)
            return Emitted(seq_id, None, "stop")
        seq.ids.append(token)
        seq.generated += 1
        if seq.generated >= seq.budget:
            self.remove(seq_id)
            return Emitted(seq_id, token, "length")
        return Emitted(seq_id, token)
