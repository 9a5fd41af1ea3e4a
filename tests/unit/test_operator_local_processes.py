"""The operator's pods, run for real: the exact command, environment and rendered config the builders give the
rank pods of a telechat2-tiny job of 2 nodes x 1 device, run as two local processes on CPU (master 127.0.0.1
instead of rank 0's DNS name, the config at a local path instead of the ConfigMap mount); then the merge pod's
command merges the rank checkpoints they saved."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from telechat_operator import constants as c
from telechat_operator.builders.configmap import build_config_map
from telechat_operator.builders.pods import build_merge_pod, build_rank_pod, merged_checkpoint_path
from telechat_operator.spec import parse

QA = [("what is two plus two", "four"), ("name a colour", "blue"), ("say hello", "hello there"), ("count", "one two")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_dataset(root: Path, tokenizer_file: Path) -> Path:
    from telechat2.data import preprocess

    jsonl = root / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"input": f"<_user>{q}", "output": a}) + "\n" for q, a in QA * 8))
    preprocess(jsonl, tokenizer_file, 64, root / "data.mindrecord")
    return root / "data.mindrecord"


def local(command: list[str], config: Path, port: int) -> list[str]:
    """The pod's command with the two things only a cluster has replaced: rank 0's DNS name and the mount path."""
    out = [str(config) if arg == c.CONFIG_PATH else arg for arg in command]
    out[out.index("--master_addr") + 1] = "127.0.0.1"
    out[out.index("--master_port") + 1] = str(port)
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
    port = free_port()
    shim = other_host_shim(tmp_path)

    ranks = []
    for rank in range(spec.nodes):
        (container,) = build_rank_pod(spec, rank, attempt=1)["spec"]["containers"]
        log = (tmp_path / f"node{rank}.log").open("w")
        ranks.append(
            subprocess.Popen(
                local(container["command"], config, port),
                env=local_env(container, port, shim if rank > 0 else None),
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    codes = [process.wait(timeout=900) for process in ranks]
    worker_logs = "".join(p.read_text()[-1500:] for p in sorted((tmp_path / "out" / "msrun_log").glob("*.log")))
    node_logs = "".join((tmp_path / f"node{r}.log").read_text()[-1500:] for r in range(spec.nodes))
    assert codes == [0, 0], node_logs + worker_logs
    for rank in range(spec.nodes):
        assert list((tmp_path / "out" / "checkpoint" / f"rank_{rank}").glob("*.ckpt")), f"rank {rank} saved nothing"

    (merge,) = build_merge_pod(spec, merge_attempt=1)["spec"]["containers"]
    result = subprocess.run(
        merge["command"], env=local_env(merge, port), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    merged = Path(merged_checkpoint_path(spec))
    assert merged.is_file()
    assert "lm_head.weight" in CkptReader(merged).entries
