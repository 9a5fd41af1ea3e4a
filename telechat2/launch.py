"""`telechat2 launch -- <task...>`: the pod entrypoint, a careful front for MindSpore's `msrun`.

What a pod needs that `msrun` alone does not do:
- every option from arguments or, when absent, from the environment (the operator sets env vars);
- wait until the master's host name resolves (a headless Service's DNS record appears only once the master pod
  is ready), with a deadline and an error naming the host, then pass msrun the IPv4 address (older MindSpore
  releases want an IP);
- run msrun with `--join=True` so it waits for its workers, print the exact command first, forward SIGTERM/SIGINT
  to msrun and to its workers (msrun starts each worker in a session of its own, so a signal to msrun's group
  alone would orphan them), and exit with msrun's status (128+n when ended by signal n).

| option | environment | default |
|---|---|---|
| --worker_num | TELECHAT_WORKER_NUM | --local_worker_num (one node) |
| --local_worker_num | TELECHAT_LOCAL_WORKER_NUM | 8 |
| --master_addr | TELECHAT_MASTER_ADDR | 127.0.0.1 |
| --master_port | TELECHAT_MASTER_PORT | 8118 |
| --node_rank | TELECHAT_NODE_RANK, then JOB_COMPLETION_INDEX (Kubernetes indexed Jobs) | -1 (msrun assigns) |
| --log_dir | TELECHAT_LOG_DIR | output/msrun_log |
| --cluster_time_out | TELECHAT_CLUSTER_TIMEOUT | 300 |
| --resolve-timeout | TELECHAT_RESOLVE_TIMEOUT | 300 |
| --progress_dir | (none) | unset: no progress endpoint |
| --progress_port | (none) | 8119 |

With `--progress_dir` (the training's output dir; the operator passes it to rank 0 only), the wrapper serves every
rank's progress record read-only on `GET http://<pod>:<progress_port>/progress` while msrun runs
(`telechat2.progress`); a port that cannot be bound is reported and training goes on without it.

msrun runs a task through the `python` on PATH unless the task starts with python/python3/pytest; a task starting
with `telechat2` is therefore run as `python -m telechat2.cli ...`, and this interpreter's directory is put first
on PATH when `python` there is another one.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

# option -> (environment variables in priority order, default)
OPTIONS: dict[str, tuple[tuple[str, ...], object]] = {
    "worker_num": (("TELECHAT_WORKER_NUM",), None),
    "local_worker_num": (("TELECHAT_LOCAL_WORKER_NUM",), 8),
    "master_addr": (("TELECHAT_MASTER_ADDR",), "127.0.0.1"),
    "master_port": (("TELECHAT_MASTER_PORT",), 8118),
    "node_rank": (("TELECHAT_NODE_RANK", "JOB_COMPLETION_INDEX"), -1),
    "log_dir": (("TELECHAT_LOG_DIR",), "output/msrun_log"),
    "cluster_time_out": (("TELECHAT_CLUSTER_TIMEOUT",), 300),
    "resolve_timeout": (("TELECHAT_RESOLVE_TIMEOUT",), 300.0),
}
KILL_GRACE_SECONDS = 20.0  # after forwarding a signal, how long msrun and the workers get before SIGKILL


class LaunchError(ValueError):
    """Bad launch settings or an unresolvable master; the message names the option or host."""


@dataclass(frozen=True)
class LaunchOptions:
    worker_num: int
    local_worker_num: int
    master_addr: str
    master_port: int
    node_rank: int
    log_dir: str
    cluster_time_out: int
    resolve_timeout: float


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker_num", "--worker-num", type=int, help="workers in the whole job")
    parser.add_argument("--local_worker_num", "--local-worker-num", type=int, help="workers (devices) on this node")
    parser.add_argument("--master_addr", "--master-addr", help="host name or IP of node 0 (msrun's scheduler)")
    parser.add_argument("--master_port", "--master-port", type=int, help="scheduler port")
    parser.add_argument("--node_rank", "--node-rank", type=int, help="rank of this node (-1: msrun assigns)")
    parser.add_argument("--log_dir", "--log-dir", help="directory for scheduler and worker logs")
    parser.add_argument("--cluster_time_out", "--cluster-time-out", type=int, help="seconds to build the cluster")
    parser.add_argument(
        "--resolve_timeout", "--resolve-timeout", type=float, help="seconds to wait for the master to resolve"
    )
    parser.add_argument(
        "--progress_dir", "--progress-dir", help="serve <dir>/progress/rank_*.json on GET /progress (rank 0)"
    )
    parser.add_argument("--progress_port", "--progress-port", type=int, default=None, help="port of /progress")
    parser.add_argument("--msrun", default=None, help="msrun command (default: msrun on PATH, else python -m ...)")
    parser.add_argument("task", nargs=argparse.REMAINDER, help="-- then the task each worker runs")


def resolve_options(args: argparse.Namespace, environ: Mapping[str, str]) -> LaunchOptions:
    """Arguments win over the environment, which wins over defaults; bad values name their source."""
    values: dict[str, object] = {}
    for name, (env_names, default) in OPTIONS.items():
        value = getattr(args, name, None)
        source = f"--{name}"
        if value is None:
            for env_name in env_names:
                if environ.get(env_name, "").strip():
                    value, source = environ[env_name].strip(), env_name
                    break
        if value is None:
            value = default
        kind = type(default) if default is not None else int
        try:
            values[name] = kind(value) if value is not None else None
        except ValueError:
            raise LaunchError(f"{source}={value!r} is not a valid {kind.__name__}") from None
    if values["worker_num"] is None:
        values["worker_num"] = values["local_worker_num"]
    options = LaunchOptions(**values)  # type: ignore[arg-type]
    check_options(options)
    return options


def check_options(o: LaunchOptions) -> None:
    if o.local_worker_num < 1:
        raise LaunchError(f"local_worker_num must be >= 1, got {o.local_worker_num}")
    if o.worker_num < o.local_worker_num:
        raise LaunchError(f"worker_num {o.worker_num} is smaller than local_worker_num {o.local_worker_num}")
    nodes = -(-o.worker_num // o.local_worker_num)
    if not -1 <= o.node_rank < nodes:
        raise LaunchError(f"node_rank {o.node_rank} is outside 0..{nodes - 1} ({o.worker_num} workers)")
    if not 1024 <= o.master_port <= 65535:
        raise LaunchError(f"master_port {o.master_port} must be in 1024..65535")
    if not o.master_addr:
        raise LaunchError("master_addr is empty")


def resolve_master(
    host: str,
    timeout: float,
    getaddrinfo: Callable = socket.getaddrinfo,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    interval: float = 2.0,
) -> str:
    """IPv4 address of `host`, retrying until it resolves or `timeout` seconds pass."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    deadline = clock() + timeout
    announced = False
    while True:
        try:
            infos = getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
            if infos:
                return infos[0][4][0]
            error: object = "no IPv4 address"
        except (socket.gaierror, UnicodeError) as err:
            error = err
        if clock() >= deadline:
            raise LaunchError(f"master host {host!r} did not resolve to an IPv4 address within {timeout:g} s: {error}")
        if not announced:
            print(f"telechat2 launch: waiting for master host {host!r} to resolve ({error})", flush=True)
            announced = True
        sleep(min(interval, max(0.0, deadline - clock())))


