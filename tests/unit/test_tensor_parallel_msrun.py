"""Tensor parallelism with real processes: two msrun workers on CPU, the model split between them.

- the split network (dense GQA with kv_concat; qkv_concat with a long seq_length; MoE; a sequence past the trained
  length, whose dynamic NTK changes from one decoding step to the next) generates
  the same greedy tokens as the single-process model, with logits within 1e-4, through the prompt pass and the
  compiled static-cache decode steps (whose AllReduce / AllGather run inside `mindspore.jit`), each rank holding
  about half the parameters;
- `telechat2 predict` and `telechat2 serve` under msrun with model_parallel 2 give the text one process gives, and
  so does `telechat2 serve` with model_parallel 1 (a whole replica per rank).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mindspore as ms
import numpy as np
import psutil
import pytest
from tensor_parallel_worker import cached_decode_logits
from test_serve_cli import free_port
from tiny_model import build_tiny_model, save_tiny_checkpoint

from telechat2.cli import main
from telechat2.generation import GenerationConfig, generate
from telechat2.serve.app import create_app, serve_in_background
from telechat2.serve.engine import TeleChat2Engine
from telechat2.serve.runtime import ServeSettings
from telechat2.tensor_parallel import parameter_bytes

VENV_BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
TINY_PREDICT_YAML = Path(__file__).resolve().parents[2] / "telechat2" / "configs" / "telechat2-tiny" / "predict.yaml"
CASES = {
    "dense": {},
    "qkv_concat_ntk": {"qkv_concat": True, "extend_method": "DYNAMIC_NTK", "seq_length": 128},
    "moe": {"num_experts": 4, "num_experts_per_tok": 2},
    # prompt and answer past training_seqlen 4 with no extend_method: per-length NTK, alpha 3 -> 7 -> 15 in decoding
    "ntk_past_trained": {"training_seqlen": 4, "max_position_embedding": 4},
}
PROMPT = [1, 4, 57, 91, 230, 18, 5]


def msrun(log_dir: Path, *task: str) -> list[str]:
    """msrun with two local workers; it starts `python TASK...`, so the venv's python must come first on PATH."""
    return [
        str(VENV_BIN / "msrun"), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
        f"--log_dir={log_dir}", "--join=True", "--cluster_time_out=120", *task,
    ]  # fmt: skip


def msrun_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def worker_logs(log_dir: Path, tail: int = 3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-tail:]}" for p in sorted(log_dir.glob("*.log")))


