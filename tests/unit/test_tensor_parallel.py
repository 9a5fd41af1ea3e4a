"""Tensor-parallel slicing rules (pure numpy) and the serving layout choice; the real multi-process runs are in
test_tensor_parallel_msrun.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_model import save_tiny_checkpoint, tiny_config

from telechat2 import loading, msrun
from telechat2 import tensor_parallel as tp
from telechat2.checkpoint_io import CkptReader, CkptWriter
from telechat2.cli import main
from telechat2.weights import ms_shapes

CONFIGS = {
    "kv_concat, GQA": tiny_config(),
    "qkv_concat": tiny_config(qkv_concat=True),
    "MoE": tiny_config(num_experts=4, num_experts_per_tok=2),
    "4 KV heads, vocab 510 (replicated head)": tiny_config(n_kv_heads=4, vocab_size=510),
}


def full_tensors(config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in ms_shapes(config, config.qkv_concat).items()
    }


def unshard(parts: list[np.ndarray], shard: tp.Shard) -> np.ndarray:
    """Inverse of take_shard over all ranks: per segment, the ranks' pieces in rank order."""
    if shard.axis is None:
        return parts[0]
    size = len(parts)
    segments = []
    offset = 0
    for length in shard.segments:
        part = length // size
        segments += [np.take(p, range(offset, offset + part), axis=shard.axis) for p in parts]
        offset += part
    return np.concatenate(segments, axis=shard.axis)


@pytest.mark.parametrize(
    ("name", "size"), [(name, 2) for name in CONFIGS] + [("4 KV heads, vocab 510 (replicated head)", 4)]
)
def test_rank_slices_put_back_together_give_the_full_tensors(name: str, size: int) -> None:
    config = CONFIGS[name]
    split = 0
    for tensor_name, full in full_tensors(config).items():
        shard = tp.shard_of(tensor_name, full.shape, config, size)
        parts = [tp.take_shard(full, shard, rank, size) for rank in range(size)]
        assert all(p.shape == tp.local_shape(full.shape, shard, size) for p in parts), tensor_name
        np.testing.assert_array_equal(unshard(parts, shard), full, err_msg=tensor_name)
        if shard.axis is not None:
            split += 1
            assert not np.array_equal(parts[0], parts[1]), tensor_name
    assert split >= 4 * config.num_layers  # every layer's projections are split, not replicated


