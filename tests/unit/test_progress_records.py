"""`telechat2.progress`: the per-rank records (atomic files), checkpoint steps, and rank 0's read-only endpoint."""

from __future__ import annotations

import argparse
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from telechat2.launch import LaunchOptions, start_progress_server
from telechat2.progress import (
    ProgressServer,
    checkpoint_steps,
    progress_document,
    read_records,
    record_path,
    write_record,
)


def test_records_are_replaced_atomically_and_junk_is_skipped(tmp_path: Path) -> None:
    write_record(tmp_path, 1, {"rank": 1, "step": 3})
    write_record(tmp_path, 0, {"rank": 0, "step": 2})
    write_record(tmp_path, 0, {"rank": 0, "step": 4})
    (tmp_path / "progress" / "rank_7.json").write_text("{half a reco")  # torn by someone else: skipped
    (tmp_path / "progress" / "rank_8.json").write_text('["not", "a", "record"]')
    assert read_records(tmp_path) == [{"rank": 0, "step": 4}, {"rank": 1, "step": 3}]
    assert sorted(p.name for p in (tmp_path / "progress").iterdir()) == [
        "rank_0.json",
        "rank_1.json",
        "rank_7.json",
        "rank_8.json",
    ]  # no temporary file left behind
    assert record_path(tmp_path, 0).read_text() == '{"rank":0,"step":4}'
    with pytest.raises(ValueError):  # JSON has no NaN: a bad record never replaces a good one
        write_record(tmp_path, 0, {"rank": 0, "loss": float("nan")})
    assert read_records(tmp_path)[0] == {"rank": 0, "step": 4}
    assert not list((tmp_path / "progress").glob(".*.tmp"))


def test_checkpoint_steps_count_across_epochs(tmp_path: Path) -> None:
    for name in ("telechat2_rank_0-1_4.ckpt", "telechat2_rank_0-2_2.ckpt", "meta.json", "x-1_4.ckpt.tmp"):
        (tmp_path / name).write_text("")
    assert checkpoint_steps(tmp_path, steps_per_epoch=8) == [4, 10]
    assert checkpoint_steps(tmp_path / "missing", 8) == []


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def test_the_endpoint_serves_every_ranks_record_read_only(tmp_path: Path) -> None:
    write_record(tmp_path, 0, {"rank": 0, "step": 5})
    server = ProgressServer(tmp_path, workers=2, port=0, host="127.0.0.1").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, body = get(f"{base}/progress")
        assert status == 200 and json.loads(body) == {"workers": 2, "ranks": [{"rank": 0, "step": 5}]}
        write_record(tmp_path, 1, {"rank": 1, "step": 5})
        assert json.loads(get(f"{base}/progress")[1]) == progress_document(tmp_path, 2)
        assert get(f"{base}/other")[0] == 404
        request = urllib.request.Request(f"{base}/progress", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 501  # read-only
    finally:
        server.stop()


def launch_options() -> LaunchOptions:
    return LaunchOptions(2, 1, "127.0.0.1", 8118, 0, "log", 300, 1.0)


def test_launch_serves_progress_only_when_asked_and_survives_a_taken_port(tmp_path: Path, capsys) -> None:
    assert start_progress_server(None, None, launch_options()) is None
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert start_progress_server(str(tmp_path), port, launch_options()) is None
    assert "progress endpoint not started" in capsys.readouterr().out
    server = start_progress_server(str(tmp_path), 0, launch_options())
    assert server is not None
    try:
        assert json.loads(get(f"http://127.0.0.1:{server.port}/progress")[1]) == {"workers": 2, "ranks": []}
    finally:
        server.stop()


def test_launch_parses_the_progress_options() -> None:
    from telechat2.launch import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--progress_dir", "/out", "--progress_port", "9000", "--", "true"])
    assert (args.progress_dir, args.progress_port) == ("/out", 9000)


def test_tokens_scale_counts_every_data_parallel_shard_unless_ranks_read_the_full_batch() -> None:
    from telechat2.finetune import tokens_scale

    sharded = {"use_parallel": True, "parallel": {"full_batch": False}, "parallel_config": {"data_parallel": 4}}
    assert tokens_scale(sharded) == 4
    assert tokens_scale({**sharded, "parallel": {"full_batch": True}}) == 1
    assert tokens_scale({**sharded, "use_parallel": False}) == 1
