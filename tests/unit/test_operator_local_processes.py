"""The operator's pods, run for real: the exact command, environment and rendered config the builders give the
rank pods of a telechat2-tiny job of 2 nodes x 1 device, run as two local processes on CPU (master 127.0.0.1
instead of rank 0's DNS name, the config at a local path instead of the ConfigMap mount); then the merge pod's
command merges the rank checkpoints they saved. Meanwhile rank 0's launch wrapper serves the ranks' progress
records (`GET /progress`), which the operator's pure status function turns into `status.progress`."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from telechat_operator.common import constants as c
from telechat_operator.common.conditions import Backoff
from telechat_operator.finetune.configmap import build_config_map
from telechat_operator.finetune.pods import build_merge_pod, build_rank_pod, merged_checkpoint_path
from telechat_operator.finetune.progress import progress_status
from telechat_operator.finetune.progress_poll import fetch_json
from telechat_operator.finetune.spec import parse
from telechat_operator.finetune.status import PodView, reconcile

QA = [("what is two plus two", "four"), ("name a colour", "blue"), ("say hello", "hello there"), ("count", "one two")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_dataset(root: Path, tokenizer_file: Path) -> Path:
    from telechat2.preprocess import preprocess

    jsonl = root / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"input": f"<_user>{q}", "output": a}) + "\n" for q, a in QA * 8))
    preprocess(jsonl, tokenizer_file, 64, root / "data.mindrecord")
    return root / "data.mindrecord"


def local(command: list[str], config: Path, port: int, progress_port: int | None = None) -> list[str]:
    """The pod's command with what only a cluster has replaced: rank 0's DNS name, the mount path and (each pod
    has its own IP there) a free port for rank 0's progress endpoint."""
    out = [str(config) if arg == c.CONFIG_PATH else arg for arg in command]
    out[out.index("--master_addr") + 1] = "127.0.0.1"
    out[out.index("--master_port") + 1] = str(port)
    if "--progress_port" in out and progress_port is not None:
        out[out.index("--progress_port") + 1] = str(progress_port)
    return out


