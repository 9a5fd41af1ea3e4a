"""`telechat2 finetune` through MindFormers' Trainer on CPU: loss falls, resume keeps the step count, and two
data-parallel workers under msrun (through `telechat2 launch`) save rank checkpoints that `telechat2 merge` merges."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from telechat2.checkpoint_io import CkptReader
from telechat2.finetune import load_yaml_config, newest_checkpoint, prepare_resume, read_loss_log

QA = [
    ("what is two plus two", "four"),
    ("name a colour", "blue is a colour"),
    ("say hello", "hello there friend"),
    ("count to three", "one two three"),
]


def write_dataset(root: Path, tokenizer_file: Path, lines: int) -> Path:
    """Chat jsonl -> MindRecord with `telechat2 preprocess` (max_length 64, two samples per packed row)."""
    from telechat2.preprocess import preprocess

    jsonl = root / "chat.jsonl"
    with jsonl.open("w") as f:
        for i in range(lines):
            question, answer = QA[i % len(QA)]
            f.write(json.dumps({"input": f"<_user>{question}", "output": answer}) + "\n")
    preprocess(jsonl, tokenizer_file, 64, root / "data.mindrecord")
    return root / "data.mindrecord"


def write_config(path: Path, dataset: Path, output_dir: Path, epochs: int, **overrides) -> Path:
    from telechat2.configs import finetune_overrides, render_config

    settings = finetune_overrides(
        dataset_path=str(dataset), output_dir=str(output_dir), epochs=epochs, learning_rate=3e-3, **overrides
    )
    path.write_text(render_config("telechat2-tiny", "finetune", settings))
    return path


def finetune(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "telechat2.cli", "finetune", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def steps_in_log(output_dir: Path, rank: int = 0) -> list[tuple[int, float]]:
    return read_loss_log((output_dir / "log" / f"rank_{rank}" / "info.log").read_text())


def test_loss_log_parsing():
    line = (
        "INFO - { Epoch:[  3/  3], step:[    2/   16], loss:[4.473785/4.48], per_step_time: 2447ms, lr: 0.0002, "
        "overflow cond: False, loss_scale: 1.0, global_norm: [1.78]"
    )
    assert read_loss_log(line) == [(34, 4.473785)]


def test_newest_checkpoint_prefers_meta_then_highest_step(tmp_path):
    rank_dir = tmp_path / "rank_0"
    rank_dir.mkdir()
    for name in ("telechat2_rank_0-1_9.ckpt", "telechat2_rank_0-1_12.ckpt", "telechat2_rank_0_1-2_3.ckpt"):
        (rank_dir / name).write_bytes(b"x")
    assert newest_checkpoint(tmp_path, 0).name == "telechat2_rank_0_1-2_3.ckpt"
    (rank_dir / "meta.json").write_text(json.dumps({"last_ckpt_file": "telechat2_rank_0-1_12.ckpt"}))
    assert newest_checkpoint(tmp_path, 0).name == "telechat2_rank_0-1_12.ckpt"
    assert newest_checkpoint(tmp_path, 1) is None


def test_config_problems_are_named(tmp_path, tiny_tokenizer_file, capsys):
    from telechat2 import cli

    config = write_config(tmp_path / "a.yaml", tmp_path / "absent.mindrecord", tmp_path / "out", 1)
    assert cli.main(["finetune", "--config", str(config)]) == 1
    assert "dataset_dir" in (err := capsys.readouterr().err) and "absent.mindrecord does not exist" in err
    dataset = write_dataset(tmp_path, tiny_tokenizer_file, 8)
    config = write_config(tmp_path / "b.yaml", dataset, tmp_path / "out", 1)
    args = cli.build_parser(["finetune"]).parse_args(["finetune", "--config", str(config), "--resume"])
    loaded = load_yaml_config(config, args)
    assert prepare_resume(loaded) is False and not loaded.resume_training  # nothing saved yet: start fresh
    (tmp_path / "out" / "checkpoint" / "rank_1").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint" / "rank_1" / "telechat2_rank_1-1_4.ckpt").write_bytes(b"x")
    assert prepare_resume(loaded) is True  # another rank saved: every rank resumes (MindFormers picks the step)
    assert loaded.load_checkpoint == str(tmp_path / "out" / "checkpoint") and loaded.resume_training
    (tmp_path / "c.yaml").write_text(config.read_text().replace("dataset_dir: ", "dataset_dir: ''  # "))
    assert cli.main(["finetune", "--config", str(tmp_path / "c.yaml")]) == 1
    assert "train_dataset.data_loader.dataset_dir is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_loss_falls_and_resume_keeps_the_step_count(tmp_path, tiny_tokenizer_file):
    dataset = write_dataset(tmp_path, tiny_tokenizer_file, 48)  # 24 rows, batch 2: 12 steps per epoch
    output = tmp_path / "out"
    finetune("--config", str(write_config(tmp_path / "e1.yaml", dataset, output, epochs=1, save_steps=6)), cwd=tmp_path)
    first = steps_in_log(output)
    assert [s for s, _ in first] == list(range(1, 13))
    saved = CkptReader(newest_checkpoint(output / "checkpoint", 0))
    assert int(saved.read("global_step")[0]) == 12

    config2 = write_config(tmp_path / "e2.yaml", dataset, output, epochs=2, save_steps=6)
    finetune("--config", str(config2), "--resume", cwd=tmp_path)
    resumed = steps_in_log(output)[len(first) :]
    assert [s for s, _ in resumed] == list(range(13, 25))  # continues at step 13, not 1
    final = CkptReader(newest_checkpoint(output / "checkpoint", 0))
    assert int(final.read("global_step")[0]) == 24
    initial_loss, final_loss = first[0][1], resumed[-1][1]
    assert final_loss < initial_loss - 1.0, (initial_loss, final_loss)
    assert abs(resumed[0][1] - first[-1][1]) < 0.5  # the resumed run starts where the first one stopped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_data_parallel_msrun_saves_rank_checkpoints_that_merge(tmp_path, tiny_tokenizer_file):
    from telechat2.configs import architecture
    from telechat2.convert import convert_hf_to_ms
    from telechat2.merge import merge
    from tests.unit.test_convert import make_hf_checkpoint

    dataset = write_dataset(tmp_path, tiny_tokenizer_file, 32)  # 16 rows: 4 steps per rank at batch 2
    # Start from converted Hugging Face weights (standard-normal: far from a fresh init, whose loss is ln 512 = 6.2).
    make_hf_checkpoint(tmp_path / "hf", architecture("telechat2-tiny"), files=1)
    convert_hf_to_ms(tmp_path / "hf", tmp_path / "start.ckpt", architecture("telechat2-tiny"))
    output = tmp_path / "out"
    config = write_config(
        tmp_path / "dp.yaml",
        dataset,
        output,
        epochs=1,
        save_steps=2,
        parallel={"data_parallel": 2},
        load_checkpoint=str(tmp_path / "start.ckpt"),
    )
    command = [
        *(
            sys.executable,
            "-m",
            "telechat2.cli",
            "launch",
            "--local_worker_num",
            "2",
            "--master_port",
            str(free_port()),
        ),
        *("--log_dir", str(tmp_path / "msrun_log"), "--cluster_time_out", "120", "--"),
        *("telechat2", "finetune", "--config", str(config)),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "msrun_log").glob("worker_*.log")))
    assert result.returncode == 0, result.stdout[-2000:] + logs
    for rank in (0, 1):
        assert newest_checkpoint(output / "checkpoint", rank) is not None, f"no checkpoint for rank {rank}"
        losses = steps_in_log(output, rank)
        assert len(losses) == 4
        assert losses[0][1] > 12, "load_checkpoint was not loaded: the first loss is a fresh model's"

    from telechat2.manifest import verify_checkpoint

    for rank in (0, 1):  # every saved checkpoint got its sha256 sidecar, and it matches
        saved = sorted((output / "checkpoint" / f"rank_{rank}").glob("*.ckpt"))
        assert saved and all(verify_checkpoint(path) for path in saved), saved
    summary = merge(output / "checkpoint", tmp_path / "merged", "telechat2_tiny")
    assert summary["checksums_verified"] == 2 and summary["warnings"] == []
    merged = CkptReader(summary["path"])
    rank1 = CkptReader(newest_checkpoint(output / "checkpoint", 1))
    for name in ("lm_head.weight", "model.layers.1.attention.wk_v.weight"):
        assert np.array_equal(merged.read(name), rank1.read(name))


def test_cpu_overflow_check_flags_non_finite_gradients():
    """The shim's replacement answers what the float-status registers would: any inf/nan in the gradients."""
    from types import SimpleNamespace

    import mindspore as ms
    from mindformers.wrapper.wrapper import MFTrainOneStepCell
    from mindspore import ops

    from telechat2.finetune import apply_cpu_shims

    apply_cpu_shims()
    cell = SimpleNamespace(hyper_map=ops.HyperMap())
    finite = (ms.Tensor(np.ones((2, 3), np.float32)), ms.Tensor(np.zeros(4, np.float32)))
    for bad in (np.inf, np.nan):
        broken = (finite[0], ms.Tensor(np.array([0, bad, 0, 0], np.float32)))
        assert bool(MFTrainOneStepCell.get_overflow_status(cell, None, broken).asnumpy())
    assert not bool(MFTrainOneStepCell.get_overflow_status(cell, None, finite).asnumpy())
