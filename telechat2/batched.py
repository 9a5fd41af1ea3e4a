"""Batched decoding for continuous batching: many sequences, each at its own position, one compiled step.

`telechat2.generation.stream_generate` decodes one sequence; a server with N clients would run N of them one after
another. `BatchGenerator` keeps up to `max_batch` sequences in a slot cache (one row of fixed length L = seq_length
per sequence, per layer) and advances all of them with one `TeleChat2BatchedDecoder` step, so the weights are read
once per step for the whole batch. Sequences join (`add`, then the next `step` prefills every new prompt together
and writes each one's keys and values into its own row) and leave (`remove`, or on a stop token / their budget)
between steps, which is continuous batching. A row stays put while its sequence runs: nobody else's cache moves
when one joins or leaves.

Shapes stay static for `mindspore.jit`: the step runs over a bucket of rows (1, 2, 4, ... max_batch, so a lone
request does not pay for 32 rows) and is compiled once per bucket; empty rows in a bucket compute garbage nobody
reads. Per-sequence positions come in as a tensor, and so do the per-sequence rotary rows (cos/sin [B, D]): the
default `TableRotary` gives each row the official per-length dynamic NTK (the shared table up to training_seqlen);
another `rotary` callable plugs in without touching the compiled step. The packed prefill
(`TeleChat2PackedPrefill`) lays several prompts end to end in one row with a block-diagonal causal mask and each
token's rotary row from its own prompt's length, so it is compiled once per padded length, not per mix of prompts.

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

    def prompt(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of positions 0..length-1 for a prompt of `length` tokens, as the model's own prefill rotates it:
        the shared table up to training_seqlen, past it the alpha and mscale of that length."""
        if length <= self.training_seqlen:
            return self.cos[:length], self.sin[:length]
        from telechat2.modeling import sequence_rotary

        return sequence_rotary(0, length, self.architecture)


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


PACK_TOKENS = 256  # prompt tokens one packed prefill call takes at most (a longer prompt gets a call of its own)
PACK_SEQUENCES = 32  # prompts one packed prefill call takes at most (its logits rows)