def local_env(container: dict, port: int, shim_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env", [])}}
    env[c.ENV_MASTER_ADDR], env[c.ENV_MASTER_PORT] = "127.0.0.1", str(port)
    path = [str(Path(sys.executable).parent), env.get("PATH", "")]  # the `telechat2` console script
    env["PATH"] = os.pathsep.join([str(shim_dir), *path] if shim_dir else path)
    return env


def other_host_shim(root: Path) -> Path:
    """msrun starts the scheduler on whichever host owns master_addr, which it asks `ip -j addr`. On one machine
    every "node" owns 127.0.0.1, so node 1 gets an `ip` that lists no address, as a second host's would."""
    shim = root / "other-host-bin"
    shim.mkdir()
    (shim / "ip").write_text("#!/bin/sh\necho '[]'\n")
    (shim / "ip").chmod(0o755)
    return shim


def poll_progress(url: str, processes: list[subprocess.Popen], timeout: float) -> list[dict]:
    """Every distinct document rank 0 served while the processes ran (unreachable at first: that is no error)."""
    served: list[dict] = []
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        try:
            document = fetch_json(url, 2)
        except (OSError, ValueError):
            document = None
        if document and document.get("ranks") and (not served or served[-1] != document):
            served.append(document)
        time.sleep(0.3)
    return served


def check_progress(spec, output: Path, served: list[dict]) -> None:
    """The real records, through the real endpoint, into the operator's pure status: step, loss, ETA, checkpoint."""
    from telechat2.finetune import read_loss_log
    from telechat2.progress import progress_document

    assert served, "rank 0 never served a progress document while training"
    midway = progress_status(served[0])
    assert midway is not None and 1 <= midway["step"] <= midway["totalSteps"] and midway["eta"]

    final_doc = progress_document(output, spec.world_size)  # the endpoint ends with training: the same files
    assert [r["rank"] for r in final_doc["ranks"]] == [0, 1]
    pods = [PodView(f"local-a1-rank-{r}", c.ROLE_WORKER, 1, r, "Running") for r in range(spec.nodes)]
    status = {"attempt": 1, "launchedAttempt": 1, "state": c.STATE_RUNNING, "restarts": 0}
    plan = reconcile(spec, status, pods, datetime.now(UTC), Backoff(), progress=final_doc)
    progress = plan.status["progress"]
    assert progress == progress_status(final_doc)

    # Step: every step of the one epoch ran, as MindFormers' own loss log counts them.
    logged = {rank: read_loss_log((output / "msrun_log" / f"worker_{rank}.log").read_text()) for rank in (0, 1)}
    total = logged[0][-1][0]
    assert progress["step"] == progress["totalSteps"] == total > 1, (progress, logged[0][-3:])
    # Loss: the mean of the ranks' last losses, which MindFormers logged with 6 decimals.
    assert math.isfinite(progress["loss"]) and progress["loss"] > 0
    assert abs(progress["loss"] - (logged[0][-1][1] + logged[1][-1][1]) / 2) < 1e-4
    # ETA: none left; throughput measured.
    assert (progress["eta"], progress["etaSeconds"]) == ("0s", 0)
    assert progress["tokensPerSecond"] > 0 and progress["stepSeconds"] > 0
    # Checkpoint: the newest step both ranks saved, from the files MindFormers wrote (epoch 1: <prefix>-1_<step>).
    names = [[p.name for p in (output / "checkpoint" / f"rank_{r}").glob("*.ckpt")] for r in (0, 1)]
    steps = [{int(m.group(1)) for n in rank if (m := re.search(r"-1_(\d+)\.ckpt$", n))} for rank in names]
    newest = max(steps[0] & steps[1])
    assert progress["checkpoint"] == {"step": newest, "ranks": 2}
    assert newest == total or newest % 2 == 0  # saveSteps 2


@pytest.mark.slow
def test_rank_pod_commands_train_and_the_merge_pod_command_merges(tmp_path: Path, tiny_tokenizer_file: Path) -> None:
    from telechat2.checkpoint_io import CkptReader

    body = {
        "metadata": {"name": "local", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {
            "model": "telechat2-tiny",
            "image": "unused",
            "nodes": 2,
            "devicesPerNode": 1,
            "parallel": {"dataParallel": 2, "modelParallel": 1, "pipelineStage": 1, "microBatchNum": 1},
            "dataset": {"path": str(tiny_dataset(tmp_path, tiny_tokenizer_file))},
            "output": {"path": str(tmp_path / "out")},
            "training": {"epochs": 1, "saveSteps": 2, "learningRate": 3e-3},
            "launcher": {"clusterTimeout": 120},
        },
    }
    spec = parse(body)
    config = tmp_path / "config.yaml"
    config.write_text(build_config_map(spec)["data"][c.CONFIG_KEY])
    port, progress_port = free_port(), free_port()
    shim = other_host_shim(tmp_path)

    ranks = []
    for rank in range(spec.nodes):
        (container,) = build_rank_pod(spec, rank, attempt=1)["spec"]["containers"]
        log = (tmp_path / f"node{rank}.log").open("w")
        ranks.append(
            subprocess.Popen(
                local(container["command"], config, port, progress_port),
                env=local_env(container, port, shim if rank > 0 else None),
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    # Poll rank 0's endpoint as the operator does, for as long as training runs.
    served = poll_progress(f"http://127.0.0.1:{progress_port}{c.PROGRESS_PATH}", ranks, timeout=900)
    codes = [process.wait(timeout=60) for process in ranks]
    worker_logs = "".join(p.read_text()[-1500:] for p in sorted((tmp_path / "out" / "msrun_log").glob("*.log")))
    node_logs = "".join((tmp_path / f"node{r}.log").read_text()[-1500:] for r in range(spec.nodes))
    assert codes == [0, 0], node_logs + worker_logs
    for rank in range(spec.nodes):
        assert list((tmp_path / "out" / "checkpoint" / f"rank_{rank}").glob("*.ckpt")), f"rank {rank} saved nothing"
    check_progress(spec, tmp_path / "out", served)

    (merge,) = build_merge_pod(spec, merge_attempt=1)["spec"]["containers"]
    result = subprocess.run(
        merge["command"], env=local_env(merge, port), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    merged = Path(merged_checkpoint_path(spec))
    assert merged.is_file()
    assert "lm_head.weight" in CkptReader(merged).entries
