"""Continuous batching in the model layer: `telechat2.batched.BatchGenerator` against lone `generate` calls.

Every sequence in a batch must get exactly the tokens it gets alone (greedy and seeded sampling), whatever joins or
leaves around it and whichever bucket (1, 2, 4 rows...) the step runs in; a removed sequence frees its row.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from tiny_model import build_tiny_model

from telechat2.batched import (
    PACK_SEQUENCES,
    PACK_TOKENS,
    BatchGenerator,
    Pack,
    TableRotary,
    buckets,
    pack_length,
    pack_prompts,
    packed_prefill,
)
from telechat2.generation import GenerationConfig, generate

SEQ_LENGTH = 96


@pytest.fixture(scope="module")
def model():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return build_tiny_model(seed=3, seq_length=SEQ_LENGTH)


def prompt(length: int, salt: int) -> list[int]:
    return [int(t) for t in (np.arange(length) * 37 + salt * 11) % 490 + 10]


def run_to_end(batch: BatchGenerator, outputs: dict[int, list[int]], ended: dict[int, str], emitted) -> None:
    for emission in emitted:
        if emission is None:  # a prompt read by the step: its first token comes later
            continue
        if emission.token is not None:
            outputs.setdefault(emission.seq_id, []).append(emission.token)
        if emission.finish is not None:
            ended[emission.seq_id] = emission.finish


def test_buckets_are_powers_of_two_up_to_the_maximum() -> None:
    assert buckets(1) == (1,)
    assert buckets(8) == (1, 2, 4, 8)
    assert buckets(6) == (1, 2, 4, 6)
    with pytest.raises(ValueError, match="max_batch"):
        buckets(0)


def test_pack_lengths_and_packs() -> None:
    assert [pack_length(n, 512) for n in (1, 16, 17, 33, 64, 65, 129, 161, 256, 257)] == [
        16, 16, 32, 64, 64, 96, 160, 192, 256, 512,
    ]  # fmt: skip
    assert pack_length(300, 400) == 400  # a long prompt alone: capped at seq_length
    assert pack_length(180, 96) == 192  # several prompts: each keeps its own positions, the pack may be longer
    assert pack_prompts([100, 100, 50, 10, 300, 5]) == [[0, 1, 2], [3], [4], [5]]  # <= PACK_TOKENS each
    assert PACK_TOKENS == 256
    assert pack_prompts([1] * (PACK_SEQUENCES + 1)) == [list(range(PACK_SEQUENCES)), [PACK_SEQUENCES]]
    assert pack_prompts([90, 90, 90]) == [[0, 1], [2]]  # a pack may be longer than seq_length (96 here)


def test_packed_prefill_of_prompts_of_different_lengths_equals_each_prompt_alone() -> None:
    """Prompts laid end to end must not see each other: each one's last logits and its keys/values equal its own
    PyNative prefill, the prompts longer than training_seqlen (16 here) with their own per-length NTK rotary."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    long_model = build_tiny_model(seed=5, seq_length=SEQ_LENGTH, training_seqlen=16)
    prompts = [prompt(5, 1), prompt(12, 2), prompt(20, 3), prompt(30, 4), prompt(40, 5)]
    assert pack_prompts([len(p) for p in prompts]) == [[0, 1, 2, 3, 4]]
    pack = Pack.build(prompts, SEQ_LENGTH, TableRotary(long_model).prompt)
    assert pack.ids.shape == (1, 128)  # 107 tokens, padded to a multiple of 32: longer than seq_length (96)
    logits, keys, values = packed_prefill(long_model).run(pack)
    offset = 0
    for index, ids in enumerate(prompts):
        alone, cache = long_model.forward(ms.Tensor(np.asarray([ids], np.int32)), last_only=True)
        np.testing.assert_allclose(logits.asnumpy()[index], alone.asnumpy()[0, -1], rtol=1e-5, atol=1e-5)
        for (key, value), packed_key, packed_value in zip(cache, keys, values, strict=True):
            span = slice(offset, offset + len(ids))
            np.testing.assert_allclose(packed_key.asnumpy()[:, span], key.asnumpy()[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(packed_value.asnumpy()[:, span], value.asnumpy()[0], rtol=1e-5, atol=1e-5)
        offset += len(ids)


def test_a_burst_is_prefilled_in_one_call_and_rows_stay_put_while_others_leave(model) -> None:
    """Six prompts added at one step boundary: one packed prefill; a sequence leaving mid-decode moves nobody's
    row, and one joining later takes a free row; every greedy output equals its lone `generate`."""
    requests = {
        i: (prompt(3 + 4 * i, i), GenerationConfig(max_new_tokens=6 + 2 * i, stop_token_ids=())) for i in range(6)
    }
    expected = {i: generate(model, ids, config) for i, (ids, config) in requests.items()}
    batch = BatchGenerator(model, max_batch=8, compile_prefill=True)
    outputs: dict[int, list[int]] = {}
    ended: dict[int, str] = {}
    for seq_id, (ids, config) in requests.items():
        batch.add(seq_id, ids, config)
    run_to_end(batch, outputs, ended, batch.step())
    assert batch.prefill_calls == 1 and batch.capacity == 8
    assert all(len(outputs[i]) == 2 for i in requests), "first token from the prefill, second from the step"
    rows = {seq_id: batch.sequences[seq_id].row for seq_id in batch.sequences}
    batch.remove(2)  # cancelled mid-decode
    for _ in range(3):
        run_to_end(batch, outputs, ended, batch.step())
    assert {seq_id: batch.sequences[seq_id].row for seq_id in batch.sequences} == {
        seq_id: row for seq_id, row in rows.items() if seq_id != 2
    }
    late_ids, late_config = prompt(9, 9), GenerationConfig(max_new_tokens=5, stop_token_ids=())
    batch.add(9, late_ids, late_config)
    run_to_end(batch, outputs, ended, batch.step())
    assert batch.sequences[9].row not in {row for seq_id, row in rows.items() if seq_id in batch.sequences}
    while len(batch):
        run_to_end(batch, outputs, ended, batch.step())
    assert batch.prefill_calls == 2
    for seq_id in requests:
        if seq_id != 2:
            assert outputs[seq_id] == expected[seq_id], f"sequence {seq_id}"
    assert outputs[9] == generate(model, late_ids, late_config)
    assert len(outputs[2]) == 2 and 2 not in ended


@pytest.mark.parametrize(
    ("prompt_in_step", "compile_prefill"),
    [(0, False), (32, False), (0, True)],
    ids=["prefilled", "prompts-in-step", "compiled-prefill"],
)
def test_each_sequence_gets_its_lone_output_while_others_join_and_leave(
    model, prompt_in_step: int, compile_prefill: bool
) -> None:
    greedy = GenerationConfig(max_new_tokens=12, stop_token_ids=())  # default repetition penalty 1.03 included
    requests = {
        1: (prompt(5, 1), GenerationConfig(max_new_tokens=14, stop_token_ids=())),
        2: (prompt(17, 2), GenerationConfig(max_new_tokens=6, stop_token_ids=())),
        3: (prompt(9, 3), GenerationConfig(max_new_tokens=20, repetition_penalty=1.0, stop_token_ids=())),
        4: (prompt(30, 4), greedy),
        5: (prompt(3, 5), GenerationConfig(do_sample=True, seed=7, max_new_tokens=10, stop_token_ids=())),
        6: (prompt(12, 6), GenerationConfig(max_new_tokens=9)),  # default stop token <_end> (id 2) kept
        7: (prompt(80, 7), greedy),  # budget cut by seq_length: 96 - 80 = 16 > 12
    }
    expected = {seq_id: generate(model, ids, config) for seq_id, (ids, config) in requests.items()}

    batch = BatchGenerator(model, max_batch=4, prompt_in_step=prompt_in_step, compile_prefill=compile_prefill)
    # 32: prompts 3-30 in the step; compiled: prompts padded to 16/32/64 (the 80-token one falls back past 64)
    outputs: dict[int, list[int]] = {}
    ended: dict[int, str] = {}
    joins = {0: [1, 2], 2: [3], 3: [4, 5], 8: [6, 7]}  # step index -> sequences joining before it
    waiting: list[int] = []
    capacities = set()
    for step in range(200):
        waiting += joins.get(step, [])
        while waiting and batch.has_room():
            seq_id = waiting.pop(0)
            ids, config = requests[seq_id]
            run_to_end(batch, outputs, ended, [batch.add(seq_id, ids, config)])
        if not len(batch) and not waiting and step > max(joins):
            break
        capacities.add(batch.capacity)
        run_to_end(batch, outputs, ended, batch.step())
    assert set(ended) == set(requests)
    for seq_id in requests:
        assert outputs.get(seq_id, []) == expected[seq_id], f"sequence {seq_id}"
    assert {2, 4} <= capacities, f"the batch never grew: {capacities}"
    assert len(batch) == 0 and batch.capacity == 0, "every row is free again"
    assert ended[2] == "length"


def test_removing_a_sequence_frees_its_row_for_the_next_one(model) -> None:
    config = GenerationConfig(max_new_tokens=30, stop_token_ids=())
    batch = BatchGenerator(model, max_batch=2, prompt_in_step=7)  # prompt 2 prefilled, 1 and 3 read in the step
    outputs: dict[int, list[int]] = {}
    ended: dict[int, str] = {}
    run_to_end(batch, outputs, ended, [batch.add(1, prompt(6, 1), config)])
    run_to_end(batch, outputs, ended, [batch.add(2, prompt(8, 2), config)])
    assert not batch.has_room()
    with pytest.raises(RuntimeError, match="full"):
        batch.add(3, prompt(4, 3), config)
    for _ in range(8):
        run_to_end(batch, outputs, ended, batch.step())
    batch.remove(1)  # cancelled
    assert batch.has_room() and len(batch) == 1
    run_to_end(batch, outputs, ended, [batch.add(3, prompt(4, 3), config)])
    while len(batch):
        run_to_end(batch, outputs, ended, batch.step())
    assert outputs[2] == generate(model, prompt(8, 2), config)
    assert outputs[3] == generate(model, prompt(4, 3), config)
    assert len(outputs[1]) == 3 and 1 not in ended  # 6 steps read its 6-token prompt (the 6th gives a token), 2 more


def test_warm_up_compiles_every_bucket_and_leaves_the_batch_empty(model) -> None:
    batch = BatchGenerator(model, max_batch=4, compile_prefill=True)
    # packed lengths 16, 32, 64, ... 256 (9); buckets 1, 2, 4, each a decode step and a writer call
    assert batch.warm_up() == 9 + 2 * 3
    assert len(batch) == 0 and batch.capacity == 0 and batch.prefill_calls == 0
    config = GenerationConfig(max_new_tokens=5, stop_token_ids=())
    outputs: dict[int, list[int]] = {}
    batch.add(1, prompt(7, 1), config)
    while len(batch):
        run_to_end(batch, outputs, {}, batch.step())
    assert outputs[1] == generate(model, prompt(7, 1), config)


def test_bad_prompts_are_refused_like_stream_generate(model) -> None:
    batch = BatchGenerator(model, max_batch=2)
    config = GenerationConfig(max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        batch.add(1, [], config)
    with pytest.raises(ValueError, match="vocabulary"):
        batch.add(1, [5, 600], config)
    with pytest.raises(ValueError, match="seq_length"):
        batch.add(1, prompt(SEQ_LENGTH, 1), config)
    assert len(batch) == 0 and batch.has_room()


def test_rotary_rows_come_in_per_sequence(model) -> None:
    """The step takes cos/sin per row, so a per-length rotary can replace the table lookup."""
    rotary = TableRotary(model)
    cos, sin = rotary(np.asarray([0, 5, 5, 90]))
    table = model.model.rope_cos.asnumpy()
    assert cos.shape == (4, model.architecture.head_dim) and sin.shape == cos.shape
    np.testing.assert_array_equal(cos[1], table[5])
    np.testing.assert_array_equal(cos[1], cos[2])
    calls = []

    def recording(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(positions.copy())
        return rotary(positions)

    batch = BatchGenerator(model, max_batch=2, rotary=recording)
    config = GenerationConfig(max_new_tokens=3, stop_token_ids=())
    batch.add(1, prompt(4, 1), config)
    batch.add(2, prompt(7, 2), config)
    batch.step()
    assert calls and sorted(calls[0].tolist()) == [4, 7]  # each sequence's own position (its newest token)


@pytest.mark.parametrize("compile_prefill", [False, True], ids=["pynative-prefill", "packed-prefill"])
def test_sequences_past_the_trained_length_get_their_own_ntk_rows_and_their_lone_output(compile_prefill: bool) -> None:
    """Dynamic NTK per sequence: rows past training_seqlen follow the official per-length alpha, and greedy
    batched decoding of a sequence that grows past it equals a lone `generate` (which the official model matches)."""
    from telechat2.modeling import decode_rotary

    ms.set_context(mode=ms.PYNATIVE_MODE)
    long_model = build_tiny_model(seed=5, seq_length=SEQ_LENGTH, training_seqlen=16)
    rotary = TableRotary(long_model)
    cos, sin = rotary(np.asarray([3, 15, 16, 40]))
    table = long_model.model.rope_cos.asnumpy()
    np.testing.assert_array_equal(cos[:2], table[[3, 15]])  # within the trained length: the shared table
    official_cos, official_sin = decode_rotary(np.asarray([16, 40]), long_model.architecture)
    np.testing.assert_allclose(cos[2:], official_cos, atol=1e-6)
    np.testing.assert_allclose(sin[2:], official_sin, atol=1e-6)
    assert np.abs(cos[3] - table[40]).max() > 1e-3  # past it, the shared table would be wrong

    config = GenerationConfig(max_new_tokens=20, stop_token_ids=())
    batch = BatchGenerator(long_model, max_batch=3, compile_prefill=compile_prefill)
    outputs: dict[int, list[int]] = {1: [], 2: [], 3: []}
    ended: dict[int, str] = {}
    batch.add(1, prompt(12, 1), config)
    batch.add(2, prompt(5, 2), config)
    batch.add(3, prompt(24, 3), config)  # its prompt is past training_seqlen already
    while len(batch):
        run_to_end(batch, outputs, ended, batch.step())
    assert outputs[1] == generate(long_model, prompt(12, 1), config)  # 12 -> 32 tokens: crosses 16
    assert outputs[2] == generate(long_model, prompt(5, 2), config)
    assert outputs[3] == generate(long_model, prompt(24, 3), config)
