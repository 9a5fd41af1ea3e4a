"""Checkpoint merge on shards MindSpore itself cut, with strategy files in MindSpore's protobuf format.

Semi-auto parallel compilation (which writes strategy files during training) needs Ascend/GPU, so the strategy
files here are built from MindSpore's own pieces: layouts computed by `mindspore.parallel.Layout`, stored in
`mindspore.train.node_strategy_pb2.ParallelStrategyMap` and serialized by protobuf, one file per rank as a training
run writes them. The shards are then cut from a full checkpoint by `mindspore.transform_checkpoints` (full ->
strategy), so the merge is tested on MindSpore's real shard format and must give back the original bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from telechat2 import cli
from telechat2.checkpoint_io import CheckpointError, CkptReader, CkptWriter
from telechat2.manifest import write_manifest
from telechat2.merge import merge
from telechat2.weights import ms_shapes
from tests.unit.tiny_model import tiny_config

COLUMN_PARALLEL = ("embedding_weight", "wq.weight", "wk_v.weight", "w1.weight", "w3.weight", "lm_head.weight")
ROW_PARALLEL = ("wo.weight", "w2.weight")


def tensor_parallel_layouts(shapes: dict[str, tuple[int, ...]], device_matrix: tuple[int, ...], aliases) -> dict:
    """Megatron-style layouts for TeleChat2 parameters, computed by mindspore.parallel.Layout."""
    from mindspore.parallel import Layout

    layout = Layout(device_matrix, aliases)
    out = {}
    for name in shapes:
        if name.endswith(COLUMN_PARALLEL):
            out[name] = layout("mp", "None")
        elif name.endswith(ROW_PARALLEL):
            out[name] = layout("None", "mp")
        else:
            out[name] = layout(*(["None"] * len(shapes[name])))
    return out


def write_strategy_file(path: Path, stage: int, layouts: dict) -> None:
    """A strategy file as training writes it: ParallelStrategyMap with one layout item per parameter."""
    from mindspore.train import node_strategy_pb2

    strategy = node_strategy_pb2.ParallelStrategyMap()
    strategy.current_stage = stage
    item = strategy.parallel_strategy_item.add()
    item.node_name = "Default/network-TeleChat2ForCausalLM/MatMul-op0"
    item.parallel_strategys.stage = stage
    item.parallel_strategys.parallel_strategy.add().dim.extend([1, 2])
    for name, layout in layouts.items():
        described = layout.to_dict()
        entry = strategy.parallel_layout_item.add()
        entry.param_name = name
        entry.parallel_layouts.dev_matrix.add().dim.extend(described["device_matrix"])
        entry.parallel_layouts.tensor_map.add().dim.extend(described["tensor_map"])
        entry.parallel_layouts.param_split_shape.add()
        entry.parallel_layouts.indices_offset.add()
        entry.parallel_layouts.field = 0
        entry.parallel_layouts.opt_weight_shard_step = 0
        entry.parallel_layouts.opt_weight_shard_size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(strategy.SerializeToString())


def write_full_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    tensors["global_step"] = np.array([42], np.int32)  # training state that no strategy describes
    with CkptWriter(path) as writer:
        for name, value in tensors.items():
            writer.write(name, value.shape, value.dtype, [value])
    return tensors


def make_sharded_run(root: Path, pipeline: bool, shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """output/strategy/ckpt_strategy_rank_N.ckpt and output/checkpoint/rank_N/*.ckpt of a 4-device run:
    data 2 x model 2, or (pipeline) 2 stages x model 2. Returns the full tensors."""
    import mindspore as ms

    shapes = shapes or ms_shapes(tiny_config())
    full = write_full_checkpoint(root / "full" / "rank_0" / "full.ckpt", shapes)
    names = list(shapes)
    if pipeline:  # stage 0: embedding and layer 0; stage 1: layer 1, final norm, head
        stage_of = {n: 1 if n.startswith(("model.layers.1.", "model.norm_out", "lm_head")) else 0 for n in names}
        for rank in range(4):
            stage = rank // 2
            stage_names = [n for n in names if stage_of[n] == stage]
            layouts = tensor_parallel_layouts({n: shapes[n] for n in stage_names}, (2,), ("mp",))
            write_strategy_file(root / "output" / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt", stage, layouts)
    else:
        layouts = tensor_parallel_layouts(shapes, (2, 2), ("dp", "mp"))
        for rank in range(4):
            write_strategy_file(root / "output" / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt", 0, layouts)
    ms.merge_pipeline_strategys(str(root / "output" / "strategy"), str(root / "merged_strategy.ckpt"))
    ms.transform_checkpoints(
        str(root / "full"),
        str(root / "output" / "checkpoint"),
        "telechat_rank_",
        None,
        str(root / "merged_strategy.ckpt"),
    )
    return full


def tree_hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tp")
    return root, make_sharded_run(root, pipeline=False)


def assert_equals_full(merged_file: Path, full: dict[str, np.ndarray]) -> None:
    reader = CkptReader(merged_file)
    assert set(reader.entries) == set(full)
    for name, value in full.items():
        assert reader.read(name).tobytes() == value.tobytes(), name


@pytest.mark.parametrize("engine", ["stream", "transform"])
def test_merges_tensor_parallel_shards_bit_exactly(tp_run, tmp_path, engine):
    root, full = tp_run
    shard = CkptReader(next((root / "output" / "checkpoint" / "rank_1").glob("*.ckpt")))
    assert shard.entries["model.layers.0.attention.wq.weight"].shape == (32, 64)  # really cut by mp=2
    before = tree_hashes(root / "output")
    strategy = root / "output" / "strategy"
    summary = merge(root / "output" / "checkpoint", tmp_path / "merged", "telechat_tiny", strategy, engine)
    assert ("merge_sliced_parameter" if engine == "stream" else "transform_checkpoints") in summary["mode"]
    assert summary["path"] == str(tmp_path / "merged" / "rank_0" / "telechat_tiny0.ckpt")
    assert_equals_full(Path(summary["path"]), full)
    assert tree_hashes(root / "output") == before
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


@pytest.mark.parametrize("engine", ["auto", "transform"])
def test_merges_pipeline_stages(tmp_path, engine):
    full = make_sharded_run(tmp_path, pipeline=True)
    rank3 = CkptReader(next((tmp_path / "output" / "checkpoint" / "rank_3").glob("*.ckpt")))
    assert "model.layers.0.attention.wq.weight" not in rank3.entries  # stage 1 holds layer 1 only
    output = tmp_path / "output"
    code = cli.main(
        [
            *("merge", "--src_ckpt_strategy", str(output / "strategy"), "--src-ckpt-dir", str(output / "checkpoint")),
            *("--dst_ckpt_dir", str(tmp_path / "m"), "--prefix", "telechat_tiny", "--engine", engine),
        ]
    )
    assert code == 0
    assert_equals_full(tmp_path / "m" / "rank_0" / "telechat_tiny0.ckpt", full)


def copy_run(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root / "output", tmp_path / "output", symlinks=False)
    return tmp_path / "output"


def assert_fails(output: Path, dst: Path, pattern: str, strategy: Path | None = None) -> None:
    before = tree_hashes(output)
    with pytest.raises(CheckpointError, match=pattern):
        merge(output / "checkpoint", dst, "x", strategy if strategy is not None else output / "strategy")
    assert not dst.exists() and not list(dst.parent.glob(f".{dst.name}.partial-*"))
    assert tree_hashes(output) == before


def test_missing_rank_is_named(tp_run, tmp_path):
    output = copy_run(tp_run[0], tmp_path)
    shutil.rmtree(output / "checkpoint" / "rank_3")
    assert_fails(output, tmp_path / "dst", r"describes 4 ranks; missing rank\(s\) rank_3")


def test_strategy_that_does_not_match_is_named(tp_run, tmp_path):
    output = copy_run(tp_run[0], tmp_path)
    bigger = ms_shapes(tiny_config(num_layers=3))  # the strategy of a 3-layer model
    layouts = tensor_parallel_layouts(bigger, (2, 2), ("dp", "mp"))
    write_strategy_file(tmp_path / "other" / "strategy.ckpt", 0, layouts)
    assert_fails(
        output,
        tmp_path / "dst",
        r"strategy names model.layers.2.attention_norm.weight \(stage 0\) but rank_0 lacks it",
        strategy=tmp_path / "other",
    )
    eight = tensor_parallel_layouts(ms_shapes(tiny_config()), (4, 2), ("dp", "mp"))
    write_strategy_file(tmp_path / "eight" / "strategy.ckpt", 0, eight)
    assert_fails(output, tmp_path / "dst", r"describes 8 ranks; missing rank\(s\) rank_4", strategy=tmp_path / "eight")


def test_corrupt_shard_is_named(tp_run, tmp_path):
    output = copy_run(tp_run[0], tmp_path)
    shard = next((output / "checkpoint" / "rank_1").glob("*.ckpt"))
    data = shard.read_bytes()
    shard.chmod(0o644)
    shard.write_bytes(data[: len(data) - 100])
    assert_fails(output, tmp_path / "dst", r"corrupt checkpoint .*rank_1/.*\.ckpt: truncated")


def write_replica(path: Path, tensors: dict[str, np.ndarray]) -> None:
    with CkptWriter(path) as writer:
        for name, value in tensors.items():
            writer.write(name, value.shape, value.dtype, [value])


def test_data_parallel_replicas_take_the_newest_common_step(tmp_path):
    rng = np.random.default_rng(1)
    shapes = ms_shapes(tiny_config())
    weights = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}
    newer = {n: v + 1 for n, v in weights.items()}
    src = tmp_path / "checkpoint"
    for rank in (0, 1):
        write_replica(src / f"rank_{rank}" / f"telechat_rank_{rank}-1_5.ckpt", weights)
        write_replica(src / f"rank_{rank}" / f"telechat_rank_{rank}-1_10.ckpt", newer)
    write_replica(src / "rank_0" / "telechat_rank_0-2_15.ckpt", weights)  # rank 1 died before saving step 15
    summary = merge(src, tmp_path / "dp", "telechat_tiny")
    assert summary["sources"][1].endswith("telechat_rank_1-1_10.ckpt")  # not lexicographic, not step 15
    reader = CkptReader(tmp_path / "dp" / "rank_0" / "telechat_tiny0.ckpt")
    assert all(reader.read(n).tobytes() == v.tobytes() for n, v in newer.items())


def test_data_parallel_replicas_must_agree(tmp_path):
    shapes = ms_shapes(tiny_config())
    weights = {n: np.ones(s, np.float32) for n, s in shapes.items()}
    write_replica(tmp_path / "src" / "rank_0" / "a.ckpt", weights)
    write_replica(tmp_path / "src" / "rank_1" / "a.ckpt", weights | {"lm_head.weight": np.zeros((512, 64), np.float32)})
    with pytest.raises(CheckpointError, match="lm_head.weight differs between rank_0 and rank_1"):
        merge(tmp_path / "src", tmp_path / "dst", "x")
    write_replica(tmp_path / "src2" / "rank_0" / "a.ckpt", weights)
    write_replica(tmp_path / "src2" / "rank_2" / "a.ckpt", weights)
    assert cli.main(["merge", "--src_ckpt_dir", str(tmp_path / "src2"), "--dst_ckpt_dir", str(tmp_path / "d")]) == 1
    assert not (tmp_path / "d").exists()
    with pytest.raises(CheckpointError, match=r"missing rank\(s\) rank_1"):
        merge(tmp_path / "src2", tmp_path / "dst", "x")


def test_non_finite_values_fail_verification(tmp_path):
    shapes = ms_shapes(tiny_config())
    weights = {n: np.ones(s, np.float32) for n, s in shapes.items()}
    weights["model.norm_out.weight"][3] = np.nan
    write_replica(tmp_path / "src" / "rank_0" / "a.ckpt", weights)
    with pytest.raises(CheckpointError, match="model.norm_out.weight has non-finite values"):
        merge(tmp_path / "src", tmp_path / "dst", "x")
    assert not (tmp_path / "dst").exists()


def test_bfloat16_shards_merge_exactly(tmp_path):
    import mindspore as ms

    from telechat2.checkpoint_io import numpy_dtype

    shapes = {"model.layers.0.attention.wq.weight": (64, 64), "model.layers.0.attention.wo.weight": (64, 64)}
    rng = np.random.default_rng(3)
    full = {n: rng.standard_normal(s, dtype=np.float32).astype(numpy_dtype("bfloat16")) for n, s in shapes.items()}
    write_replica(tmp_path / "full" / "rank_0" / "full.ckpt", full)
    write_strategy_file(tmp_path / "strategy" / "s.ckpt", 0, tensor_parallel_layouts(shapes, (2,), ("mp",)))
    ms.transform_checkpoints(
        str(tmp_path / "full"), str(tmp_path / "shards"), "s", None, str(tmp_path / "strategy" / "s.ckpt")
    )
    summary = merge(tmp_path / "shards", tmp_path / "merged", "m", tmp_path / "strategy")
    reader = CkptReader(summary["path"])
    for name, value in full.items():
        assert reader.entries[name].tensor_type == "BFloat16"
        assert reader.read(name).tobytes() == value.tobytes()


# --- shard integrity: checksum manifests and replica comparison ----------------------------------------------------


def flip_payload_byte(path: Path, tensor: str) -> None:
    """Flip one bit in the middle of a tensor's bytes (its payload, not the protobuf framing), keeping the file's
    size and modification time, as silent on-disk corruption would."""
    entry = CkptReader(path).entries[tensor]
    offset, length = entry.slices[0]
    stat = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def shard_files(output: Path) -> list[Path]:
    return sorted((output / "checkpoint").glob("rank_*/*.ckpt"))