@pytest.mark.slow
def test_two_ranks_split_the_model_and_match_the_single_device_model(tmp_path: Path) -> None:
    cases = []
    for name, overrides in CASES.items():
        _, checkpoint = save_tiny_checkpoint(tmp_path / f"{name}.ckpt", seed=5, **overrides)
        cases.append(
            {
                "name": name,
                "checkpoint": str(checkpoint),
                "overrides": overrides,
                "prompt": PROMPT,
                "max_new_tokens": 10,
            }
        )
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    logs = tmp_path / "logs"
    command = msrun(logs, str(WORKER), str(tmp_path / "cases.json"), str(tmp_path))
    result = subprocess.run(command, env=msrun_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + worker_logs(logs)

    assert np.load(tmp_path / "seed.rank0.npy") == np.load(tmp_path / "seed.rank1.npy") != 0  # one seed for all
    ms.set_context(mode=ms.PYNATIVE_MODE)
    greedy = GenerationConfig(max_new_tokens=10, repetition_penalty=1.0, stop_token_ids=())
    for name, overrides in CASES.items():
        model = build_tiny_model(5, **overrides)  # the same weights as the checkpoint, on one device
        logits = model.forward(ms.Tensor(np.asarray([PROMPT], np.int32)))[0].asnumpy()[0]
        tokens = generate(model, PROMPT, greedy)
        decode_logits = cached_decode_logits(model, PROMPT, tokens)
        whole = parameter_bytes(model)
        for rank in (0, 1):
            ranked = np.load(tmp_path / f"{name}.rank{rank}.npz")
            assert ranked["tokens"].tolist() == tokens, f"{name} rank {rank}"
            np.testing.assert_allclose(ranked["logits"], logits, atol=1e-4, rtol=0, err_msg=f"{name} rank {rank}")
            np.testing.assert_allclose(ranked["decode_logits"], decode_logits, atol=1e-4, rtol=0, err_msg=name)
            assert whole / 2 <= int(ranked["parameter_bytes"]) < 0.52 * whole, f"{name}: rank {rank} is not split"


def wait_ready(url: str, processes: list[subprocess.Popen], log_dir: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert all(p.poll() is None for p in processes), worker_logs(log_dir)
        assert time.monotonic() < deadline, "rank 0 never became ready\n" + worker_logs(log_dir)
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)


def tiny_config_file(tmp_path: Path, model_parallel: int = 2) -> tuple[Path, Path]:
    """A tiny checkpoint and a predict YAML: the packaged telechat2-tiny one with the given model_parallel."""
    _, checkpoint = save_tiny_checkpoint(tmp_path / "tiny.ckpt", seed=0)
    config = tmp_path / f"predict_tiny_mp{model_parallel}.yaml"
    config.write_text(f"base_config: [{TINY_PREDICT_YAML}]\nparallel_config:\n  model_parallel: {model_parallel}\n")
    return checkpoint, config


@pytest.mark.slow
def test_predict_under_msrun_with_model_parallel_2_prints_the_one_process_answer(
    tmp_path: Path, tiny_tokenizer_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, config = tiny_config_file(tmp_path)
    arguments = ["--load_checkpoint", str(checkpoint), "--vocab_file", str(tiny_tokenizer_file)]
    arguments += ["--predict_data", "<_start><_user>hello there<_bot>", "--max_new_tokens", "6"]
    assert main(["predict", "--config", "telechat2-tiny", *arguments]) == 0
    expected = capsys.readouterr().out.strip()
    assert expected

    logs = tmp_path / "logs"
    predict = [str(VENV_BIN / "telechat2"), "predict", "--config", str(config), "--use_parallel", "True", *arguments]
    result = subprocess.run(msrun(logs, *predict), env=msrun_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + worker_logs(logs)
    assert expected in (logs / "worker_0.log").read_text()
    assert expected not in (logs / "worker_1.log").read_text()  # rank 1 generated in step, silently


LAYOUT_LOG_LINES = {
    2: "rank 1 of 2: holding 1/2 of the model (tensor parallel)",
    1: "parallel_config.model_parallel=1 with 2 ranks: every rank holds a whole replica",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_parallel", [2, 1], ids=["tensor-parallel", "replicas"])
def test_serve_under_msrun_answers_like_one_process(
    tmp_path: Path, tiny_tokenizer_file: Path, model_parallel: int
) -> None:
    """Both layouts under real msrun (whose scheduler process also runs the command) give one process's text;
    the tensor-parallel one warms up first (`--warm-up` on every rank)."""
    checkpoint, config = tiny_config_file(tmp_path, model_parallel)
    request = {"inputs": "<_start><_user>hello there<_bot>", "parameters": {"max_new_tokens": 8}}

    settings = ServeSettings(model_name="tiny", max_seq_len=64, max_input_token_len=48, max_queue=4, api_key=None)
    one_process = create_app(
        settings, lambda: TeleChat2Engine.load("telechat2-tiny", str(checkpoint), str(tiny_tokenizer_file), 64)
    )
    with serve_in_background(one_process) as url:
        wait_ready(url, [], tmp_path)
        expected = httpx.post(f"{url}/generate", json=request, timeout=120).json()

    port, logs = free_port(), tmp_path / "logs"
    serve = [
        str(VENV_BIN / "telechat2"), "serve", "--config", str(config), "--load_checkpoint", str(checkpoint),
        "--vocab_file", str(tiny_tokenizer_file), "--host", "127.0.0.1", "--port", str(port),
        "--control-port", str(free_port()), "--max-seq-len", "64", "--max-input-token-len", "48",
        *(["--warm-up"] if model_parallel == 2 else []),  # every rank compiles the same shapes in the same order
    ]  # fmt: skip
    launcher = subprocess.Popen(
        msrun(logs, *serve), env=msrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, [launcher], logs)
        answer = httpx.post(f"{url}/generate", json=request, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["generated_text"] == expected["generated_text"]
        assert answer.json()["details"]["generated_tokens"] == expected["details"]["generated_tokens"]
        # the follower logs its job once it has finished the last step, which may be just after rank 0 answered
        deadline = time.monotonic() + 60
        rank_logs = worker_logs(logs, tail=1_000_000)
        while "tokens in lockstep with rank 0" not in rank_logs and time.monotonic() < deadline:
            time.sleep(0.5)
            rank_logs = worker_logs(logs, tail=1_000_000)
        assert LAYOUT_LOG_LINES[model_parallel] in rank_logs
        assert "job 1: " in rank_logs and "tokens in lockstep with rank 0" in rank_logs
        if model_parallel == 2:  # both ranks warmed up (their collectives lined up) before rank 0 reported ready
            for rank in (0, 1):
                assert "warm-up: " in (logs / f"worker_{rank}.log").read_text(), f"rank {rank} did not warm up"
    finally:
        stop_msrun(launcher)


def stop_msrun(launcher: subprocess.Popen) -> None:
    """End msrun and the scheduler and workers it started (each worker runs in a session of its own)."""
    processes: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(launcher.pid)
        processes = [root, *root.children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=20)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    launcher.wait(10)
