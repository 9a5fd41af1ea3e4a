"""`telechat2 serve` as a command, the way a pod runs it: two ranks as msrun would start them (rank 0 serves HTTP,
rank 1 follows in lockstep), the tiny model loaded from the packaged `telechat2-tiny` config and a real checkpoint;
and a model that cannot load ending the process with an error instead of leaving a server that is never ready.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tiny_model import save_tiny_checkpoint


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_serve_in_lockstep(tmp_path: Path, tiny_tokenizer_file: Path) -> None:
    _, checkpoint = save_tiny_checkpoint(tmp_path / "tiny.ckpt", seed=0)
    port, control_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "telechat2.cli", "serve", "--config", "telechat2-tiny",
        "--load_checkpoint", str(checkpoint), "--vocab_file", str(tiny_tokenizer_file),
        "--host", "127.0.0.1", "--port", str(port), "--control-port", str(control_port),
        "--max-seq-len", "64", "--max-input-token-len", "48", "--log-level", "info",
    ]  # fmt: skip
    ranks = []
    for rank in (1, 0):
        env = {**os.environ, "RANK_SIZE": "2", "RANK_ID": str(rank), "MS_SCHED_HOST": "127.0.0.1"}
        log = (tmp_path / f"rank{rank}.log").open("w")
        ranks.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    follower, leader = ranks
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert leader.poll() is None and follower.poll() is None, (tmp_path / "rank0.log").read_text()
            assert time.monotonic() < deadline, "rank 0 never became ready"
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "telechat2-tiny"
        answer = httpx.post(
            f"{url}/generate",
            json={"inputs": "<_start><_user>hello<_bot>", "parameters": {"max_new_tokens": 4}},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        generated = answer.json()["details"]["generated_tokens"]
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(30) in (0, -signal.SIGTERM)  # uvicorn drains, then re-raises the signal it caught
        assert follower.wait(120) == 0  # rank 0 closed the channel: the follower finishes its jobs and ends
        follower_log = (tmp_path / "rank1.log").read_text()
        assert f"job 1: {generated} tokens in lockstep with rank 0" in follower_log
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_model_that_fails_to_load_ends_the_server_with_an_error(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "telechat2.cli", "serve", "--config", "telechat2-tiny"]
    command += ["--vocab_file", str(tmp_path / "missing.model"), "--host", "127.0.0.1", "--port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "tokenizer vocab_file not found" in result.stderr