def test_flipped_payload_byte_fails_against_the_manifest_naming_the_file(tp_run, tmp_path):
    output = copy_run(tp_run[0], tmp_path)
    for shard in shard_files(output):
        write_manifest(shard)
    shard = next((output / "checkpoint" / "rank_2").glob("*.ckpt"))
    flip_payload_byte(shard, "model.layers.1.feed_forward.w2.weight")
    assert CkptReader(shard).entries  # the framing is intact: only the checksum can tell
    assert_fails(output, tmp_path / "dst", rf"{re.escape(str(shard))} does not match its checksum manifest .*corrupt")


def test_manifests_are_verified_and_reported(tp_run, tmp_path, capsys):
    output = copy_run(tp_run[0], tmp_path)
    for shard in shard_files(output):
        write_manifest(shard)
    summary = merge(output / "checkpoint", tmp_path / "m", "t", output / "strategy")
    assert summary["checksums_verified"] == 4 and summary["warnings"] == []
    assert_equals_full(Path(summary["path"]), tp_run[1])
    args = ["merge", "--src_ckpt_strategy", str(output / "strategy"), "--src_ckpt_dir", str(output / "checkpoint")]
    assert cli.main([*args, "--dst_ckpt_dir", str(tmp_path / "m2")]) == 0
    captured = capsys.readouterr()
    assert "4 of 4 shards matched their sha256 manifests" in captured.out
    assert "warning" not in captured.err