def test_a_rank_holds_whole_kv_heads_of_the_interleaved_wk_v() -> None:
    config = tiny_config(n_kv_heads=4, num_heads=8, hidden_size=64)  # head_dim 8
    heads, dim = config.n_kv_heads, config.head_dim
    keys = [np.full((dim, 3), 10 * h + 1, np.float32) for h in range(heads)]  # K_h rows hold 10h+1
    values = [np.full((dim, 3), 10 * h + 2, np.float32) for h in range(heads)]  # V_h rows hold 10h+2
    wk_v = np.concatenate([block for h in range(heads) for block in (keys[h], values[h])])  # [K0, V0, K1, V1, ...]
    shard = tp.shard_of("model.layers.0.attention.wk_v.weight", wk_v.shape, config, 2)
    for rank in range(2):
        local = tp.take_shard(wk_v, shard, rank, 2).reshape(heads // 2, 2 * dim, 3)  # as the attention splits it
        local_heads = range(rank * heads // 2, (rank + 1) * heads // 2)
        np.testing.assert_array_equal(local[:, :dim], np.stack([keys[h] for h in local_heads]))
        np.testing.assert_array_equal(local[:, dim:], np.stack([values[h] for h in local_heads]))


def test_w_qkv_and_w_gate_hidden_slices_equal_the_kv_concat_slices_rearranged() -> None:
    """A rank's w_qkv is [its Q rows; its K heads; its V heads], built from the same rank's wq / wk_v slices."""
    config = tiny_config()
    size, dim, kv_heads = 2, config.head_dim, config.n_kv_heads
    full = full_tensors(config)
    wq, wk_v = full["model.layers.0.attention.wq.weight"], full["model.layers.0.attention.wk_v.weight"]
    pairs = wk_v.reshape(kv_heads, 2 * dim, -1)
    w_qkv = np.concatenate([wq, pairs[:, :dim].reshape(-1, wq.shape[1]), pairs[:, dim:].reshape(-1, wq.shape[1])])
    w1, w3 = full["model.layers.0.feed_forward.w1.weight"], full["model.layers.0.feed_forward.w3.weight"]
    fused = tiny_config(qkv_concat=True)
    for rank in range(size):

        def local(name: str, tensor: np.ndarray, cfg=config) -> np.ndarray:
            return tp.take_shard(tensor, tp.shard_of(name, tensor.shape, cfg, size), rank, size)  # noqa: B023

        q = local("model.layers.0.attention.wq.weight", wq)
        kv = local("model.layers.0.attention.wk_v.weight", wk_v).reshape(kv_heads // size, 2 * dim, -1)
        expected = np.concatenate([q, kv[:, :dim].reshape(-1, q.shape[1]), kv[:, dim:].reshape(-1, q.shape[1])])
        np.testing.assert_array_equal(local("model.layers.0.attention.w_qkv.weight", w_qkv, fused), expected)
        gate_up = local("model.layers.0.feed_forward.w_gate_hidden.weight", np.concatenate([w1, w3]), fused)
        expected = np.concatenate(
            [local("model.layers.0.feed_forward.w1.weight", w1), local("model.layers.0.feed_forward.w3.weight", w3)]
        )
        np.testing.assert_array_equal(gate_up, expected)


@pytest.mark.parametrize("name", ["kv_concat, GQA", "qkv_concat", "MoE"])
def test_reading_a_rank_slice_from_a_ckpt_equals_slicing_the_full_tensor(tmp_path: Path, name: str) -> None:
    config = CONFIGS[name]
    tensors = full_tensors(config, seed=1)
    path = tmp_path / "full.ckpt"
    with CkptWriter(path, slice_bytes=4096) as writer:  # small slices: reads cross slice boundaries
        for tensor_name, array in tensors.items():
            writer.write(tensor_name, array.shape, array.dtype, [array])
    reader = CkptReader(path)
    for tensor_name, full in tensors.items():
        shard = tp.shard_of(tensor_name, full.shape, config, 2)
        for rank in range(2):
            np.testing.assert_array_equal(
                tp.read_shard(reader, tensor_name, shard, rank, 2),
                tp.take_shard(full, shard, rank, 2),
                err_msg=f"{tensor_name} rank {rank}",
            )


def test_models_that_do_not_split_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="n_kv_heads 2 is not divisible by model_parallel 4"):
        tp.check_divisible(tiny_config(), 4)
    with pytest.raises(ValueError, match="intermediate_size 130 is not divisible by model_parallel 4"):
        tp.check_divisible(tiny_config(n_kv_heads=4, intermediate_size=130), 4)
    tp.check_divisible(tiny_config(), 2)
    assert not tp.vocab_parallel(tiny_config(vocab_size=511), 2)  # replicated embedding and head, still allowed


def test_the_layout_follows_model_parallel_and_the_number_of_ranks() -> None:
    two = msrun.ProcessGroup(rank=0, world_size=2, leader_host="127.0.0.1")
    one = msrun.ProcessGroup(rank=0, world_size=1, leader_host="127.0.0.1")

    def config(model_parallel):
        return {"parallel_config": {"model_parallel": model_parallel}}

    assert msrun.plan_layout(config(2), two) == msrun.TENSOR_PARALLEL
    assert msrun.layout_warning(config(2), two) is None
    assert msrun.plan_layout(config(1), two) == msrun.REPLICAS
    assert "whole replica" in msrun.layout_warning(config(1), two)
    assert msrun.plan_layout(config(8), one) == msrun.SINGLE
    assert "one process runs" in msrun.layout_warning(config(8), one)
    assert msrun.plan_layout({}, one) == msrun.SINGLE
    with pytest.raises(ValueError, match=r"parallel_config.model_parallel is 4 but msrun started 2 ranks"):
        msrun.plan_layout(config(4), two)
    with pytest.raises(ValueError, match="parallel_config.model_parallel must be a positive integer"):
        msrun.plan_layout(config("two"), two)


def test_a_rank_loads_exactly_its_slices_of_the_full_checkpoint(tmp_path: Path) -> None:
    """Loading needs no communication group: rank 1 of 2 is built and filled in this process."""
    config, path = save_tiny_checkpoint(tmp_path / "full.ckpt", seed=2, num_experts=4, num_experts_per_tok=2)
    full = {name: CkptReader(path).read(name) for name in CkptReader(path).names()}
    model = loading.load_tensor_parallel_model(config, str(path), tp.TensorParallel(rank=1, size=2))
    for name, param in model.parameters_and_names():
        shard = tp.shard_of(name, full[name].shape, config, 2)
        np.testing.assert_array_equal(param.asnumpy(), tp.take_shard(full[name], shard, 1, 2), err_msg=name)
    assert tp.parameter_bytes(model) < 0.51 * sum(a.nbytes for a in full.values())


def test_a_checkpoint_that_does_not_match_is_refused_naming_the_tensors(tmp_path: Path) -> None:
    config, path = save_tiny_checkpoint(tmp_path / "full.ckpt", seed=2)
    reader = CkptReader(path)
    broken = tmp_path / "broken.ckpt"
    with CkptWriter(broken) as writer:
        for name in reader.names():
            array = reader.read(name)
            if name == "model.layers.0.attention.wo.bias":
                continue
            if name == "model.layers.1.feed_forward.w2.weight":
                array = array[:, :-2].copy()
            writer.write(name, array.shape, array.dtype, [array])
    place = tp.TensorParallel(rank=0, size=2)
    with pytest.raises(ValueError, match=r"missing: model.layers.0.attention.wo.bias.*wrong shape: model.layers.1"):
        loading.load_tensor_parallel_model(config, str(broken), place)
    with pytest.raises(ValueError, match="set model_config.qkv_concat to the checkpoint's layout"):
        loading.load_tensor_parallel_model(tiny_config(qkv_concat=True), str(path), place)
    with pytest.raises(ValueError, match="n_kv_heads 2 is not divisible by model_parallel 4"):
        loading.load_tensor_parallel_model(config, str(path), tp.TensorParallel(rank=0, size=4))


def test_predict_use_parallel_outside_msrun_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["predict", "--config", "telechat2-tiny", "--use_parallel", "True", "--predict_data", "<_start>hi"]
    assert main(argv) == 2
    assert "--use_parallel True needs several ranks: start it under msrun" in capsys.readouterr().err