def pack_length(tokens: int, max_length: int) -> int:
    """Padded length a packed prefill runs at: 16, then multiples of 32 up to PACK_TOKENS, then (a long prompt
    alone) powers of two capped at max_length. Few lengths, because each is a compile (seconds), in steps fine
    enough that padding wastes little of a burst's prefill (8 prompts of ~19 tokens: 160, not 256). A pack of
    several prompts may be longer than seq_length: each prompt's positions stay its own."""
    if tokens <= 16:
        return 16
    if tokens <= PACK_TOKENS:
        return -(-tokens // 32) * 32
    size = 2 * PACK_TOKENS
    while size < tokens:
        size *= 2
    return min(size, max_length)


def pack_prompts(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of prompts grouped into packed prefill calls, in order: up to PACK_TOKENS tokens and PACK_SEQUENCES
    prompts per call (a prompt longer than that alone)."""
    limit = PACK_TOKENS
    packs: list[list[int]] = []
    tokens = 0
    for index, length in enumerate(lengths):
        if packs and tokens + length <= limit and len(packs[-1]) < PACK_SEQUENCES:
            packs[-1].append(index)
            tokens += length
        else:
            packs.append([index])
            tokens = length
    return packs


@dataclass(frozen=True)
class Pack:
    """Inputs of one packed prefill call: prompts laid end to end in one row of `length` tokens, zeros after."""

    ids: np.ndarray  # [1, T] int32
    segments: np.ndarray  # [T] int32: which prompt each token belongs to (-1: padding)
    positions: np.ndarray  # [T] int32: the token's position in its prompt
    cos: np.ndarray  # [T, D] float32: each token's rotary row, from its own prompt's length (dynamic NTK)
    sin: np.ndarray
    last: np.ndarray  # [N] int32: where each prompt's last token is (N = min(PACK_SEQUENCES, T); 0 past the count)

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], max_length: int, rotary: PromptRotary) -> Pack:
        total = sum(map(len, prompts))
        length = pack_length(total, max_length)
        ids = np.zeros((1, length), np.int32)
        segments = np.full(length, -1, np.int32)
        positions = np.zeros(length, np.int32)
        cos_rows, sin_rows = [], []
        last = np.zeros(min(PACK_SEQUENCES, length), np.int32)
        offset = 0
        for index, prompt in enumerate(prompts):
            n = len(prompt)
            ids[0, offset : offset + n] = prompt
            segments[offset : offset + n] = index
            positions[offset : offset + n] = np.arange(n)
            cos, sin = rotary(n)
            cos_rows.append(cos)
            sin_rows.append(sin)
            offset += n
            last[index] = offset - 1
        dim = cos_rows[0].shape[-1]
        padding = np.zeros((length - offset, dim), np.float32)
        return cls(
            ids,
            segments,
            positions,
            np.concatenate([*cos_rows, padding]).astype(np.float32),
            np.concatenate([*sin_rows, padding]).astype(np.float32),
            last,
        )


# (prompt length n) -> (cos [n, D], sin [n, D]) float32 numpy rows of positions 0..n-1 for a prompt of n tokens.
PromptRotary = Callable[[int], tuple[np.ndarray, np.ndarray]]


class TeleChat2PackedPrefill(nn.Cell):
    """Several new prompts in one compiled pass (`mindspore.jit`): laid end to end in one row, padded to a
    `pack_length`, each token attending to the earlier tokens of its own prompt only (a block-diagonal causal mask
    built from segment ids and positions, so one compiled graph per padded length serves any mix of prompts).

    Each token's rotary row comes in as a tensor, computed for its own prompt's length (the official per-length
    dynamic NTK: a prompt past training_seqlen gets its own alpha and mscale, the others the shared table), so a
    prompt's logits and keys are the ones it gets prefilled alone. On CPU the operator-by-operator (PyNative)
    prefill costs dozens of compiled steps, and one call for a burst of prompts costs far less than one each.
    Returns the float32 logits of each prompt's last token [N, V] (rows past the prompt count are padding) and
    each layer's new keys and values [K, max(T, PACK_TOKENS), D] (zeros past T), for `TeleChat2SlotWriter` to put
    in the slot cache.
    """

    def __init__(self, lm) -> None:
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.lm = lm

    def run(self, pack: Pack) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        dtype = self.lm.model.rope_cos.dtype
        return self(
            Tensor(pack.ids),
            Tensor(pack.cos).astype(dtype),
            Tensor(pack.sin).astype(dtype),
            Tensor(pack.segments),
            Tensor(pack.positions),
            Tensor(pack.last),
        )

    @ms.jit
    def construct(
        self, input_ids: Tensor, cos: Tensor, sin: Tensor, segments: Tensor, positions: Tensor, last: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        model = self.lm.model
        length = input_ids.shape[1]
        other_prompt = segments.reshape(length, 1) != segments.reshape(1, length)
        later = positions.reshape(1, length) > positions.reshape(length, 1)
        mask = ops.logical_or(other_prompt, later).reshape(1, 1, length, length)  # True = hidden
        x = model.tok_embeddings(input_ids)  # [1, T, H]
        keys, values = (), ()
        for layer in model.layers:
            x, key, value, _ = layer(x, cos, sin, mask)
            keys = keys + (key[0],)  # noqa: RUF005 (graph mode)
            values = values + (value[0],)  # noqa: RUF005
        hidden = ops.gather(model.norm_out(x)[0], last, 0)  # [N, H]: each prompt's last token
        if length < PACK_TOKENS:  # one shape for the writer whatever the pack's length: fewer compiles
            kv_heads, _, dim = keys[0].shape
            padding = ops.zeros((kv_heads, PACK_TOKENS - length, dim), keys[0].dtype)
            keys = tuple(ops.cat((key, padding), axis=1) for key in keys)
            values = tuple(ops.cat((value, padding), axis=1) for value in values)
        return self.lm.lm_head(hidden).astype(ms.float32), keys, values


class TeleChat2SlotWriter(nn.Cell):
    """Scatters a packed prefill's keys and values [K, T, D] into the slot caches [R, K, L, D] at (row, head,
    position) per token, in one compiled call (PyNative runs one scatter per cache, each far slower here). Has no
    weights; compiled per cache bucket R (T is PACK_TOKENS but for a longer prompt alone)."""

    def write(
        self,
        keys: tuple[Tensor, ...],
        values: tuple[Tensor, ...],
        new_keys: tuple[Tensor, ...],
        new_values: tuple[Tensor, ...],
        index: np.ndarray,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return self(ms.mutable(keys), ms.mutable(values), ms.mutable(new_keys), ms.mutable(new_values), Tensor(index))

    @ms.jit
    def construct(
        self,
        keys: tuple[Tensor, ...],
        values: tuple[Tensor, ...],
        new_keys: tuple[Tensor, ...],
        new_values: tuple[Tensor, ...],
        index: Tensor,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        out_keys, out_values = (), ()
        for layer in range(len(keys)):
            out_keys = out_keys + (ops.tensor_scatter_update(keys[layer], index, new_keys[layer]),)  # noqa: RUF005
            out_values = out_values + (ops.tensor_scatter_update(values[layer], index, new_values[layer]),)  # noqa: RUF005
        return out_keys, out_values


def packed_prefill(model) -> TeleChat2PackedPrefill:
    """The model's packed prefill (built on first use, then reused, so compiled lengths are kept)."""
    prefill = model.__dict__.get("_packed_prefill")
    if prefill is None:
        prefill = TeleChat2PackedPrefill(model)
        object.__setattr__(model, "_packed_prefill", prefill)  # a plain reference, not a child cell
    return prefill


_SLOT_WRITER: TeleChat2SlotWriter | None = None


def slot_writer() -> TeleChat2SlotWriter:
    global _SLOT_WRITER
    if _SLOT_WRITER is None:
        _SLOT_WRITER = TeleChat2SlotWriter()
    return _SLOT_WRITER


def batched_decoder(model) -> TeleChat2BatchedDecoder:
    """The model's batched decoder (built on first use, then reused, so compiled buckets are kept)."""
    decoder = model.__dict__.get("_batched_decoder")
    if decoder is None:
        decoder = TeleChat2BatchedDecoder(model)
        object.__setattr__(model, "_batched_decoder", decoder)  # a plain reference, not a child cell
    return decoder


@dataclass(frozen=True)
class Emitted:
    """What one sequence produced in a `step`: a token, or the reason it ended (then token is None)."""

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
    fed: int | None = None  # prompt tokens already through the step (None: prefilled)
    row: int | None = None  # its row of the slot caches (None: admitted, not yet placed)


class BatchGenerator:
    """Up to `max_batch` sequences decoded together; owned by one thread (MindSpore is not re-entrant).

    `add` takes a sequence in (its prompt waits for the next step); `step` first prefills every prompt added since
    the last one, together (one packed compiled call per PACK_TOKENS with `compile_prefill`), and gives each its
    first token, then runs one batched decode step that gives every running sequence its next token. A sequence
    that ends leaves the batch by itself, `remove` takes one out early (cancellation). Finish rules are
    `stream_generate`'s: a stop token ends it unreported, `budget` = min(max_new_tokens, seq_length - prompt)
    tokens at most.

    Rows stay where they are: a sequence keeps its row of the slot caches from its prefill to its end, joining
    writes only its own row and leaving writes nothing. The caches grow to the next bucket when a burst needs more
    rows (one copy for the whole burst) and shrink only when the batch empties or fits in a quarter of them.
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
        self.table = TableRotary(model)
        self.rotary = rotary or self.table
        self.max_length = model.architecture.seq_length
        self.vocab_size = model.architecture.vocab_size
        self.prompt_in_step = prompt_in_step
        self.prefill = packed_prefill(model) if compile_prefill else None
        self.sequences: dict[int, _Sequence] = {}
        self.pending: list[int] = []  # added, waiting for the next step's prefill (in arrival order)
        self.rows: list[int | None] = []  # row -> seq_id (None: free); len == the current bucket
        self.keys: tuple[Tensor, ...] = ()
        self.values: tuple[Tensor, ...] = ()
        self.prefill_calls = 0  # packed prefill calls so far (how many prompts share one: tests, benchmarks)
        model.set_train(False)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def capacity(self) -> int:
        """Rows of the current cache (the bucket the next step compiles for)."""
        return len(self.rows)

    def has_room(self) -> bool:
        return len(self.sequences) < self.max_batch

    def warm_up(self) -> int:
        """Compile every shape a server's batch meets (decode per row bucket, packed prefill per padded length up
        to PACK_TOKENS, writer per bucket) on scratch caches, so no request waits seconds for a compile; returns
        how many calls it made. Prompts longer than PACK_TOKENS still compile on first use."""
        if self.sequences:
            raise RuntimeError("warm_up runs before any sequence is added")
        calls = 0
        layers = range(len(self.model.model.layers))
        lengths = sorted({pack_length(n, self.max_length) for n in range(1, PACK_TOKENS + 1)})
        packs = []
        if self.prefill is not None:
            for length in lengths:  # prompts of `length` tokens in all (seq_length - 1 each at most)
                sizes = [self.max_length - 1] * (length // (self.max_length - 1))
                sizes += [length % (self.max_length - 1)] if length % (self.max_length - 1) else []
                pack = Pack.build([[0] * size for size in sizes], self.max_length, self.table.prompt)
                logits, new_keys, new_values = self.prefill.run(pack)
                logits.asnumpy()
                packs.append((pack, new_keys, new_values))
                calls += 1
        for size in self.buckets:
            shape, dtype = self._cache_shape(size), self._cache_dtype()
            keys = tuple(ops.zeros(shape, dtype) for _ in layers)
            values = tuple(ops.zeros(shape, dtype) for _ in layers)
            zeros = np.zeros(size, np.int64)
            cos, sin = self.rotary(zeros)
            logits, keys, values = self.decoder.step(zeros, zeros, cos, sin, keys, values)
            logits.asnumpy()
            calls += 1
            if packs:
                pack, new_keys, new_values = packs[-1]
                index = self._write_index(pack, [0] * (int(pack.segments.max()) + 1), new_keys[0].shape[0])
                keys, _ = slot_writer().write(keys, values, new_keys, new_values, index)
                keys[0].asnumpy()
                calls += 1
        return calls

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

    def add(self, seq_id: int, input_ids: Sequence[int], config: GenerationConfig) -> None:
        """Take a sequence in (its prompt is checked now, prefilled by the next `step` with every other prompt
        added before it; its first token comes from that step). A prompt of up to `prompt_in_step` tokens is
        read by the batched decode step instead, a token per step alongside the others."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} is already running")
        if not self.has_room():
            raise RuntimeError(f"the batch is full ({self.max_batch} sequences)")
        ids = self.check(input_ids)
        self.sequences[seq_id] = _Sequence(
            ids=ids,
            config=config,
            rng=np.random.default_rng(config.seed),
            budget=min(config.max_new_tokens, self.max_length - len(ids)),
            stop_ids=frozenset(config.stop_token_ids),
            fed=0 if len(ids) <= self.prompt_in_step else None,
        )
        self.pending.append(seq_id)

    def _admit(self) -> list[Emitted]:
        """Place the pending sequences in free rows (growing the caches once for all of them) and prefill their
        prompts: together with `compile_prefill`, else one PyNative pass each (as `stream_generate`)."""
        admitted, self.pending = self.pending, []
        placed = sum(1 for seq_id in self.rows if seq_id is not None)
        if placed + len(admitted) > self.capacity:
            self._resize(next(b for b in self.buckets if b >= placed + len(admitted)))
        free = [row for row, seq_id in enumerate(self.rows) if seq_id is None]
        prefill = []
        for seq_id, row in zip(admitted, free, strict=False):
            seq = self.sequences[seq_id]
            seq.row = row
            self.rows[row] = seq_id
            if seq.fed is None:
                prefill.append(seq_id)
        emitted: list[Emitted] = []
        if self.prefill is None:
            for seq_id in prefill:
                seq = self.sequences[seq_id]
                logits, cache = self.model.forward(Tensor(np.asarray([seq.ids], np.int32)), last_only=True)
                self._write_row(seq.row, cache)
                emitted.append(self._pick(seq_id, seq, logits.asnumpy()[0, -1]))
            return emitted
        lengths = [len(self.sequences[seq_id].ids) for seq_id in prefill]
        for pack_ids in pack_prompts(lengths):
            seq_ids = [prefill[i] for i in pack_ids]
            emitted += self._prefill_pack(seq_ids)
        return emitted

    def _prefill_pack(self, seq_ids: list[int]) -> list[Emitted]:
        """One packed prefill call, its keys and values scattered into the sequences' rows, their first tokens."""
        seqs = [self.sequences[seq_id] for seq_id in seq_ids]
        pack = Pack.build([seq.ids for seq in seqs], self.max_length, self.table.prompt)
        logits, keys, values = self.prefill.run(pack)
        self.prefill_calls += 1
        index = self._write_index(pack, [seq.row for seq in seqs], keys[0].shape[0])
        self.keys, self.values = slot_writer().write(self.keys, self.values, keys, values, index)
        rows = logits.asnumpy()
        return [self._pick(seq_id, seq, rows[i]) for i, (seq_id, seq) in enumerate(zip(seq_ids, seqs, strict=True))]

    def _write_index(self, pack: Pack, rows: list[int], kv_heads: int) -> np.ndarray:
        """(row, kv head, position) [K, T, 3] where each packed token's key and value go. Padding goes to the last
        prompt's row past its end (positions the decode step hides until it writes them), clipped at L - 1."""
        length = max(pack.segments.shape[0], PACK_TOKENS)  # the prefill's keys are padded to PACK_TOKENS
        segments = np.full(length, -1, np.int32)
        segments[: pack.segments.shape[0]] = pack.segments
        pack_positions = np.zeros(length, np.int32)
        pack_positions[: pack.positions.shape[0]] = pack.positions
        real = segments >= 0
        last = int(segments[real].max())
        last_length = int((segments == last).sum())  # tokens of the last prompt
        target_rows = np.where(real, np.asarray(rows, np.int32)[np.maximum(segments, 0)], rows[last])
        pad_positions = np.minimum(last_length + np.cumsum(~real) - 1, self.max_length - 1)
        positions = np.where(real, pack_positions, pad_positions)
        index = np.empty((kv_heads, length, 3), np.int32)
        index[..., 0] = target_rows
        index[..., 1] = np.arange(kv_heads, dtype=np.int32).reshape(-1, 1)
        index[..., 2] = positions
        return index

    def _write_row(self, row: int, cache: tuple[tuple[Tensor, Tensor], ...]) -> None:
        """Copy a PyNative prefill cache [1, K, T, D] per layer into row `row` of the slot caches (positions
        0..T-1): one scatter per cache."""
        keys, values = [], []
        where = Tensor(np.asarray([[row]], np.int32))
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
        """Move the placed rows into caches of `size` rows (compacting them to the front when shrinking)."""
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
        for row, seq_id in enumerate(self.rows):
            if seq_id is not None:
                self.sequences[seq_id].row = row

    def _cache_shape(self, rows: int) -> tuple[int, int, int, int]:
        attention = self.model.model.layers[0].attention
        return (rows, attention.n_kv_heads, self.max_length, attention.head_dim)

    def _cache_dtype(self):
        return self.model.model.rope_cos.dtype

    # -- leaving -----------------------------------------------------------------------------------------------------

    def remove(self, seq_id: int) -> None:
        """Take a sequence out (cancelled, or ended); its row is free for the next `add`. Unknown ids are ignored."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return
        if seq.row is None:
            self.pending.remove(seq_id)
            return
        self.rows[seq.row] = None
        self._maybe_shrink()

    def _maybe_shrink(self) -> None:
        """Drop to a smaller bucket once the placed sequences fit in a quarter of the rows (hysteresis: a batch
        hovering around a bucket edge does not copy caches back and forth)."""
        placed = sum(1 for seq_id in self.rows if seq_id is not None)
        if placed == 0:
            self.rows, self.keys, self.values = [], (), ()  # frees the memory; the next burst starts small
            return
        if placed * 4 <= self.capacity:
            self._resize(next(b for b in self.buckets if b >= placed))

    # -- decoding ----------------------------------------------------------------------------------------------------

    def step(self) -> list[Emitted]:
        """Prefill the prompts added since the last step (their first tokens), then one token for every running
        sequence (in row order); ended sequences leave the batch."""
        emitted = self._admit() if self.pending else []
        if not any(seq_id is not None for seq_id in self.rows):
            return emitted
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