def test_without_manifests_a_flipped_byte_is_caught_by_the_replica(tp_run, tmp_path, capsys):
    output = copy_run(tp_run[0], tmp_path)
    # data 2 x model 2: ranks 0 and 2 hold the same slices, as do ranks 1 and 3
    rank1 = next((output / "checkpoint" / "rank_1").glob("*.ckpt"))
    rank3 = next((output / "checkpoint" / "rank_3").glob("*.ckpt"))
    name = "model.layers.0.attention.wq.weight"
    assert CkptReader(rank1).read(name).tobytes() == CkptReader(rank3).read(name).tobytes()
    flip_payload_byte(rank3, name)
    assert_fails(output, tmp_path / "dst", rf"{re.escape(name)} differs between rank_1 .* and rank_3 .*corrupt")
    args = ["merge", "--src_ckpt_strategy", str(output / "strategy"), "--src_ckpt_dir", str(output / "checkpoint")]
    assert cli.main([*args, "--dst_ckpt_dir", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "differs between rank_1" in err and not (tmp_path / "m").exists()


def test_without_manifests_merge_warns(tp_run, tmp_path, capsys):
    output = copy_run(tp_run[0], tmp_path)
    write_manifest(next((output / "checkpoint" / "rank_0").glob("*.ckpt")))
    summary = merge(output / "checkpoint", tmp_path / "m", "t", output / "strategy")
    assert summary["checksums_verified"] == 1
    assert summary["warnings"] == [
        "no checksum manifest (.ckpt.sha256) for rank_1, rank_2, rank_3: a corrupted byte in those shards is caught "
        "only where another rank holds a replica of the same data"
    ]


def test_replica_groups_follow_the_device_matrix(tp_run):
    from telechat2.merge import merge_strategy_files, read_layouts, replica_groups

    root = tp_run[0]
    work = root / "groups"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    layouts = read_layouts(merge_strategy_files(root / "output" / "strategy", work))
    column = layouts["model.layers.0.attention.wq.weight"][0]
    assert replica_groups(column, range(4)) == [[0, 2], [1, 3]]
    replicated = layouts["model.norm_out.weight"][0]
    assert replica_groups(replicated, range(4)) == [[0, 1, 2, 3]]
    shutil.rmtree(work)


def test_data_parallel_flipped_byte_is_caught_with_or_without_manifests(tmp_path):
    shapes = ms_shapes(tiny_config())
    rng = np.random.default_rng(5)
    weights = {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}
    for rank in (0, 1):
        write_replica(tmp_path / "src" / f"rank_{rank}" / "a-1_1.ckpt", weights)
    shard = tmp_path / "src" / "rank_1" / "a-1_1.ckpt"
    flip_payload_byte(shard, "model.layers.1.attention.wo.weight")
    with pytest.raises(CheckpointError, match=r"model.layers.1.attention.wo.weight differs .* corrupt"):
        merge(tmp_path / "src", tmp_path / "dst", "x")
    for rank in (0, 1):
        write_manifest(tmp_path / "src" / f"rank_{rank}" / "a-1_1.ckpt")
    (tmp_path / "src" / "rank_1" / "a-1_1.ckpt.sha256").write_text(
        (tmp_path / "src" / "rank_0" / "a-1_1.ckpt.sha256").read_text()  # the digest of the intact copy
    )
    with pytest.raises(CheckpointError, match=r"rank_1/a-1_1.ckpt does not match its checksum manifest"):
        merge(tmp_path / "src", tmp_path / "dst", "x")
    assert not (tmp_path / "dst").exists()


def test_malformed_manifest_is_named(tmp_path):
    shapes = ms_shapes(tiny_config())
    write_replica(tmp_path / "src" / "rank_0" / "a.ckpt", {n: np.ones(s, np.float32) for n, s in shapes.items()})
    (tmp_path / "src" / "rank_0" / "a.ckpt.sha256").write_text("not a digest\n")
    with pytest.raises(CheckpointError, match=r"checksum manifest .*a.ckpt.sha256 is malformed"):
        merge(tmp_path / "src", tmp_path / "dst", "x")


def test_merge_copies_the_tokenizer_where_serving_looks_for_it(tmp_path, capsys):
    """`telechat2 merge --vocab_file` puts tokenizer.model beside the merged checkpoint (the default vocabFile of a
    TeleChatInference served from the finetune); a missing one is reported and the merge still succeeds."""
    shapes = ms_shapes(tiny_config())
    weights = {n: np.ones(s, np.float32) for n, s in shapes.items()}
    for rank in (0, 1):
        write_replica(tmp_path / "src" / f"rank_{rank}" / f"t_rank_{rank}-1_1.ckpt", weights)
    tokenizer = tmp_path / "base" / "tokenizer.model"
    tokenizer.parent.mkdir()
    tokenizer.write_bytes(b"sentencepiece bytes")
    args = ["merge", "--src_ckpt_dir", str(tmp_path / "src"), "--prefix", "t", "--vocab_file"]
    assert cli.main([*args, str(tokenizer), "--dst_ckpt_dir", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "rank_0" / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    assert sorted(p.name for p in (tmp_path / "merged" / "rank_0").iterdir()) == ["t0.ckpt", "tokenizer.model"]
    assert cli.main([*args, str(tmp_path / "nowhere.model"), "--dst_ckpt_dir", str(tmp_path / "m2")]) == 0
    assert "no tokenizer copied" in capsys.readouterr().err
    assert (tmp_path / "m2" / "rank_0" / "t0.ckpt").is_file()
