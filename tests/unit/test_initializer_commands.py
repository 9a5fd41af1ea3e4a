"""The initializer pod's commands, run for real on tiny data: `telechat2 preprocess` / `convert` with
`--skip-if-complete` and `--termination-message-path` (telechat2/completion.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from telechat2 import completion
from telechat2.cli import main
from tests.unit.test_convert import make_hf_checkpoint
from tests.unit.tiny_model import tiny_config

RECORDS = [
    {"input": "<_user>what is a model?<_bot>a network<_user>and data?", "output": "data trains it"},
    {"input": "plain question", "output": "plain answer"},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def preprocess_argv(jsonl: Path, tokenizer: Path, out: Path, log: Path) -> list[str]:
    return [
        "preprocess", "--input_dataset_file", str(jsonl), "--vocab_file_path", str(tokenizer),
        "--max_length", "64", "--output_path", str(out),
        "--skip-if-complete", "--termination-message-path", str(log),
    ]  # fmt: skip


def test_preprocess_writes_a_marker_then_skips_until_an_input_changes(tiny_tokenizer_file, tmp_path, capsys) -> None:
    jsonl = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in RECORDS])
    out, log = tmp_path / "data" / "train.mindrecord", tmp_path / "termination-log"
    assert main(preprocess_argv(jsonl, tiny_tokenizer_file, out, log)) == 0
    assert "wrote" in capsys.readouterr().out
    marker = json.loads(completion.marker_path(out).read_text())
    assert {Path(o["name"]).name for o in marker["outputs"]} == {"train.mindrecord", "train.mindrecord.db"}
    assert marker["inputs"]["settings"]["max_length"] == 64
    written = out.stat().st_mtime_ns

    assert main(preprocess_argv(jsonl, tiny_tokenizer_file, out, log)) == 0  # complete: exits at once
    assert "is complete for these inputs" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == written and not log.exists()

    write_lines(jsonl, [json.dumps(r) for r in [*RECORDS, RECORDS[0]]])  # a changed input: done again
    assert main(preprocess_argv(jsonl, tiny_tokenizer_file, out, log)) == 0
    assert "wrote" in capsys.readouterr().out

    out.with_name("train.mindrecord.db").unlink()  # an output gone: not complete any more
    assert not completion.is_complete(out, completion.describe_inputs([jsonl]))
    assert main(preprocess_argv(jsonl, tiny_tokenizer_file, out, log)) == 0
    assert "wrote" in capsys.readouterr().out


def test_preprocess_bad_line_is_named_in_the_termination_message(tiny_tokenizer_file, tmp_path) -> None:
    jsonl = write_lines(tmp_path / "train.jsonl", [json.dumps(RECORDS[0]), json.dumps(RECORDS[1]), "{broken"])
    out, log = tmp_path / "train.mindrecord", tmp_path / "termination-log"
    assert main(preprocess_argv(jsonl, tiny_tokenizer_file, out, log)) == 1
    message = log.read_text()
    assert message.startswith("telechat2 preprocess: 1 malformed line(s): line 3: invalid JSON"), message
    assert not out.exists() and not completion.marker_path(out).exists()


def test_a_stale_marker_is_removed_before_the_work_is_redone(tiny_tokenizer_file, tmp_path) -> None:
    jsonl = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in RECORDS])
    out, log = tmp_path / "train.mindrecord", tmp_path / "termination-log"
    assert main(preprocess_argv(jsonl, tiny_tokenizer_file, out, log)) == 0
    write_lines(jsonl, ["{broken"])
    assert main(preprocess_argv(jsonl, tiny_tokenizer_file, out, log)) == 1
    assert not completion.marker_path(out).exists()  # the old output no longer matches anything


def convert_argv(hf: Path, ckpt: Path, log: Path) -> list[str]:
    return [
        "convert", "--torch_path", str(hf), "--mindspore_path", str(ckpt), "--model", "telechat2-tiny",
        "--skip-if-complete", "--termination-message-path", str(log),
    ]  # fmt: skip


def test_convert_writes_a_marker_then_skips_until_the_weights_change(tmp_path, capsys) -> None:
    hf, ckpt, log = tmp_path / "hf", tmp_path / "out" / "telechat2-tiny.ckpt", tmp_path / "termination-log"
    make_hf_checkpoint(hf, tiny_config())
    assert main(convert_argv(hf, ckpt, log)) == 0
    assert "wrote" in capsys.readouterr().out and completion.marker_path(ckpt).exists()
    written = ckpt.stat().st_mtime_ns
    assert main(convert_argv(hf, ckpt, log)) == 0
    assert "is complete for these inputs" in capsys.readouterr().out and ckpt.stat().st_mtime_ns == written
    make_hf_checkpoint(hf, tiny_config(), seed=1)  # new weights, same names: converted again
    assert main(convert_argv(hf, ckpt, log)) == 0
    assert "wrote" in capsys.readouterr().out


def test_convert_missing_tensor_is_named_in_the_termination_message(tmp_path) -> None:
    from safetensors.numpy import load_file, save_file

    hf, ckpt, log = tmp_path / "hf", tmp_path / "telechat2-tiny.ckpt", tmp_path / "termination-log"
    make_hf_checkpoint(hf, tiny_config(), files=1)
    (shard,) = hf.glob("*.safetensors")
    tensors = load_file(str(shard))
    missing = sorted(tensors)[0]
    del tensors[missing]
    save_file(tensors, str(shard))
    assert main(convert_argv(hf, ckpt, log)) == 1
    message = log.read_text()
    assert message.startswith("telechat2 convert: ") and "1 missing tensor(s)" in message and missing in message
    assert not ckpt.exists() and not completion.marker_path(ckpt).exists()


def test_large_inputs_are_fingerprinted_by_their_edges_and_mtime(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(completion, "HASH_WHOLE_BYTES", 16)
    monkeypatch.setattr(completion, "HASH_EDGE_BYTES", 4)
    big = tmp_path / "big.bin"
    big.write_bytes(b"0123456789" * 10)
    first = completion.fingerprint(big)
    assert "edges_sha256" in first and first["size"] == 100
    os.utime(big, ns=(1, 1))
    assert completion.fingerprint(big) != first


def test_termination_messages_are_cut_to_what_kubernetes_keeps(tmp_path) -> None:
    log = tmp_path / "log"
    completion.write_termination_message(log, "é" * 5000)
    assert len(log.read_bytes()) <= completion.MAX_TERMINATION_MESSAGE
    completion.write_termination_message(None, "ignored")  # no path: nothing to do


@pytest.mark.parametrize("garbage", ["", "{", '{"version": 1}', '{"version": 1, "inputs": {}, "outputs": []}'])
def test_a_broken_marker_means_not_complete(tmp_path, garbage: str) -> None:
    out = tmp_path / "out"
    out.write_text("x")
    completion.marker_path(out).write_text(garbage)
    assert not completion.is_complete(out, {})


def test_the_init_pods_exact_commands_run_then_skip(tiny_tokenizer_file, tmp_path, capsys) -> None:
    """The command lines the operator builds, run here as the pod would run them (CPU, tiny data)."""
    from operator_factories import make_spec
    from telechat_operator.finetune.initializer import build_init_pod

    jsonl = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in RECORDS])
    make_hf_checkpoint(tmp_path / "hf", tiny_config())
    spec = make_spec(
        dataset={"path": str(tmp_path / "data" / "train.mindrecord"), "jsonl": str(jsonl),
                 "tokenizer": str(tiny_tokenizer_file)},
        checkpoint={"huggingface": str(tmp_path / "hf")},
        output={"path": str(tmp_path / "out")},
    )  # fmt: skip
    log = tmp_path / "termination-log"
    commands = [
        [str(log) if arg == "/dev/termination-log" else arg for arg in container["command"]]
        for container in build_init_pod(spec)["spec"]["containers"]
    ]
    for command in commands:
        assert command[0] == "telechat2" and main(command[1:]) == 0, command
    assert (tmp_path / "out" / "converted" / "telechat2-tiny.ckpt").exists()
    assert (tmp_path / "data" / "train.mindrecord").exists()
    capsys.readouterr()
    for command in commands:  # a re-created init pod: both steps are complete
        assert main(command[1:]) == 0
    assert capsys.readouterr().out.count("is complete for these inputs") == 2
    assert not log.exists()
