"""`telechat2 launch`: option resolution, master resolution, the msrun command, and real msrun runs on CPU."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from telechat2 import cli
from telechat2.launch import (
    LaunchError,
    LaunchOptions,
    build_msrun_command,
    child_environment,
    normalise_task,
    resolve_master,
    resolve_options,
)

NO_ARGS = argparse.Namespace(
    worker_num=None,
    local_worker_num=None,
    master_addr=None,
    master_port=None,
    node_rank=None,
    log_dir=None,
    cluster_time_out=None,
    resolve_timeout=None,
)


def options(**overrides) -> LaunchOptions:
    base = dict(
        worker_num=16,
        local_worker_num=8,
        master_addr="master-0.telechat",
        master_port=8118,
        node_rank=1,
        log_dir="output/msrun_log",
        cluster_time_out=300,
        resolve_timeout=60.0,
    )
    return LaunchOptions(**{**base, **overrides})


def test_build_msrun_command_is_msruns_spelling():
    command = build_msrun_command(["msrun"], options(), "10.0.0.7", ["python", "run.py", "--config", "a b.yaml"])
    assert command == [
        "msrun",
        "--worker_num=16",
        "--local_worker_num=8",
        "--master_addr=10.0.0.7",
        "--master_port=8118",
        "--node_rank=1",
        "--log_dir=output/msrun_log",
        "--join=True",
        "--cluster_time_out=300",
        "python",
        "run.py",
        "--config",
        "a b.yaml",
    ]


def test_msrun_accepts_the_command():
    """The flags parse with the installed msrun's own argument parser."""
    from mindspore.parallel.cluster import run as msrun

    command = build_msrun_command([], options(), "10.0.0.7", ["task.py", "--x", "1"])
    old_argv = sys.argv
    sys.argv = ["msrun", *command]
    try:
        parsed = msrun.get_args()
    finally:
        sys.argv = old_argv
    assert (parsed.worker_num, parsed.local_worker_num, parsed.node_rank, parsed.join) == (16, 8, 1, True)
    assert (parsed.master_addr, parsed.cluster_time_out, parsed.log_dir) == ("10.0.0.7", 300, "output/msrun_log")
    assert (parsed.task_script, parsed.task_script_args) == ("task.py", ["--x", "1"])


def test_arguments_win_over_environment_which_wins_over_defaults():
    environ = {
        "TELECHAT_WORKER_NUM": "16",
        "TELECHAT_LOCAL_WORKER_NUM": "8",
        "TELECHAT_MASTER_ADDR": "master-0.svc",
        "TELECHAT_NODE_RANK": "1",
        "TELECHAT_CLUSTER_TIMEOUT": "900",
    }
    args = argparse.Namespace(**{**vars(NO_ARGS), "master_addr": "10.1.1.1", "node_rank": 0})
    resolved = resolve_options(args, environ)
    assert resolved == options(master_addr="10.1.1.1", node_rank=0, cluster_time_out=900, resolve_timeout=300.0)
    defaults = resolve_options(NO_ARGS, {})
    assert (defaults.worker_num, defaults.local_worker_num, defaults.master_port, defaults.node_rank) == (
        8,
        8,
        8118,
        -1,
    )


def test_node_rank_falls_back_to_the_indexed_job_index():
    environ = {"TELECHAT_WORKER_NUM": "16", "TELECHAT_LOCAL_WORKER_NUM": "8", "JOB_COMPLETION_INDEX": "1"}
    assert resolve_options(NO_ARGS, environ).node_rank == 1
    assert resolve_options(NO_ARGS, {**environ, "TELECHAT_NODE_RANK": "0"}).node_rank == 0


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TELECHAT_MASTER_PORT": "http"}, "TELECHAT_MASTER_PORT='http' is not a valid int"),
        ({"TELECHAT_WORKER_NUM": "4", "TELECHAT_LOCAL_WORKER_NUM": "8"}, "worker_num 4 is smaller"),
        ({"TELECHAT_WORKER_NUM": "16", "TELECHAT_LOCAL_WORKER_NUM": "8", "TELECHAT_NODE_RANK": "2"}, "node_rank 2"),
        ({"TELECHAT_MASTER_PORT": "80"}, "master_port 80"),
    ],
)
def test_bad_settings_name_their_source(environ, message):
    with pytest.raises(LaunchError, match=message):
        resolve_options(NO_ARGS, environ)