def msrun_base(explicit: str | None) -> list[str]:
    if explicit:
        return shlex.split(explicit)
    found = shutil.which("msrun")
    return [found] if found else [sys.executable, "-m", "mindspore.parallel.cluster.run"]


def normalise_task(task: list[str]) -> list[str]:
    """msrun runs non-python tasks through python; turn `telechat2 ...` into `python -m telechat2.cli ...`."""
    if task and task[0] == "--":
        task = task[1:]
    if not task:
        raise LaunchError("no task given: telechat2 launch [options] -- <command...>")
    if Path(task[0]).name == "telechat2":
        return ["python", "-m", "telechat2.cli", *task[1:]]
    return task


def build_msrun_command(msrun: list[str], options: LaunchOptions, master_ip: str, task: list[str]) -> list[str]:
    """The exact msrun command line (msrun's own flag spelling, see mindspore/parallel/cluster/run.py)."""
    return [
        *msrun,
        f"--worker_num={options.worker_num}",
        f"--local_worker_num={options.local_worker_num}",
        f"--master_addr={master_ip}",
        f"--master_port={options.master_port}",
        f"--node_rank={options.node_rank}",
        f"--log_dir={options.log_dir}",
        "--join=True",
        f"--cluster_time_out={options.cluster_time_out}",
        *task,
    ]


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """msrun starts workers with the `python` on PATH: make that this interpreter."""
    env = dict(environ)
    here = str(Path(sys.executable).parent)
    found = shutil.which("python", path=env.get("PATH"))
    if found is None or str(Path(found).parent) != here:
        env["PATH"] = here + os.pathsep + env.get("PATH", "")
    return env


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), so signals reach workers in their own sessions."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def signal_tree(pid: int, signum: int) -> set[int]:
    """Send `signum` to msrun's process group and to the group of every process below it; returns the groups."""
    groups = set()
    for member in [pid, *descendants(pid)]:
        try:
            groups.add(os.getpgid(member))
        except ProcessLookupError:
            continue
    for group in groups:
        try:
            os.killpg(group, signum)
        except (ProcessLookupError, PermissionError):
            continue
    return groups


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def run_msrun(command: list[str], env: Mapping[str, str]) -> int:
    """Run msrun in a session of its own, forward SIGTERM/SIGINT, return the exit status (128+n for signal n)."""
    process = subprocess.Popen(command, env=dict(env), start_new_session=True)
    received: list[tuple[int, float]] = []  # (signal, when)
    groups: set[int] = set()  # process groups signalled: msrun's and its workers' (they outlive msrun)

    def forward(signum: int, _frame) -> None:
        if not received:
            print(f"telechat2 launch: got signal {signum}, forwarding to msrun and its workers", flush=True)
        received.append((signum, time.monotonic()))
        groups.update(signal_tree(process.pid, signum))

    def grace_over() -> bool:
        return time.monotonic() - received[0][1] > KILL_GRACE_SECONDS

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if received and grace_over():
                    groups.update(signal_tree(process.pid, signal.SIGKILL))
        if not received:
            return 128 - code if code < 0 else code
        while any(_alive(g) for g in groups) and not grace_over():
            time.sleep(0.2)
        for group in groups:
            if _alive(group):
                os.killpg(group, signal.SIGKILL)
        return 128 + received[0][0]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(args: argparse.Namespace) -> int:
    try:
        options = resolve_options(args, os.environ)
        task = normalise_task(list(args.task))
        master_ip = resolve_master(options.master_addr, options.resolve_timeout)
    except LaunchError as err:
        print(f"telechat2 launch: error: {err}", file=sys.stderr)
        return 2
    command = build_msrun_command(msrun_base(args.msrun), options, master_ip, task)
    print(f"telechat2 launch: {shlex.join(command)}", flush=True)
    server = start_progress_server(getattr(args, "progress_dir", None), getattr(args, "progress_port", None), options)
    try:
        return run_msrun(command, child_environment(os.environ))
    finally:
        if server is not None:
            server.stop()


def start_progress_server(directory: str | None, port: int | None, options: LaunchOptions):
    """The read-only progress endpoint, or None (not asked for, or the port is taken: training matters more)."""
    if not directory:
        return None
    from telechat2.progress import DEFAULT_PORT, ProgressServer

    try:
        server = ProgressServer(directory, options.worker_num, DEFAULT_PORT if port is None else port).start()
    except OSError as err:
        print(f"telechat2 launch: progress endpoint not started: {err}", flush=True)
        return None
    print(f"telechat2 launch: serving progress on port {server.port}/progress", flush=True)
    return server