def test_waits_for_the_master_to_resolve():
    now = [0.0]
    calls = []

    def getaddrinfo(host, *_):
        calls.append(host)
        if len(calls) < 3:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.2.3.4", 0))]

    def sleep(seconds):
        now[0] += seconds

    assert resolve_master("master-0.svc", 60, getaddrinfo, sleep, lambda: now[0]) == "10.2.3.4"
    assert calls == ["master-0.svc"] * 3 and now[0] == 4.0


def test_unresolvable_master_is_named_after_the_deadline():
    now = [0.0]

    def never(host, *_):
        raise socket.gaierror(-2, "Name or service not known")

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(LaunchError, match=r"master host 'master-0.svc' did not resolve .* within 5 s"):
        resolve_master("master-0.svc", 5, never, sleep, lambda: now[0])
    assert now[0] == 5.0


def test_real_resolution_gives_ipv4():
    assert resolve_master("localhost", 5) == "127.0.0.1"
    assert resolve_master("10.9.8.7", 0) == "10.9.8.7"


def test_task_parsing_and_telechat2_tasks():
    args = cli.build_parser(["launch", "--worker_num", "2", "--", "python", "x.py", "--flag"]).parse_args(
        ["launch", "--worker_num", "2", "--", "python", "x.py", "--flag"]
    )
    assert args.worker_num == 2 and normalise_task(args.task) == ["python", "x.py", "--flag"]
    assert normalise_task(["--", "telechat2", "finetune", "--config", "c.yaml"]) == [
        *("python", "-m", "telechat2.cli", "finetune", "--config", "c.yaml")
    ]
    with pytest.raises(LaunchError, match="no task given"):
        normalise_task(["--"])


def test_workers_get_this_interpreter_as_python():
    env = child_environment({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


# --- real msrun on CPU --------------------------------------------------------------------------------------------

TASK = textwrap.dedent(
    """
    import os, sys, time
    if os.environ.get("MS_ROLE") == "MS_SCHED":  # msrun's scheduler runs the task too; it has no work here
        sys.exit(0)
    out = sys.argv[1]
    rank = os.environ["RANK_ID"]
    with open(os.path.join(out, f"rank_{rank}"), "w") as f:
        f.write(f"{rank} {os.environ['RANK_SIZE']} {os.getpid()} {sys.executable}")
    if len(sys.argv) > 2 and sys.argv[2] == "sleep":
        time.sleep(120)
    if len(sys.argv) > 2 and sys.argv[2] == f"fail{rank}":
        sys.exit(3)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(tmp_path: Path, *task_args: str) -> list[str]:
    (tmp_path / "task.py").write_text(TASK)
    (tmp_path / "out").mkdir(exist_ok=True)
    return [
        *(sys.executable, "-m", "telechat2.cli", "launch", "--local_worker_num", "2", "--master_addr", "localhost"),
        *("--master_port", str(free_port()), "--log_dir", str(tmp_path / "logs"), "--cluster_time_out", "60", "--"),
        *(str(tmp_path / "task.py"), str(tmp_path / "out"), *task_args),
    ]


def environment_without_venv_on_path() -> dict[str, str]:
    env = dict(os.environ)
    here = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != here)
    return env


@pytest.mark.slow
def test_launch_runs_two_workers_through_msrun(tmp_path):
    result = subprocess.run(
        launch_command(tmp_path), capture_output=True, text=True, timeout=180, env=environment_without_venv_on_path()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--master_addr=127.0.0.1" in result.stdout and "--join=True" in result.stdout
    for rank in ("0", "1"):
        rank_id, size, _pid, python = (tmp_path / "out" / f"rank_{rank}").read_text().split()
        assert (rank_id, size) == (rank, "2")
        assert Path(python).parent == Path(sys.executable).parent


@pytest.mark.slow
def test_failing_worker_fails_the_launch(tmp_path):
    result = subprocess.run(launch_command(tmp_path, "fail1"), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert (tmp_path / "out" / "rank_0").exists() and (tmp_path / "out" / "rank_1").exists()


@pytest.mark.slow
def test_sigterm_reaches_the_workers_and_sets_the_exit_status(tmp_path):
    process = subprocess.Popen(launch_command(tmp_path, "sleep"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "out").iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int((tmp_path / "out" / f"rank_{r}").read_text().split()[2]) for r in (0, 1)]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(0.5)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
