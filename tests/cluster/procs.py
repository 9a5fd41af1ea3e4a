"""Starting and stopping the control-plane processes so that none outlives its cluster.

Each component runs in its own process group (its own session), and the pids are recorded in a pidfile in the
state dir, with each process's start time so a recycled pid is never mistaken for ours. Three layers stop them:
`stop()` (normal end), PR_SET_PDEATHSIG (the pytest process died without cleaning up) and `reap()` (a previous
run of the same state dir left something behind: killed with SIGKILL, a detached `up` never stopped...).
A pidfile can be lost or stale (an older format, two `up`s racing on one dir), so whoever stops a state dir also
looks the processes up by what they run on: `referencing()` finds them by the state-dir paths in their command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
# /proc's btime has whole seconds: a process may appear to start up to a second after its pid file was written.
PID_FILE_SLACK_SECONDS = 2.0


def _die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs this child when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19]


def _state(pid: int) -> str | None:
    """Field 3 of /proc/<pid>/stat (R, S, Z...), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def started_at(pid: int) -> float | None:
    """When the process started, in seconds since the epoch (to the clock tick), or None if it is gone."""
    ticks = process_start_time(pid)
    if ticks is None:
        return None
    boot = next(line for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime "))
    return int(boot.split()[1]) + int(ticks) / os.sysconf("SC_CLK_TCK")


def command_line(pid: int) -> list[str]:
    """The argv of a process (empty for a kernel thread, a zombie, or a process that is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


@dataclass
class ManagedProcess:
    name: str
    pid: int
    start_time: str
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        current = process_start_time(self.pid)
        if current is None or current != self.start_time:
            return False
        return _state(self.pid) not in (None, "Z")

    def exit_code(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None


def start_process(
    name: str,
    command: list[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = False,
) -> ManagedProcess:
    """Start `command` in its own session with stdout+stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        log_file.write(f"$ {' '.join(command)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,  # no threads run while starting
        )
    start_time = process_start_time(popen.pid) or ""
    return ManagedProcess(name, popen.pid, start_time, log_path, popen)


def terminate(processes: list[ManagedProcess], timeout: float = 10.0) -> None:
    """SIGTERM each process group, wait up to `timeout`, then SIGKILL whatever is left.

    A process that leads no group (the dev operator, started with `nohup ... &`) is signalled alone: its group is
    the shell's that started it.
    """
    leads_group = {process.pid: _leads_group(process.pid) for process in processes if process.alive()}
    for process in processes:
        if process.pid in leads_group:
            _signal(process.pid, signal.SIGTERM, leads_group[process.pid])
    deadline = time.monotonic() + timeout
    for process in processes:
        while process.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.alive():
            _signal(process.pid, signal.SIGKILL, leads_group.get(process.pid, True))
    for process in processes:
        if leads_group.get(process.pid, True):
            _signal(process.pid, signal.SIGKILL, True)  # children that ignored SIGTERM
        if process.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=5)
        else:
            _wait_gone(process, 5.0)


def _wait_gone(process: ManagedProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process.alive() and time.monotonic() < deadline:
        time.sleep(0.05)


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return True  # gone already: its group may still hold children


def _signal(pid: int, signum: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def write_pidfile(path: Path, processes: list[ManagedProcess]) -> None:
    """Record the processes and their owner, this process (atomically: a reader never sees half a file)."""
    records = [
        {"name": process.name, "pid": process.pid, "start_time": process.start_time, "log": str(process.log_path)}
        for process in processes
    ]
    owner = {"pid": os.getpid(), "start_time": process_start_time(os.getpid())}
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps({"owner": owner, "processes": records}, indent=2) + "\n")
    os.replace(temporary, path)


def _load_pidfile(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: it protects nothing, and ports are fresh on every start anyway
    return data if isinstance(data, dict) else {}


def read_pidfile(path: Path) -> list[ManagedProcess]:
    return [
        ManagedProcess(record["name"], int(record["pid"]), str(record["start_time"]), Path(record["log"]))
        for record in _load_pidfile(path).get("processes", [])
    ]


def owner_alive(path: Path) -> bool:
    """True while the process that wrote `path` still runs (a pytest session, or an `up` still starting)."""
    owner = _load_pidfile(path).get("owner") or {}
    pid = owner.get("pid")
    return pid is not None and process_start_time(int(pid)) == owner.get("start_time")


def remove_own_pidfile(path: Path) -> None:
    """Delete `path` if this process wrote it: a pidfile another run (re)wrote meanwhile is how `down` finds that
    run's cluster, so stopping ours must not take it away."""
    owner = _load_pidfile(path).get("owner") or {}
    if owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def reap(pidfile: Path, log: Callable[[str], None] = lambda message: None, what: str = "leftover ") -> int:
    """Stop every still-running process recorded in `pidfile`, newest first; returns how many were stopped.

    Newest first because the start order is the dependency order: stopping etcd under a running API server
    makes the API server's shutdown wait for storage that is gone.
    """
    leftovers = [process for process in reversed(read_pidfile(pidfile)) if process.alive()]
    for process in leftovers:
        log(f"stopping {what}{process.name} (pid {process.pid})")
        terminate([process])
    pidfile.unlink(missing_ok=True)
    return len(leftovers)


def recorded_in_pid_files(directory: Path) -> list[tuple[Path, ManagedProcess]]:
    """(pid file, its live process) for each plain `*.pid` file in `directory` (e.g. dev-up.sh's `operator.pid`).

    Such a file holds only a pid, so a process that started after the file was last written is someone else's
    that got a recycled pid, and is left alone (as are this process and its ancestors).
    """
    spared = _ancestors(os.getpid())
    found = []
    for pid_path in sorted(directory.glob("*.pid")):
        try:
            pid = int(pid_path.read_text().split()[0])
            written = pid_path.stat().st_mtime
        except (OSError, ValueError, IndexError):
            continue
        start = started_at(pid)
        if pid > 1 and pid not in spared and start is not None and start <= written + PID_FILE_SLACK_SECONDS:
            process = ManagedProcess(pid_path.stem, pid, process_start_time(pid) or "", pid_path)
            if process.alive():
                found.append((pid_path, process))
    return found


def referencing(paths: list[Path]) -> list[ManagedProcess]:
    """Live processes with one of `paths` (or something under it) in their command line, e.g. `--data-dir=P`.

    This process and its ancestors are skipped: the command that stops a cluster may name the same paths.
    """
    prefixes = [str(path) for path in paths]
    spared = _ancestors(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        pid = int(entry.name)
        argv = command_line(pid)
        if argv and any(_names_path(argument, prefixes) for argument in argv):
            start_time = process_start_time(pid)
            if start_time is not None and _state(pid) != "Z":
                found.append(ManagedProcess(Path(argv[0]).name, pid, start_time, Path(f"/proc/{pid}")))
    return found


def _names_path(argument: str, prefixes: list[str]) -> bool:
    """True if `argument` (`P`, `--flag=P`, `a,P`) names one of `prefixes` or a path under it."""
    for value in argument.replace("=", ",").split(","):
        if any(value == prefix or value.startswith(f"{prefix}/") for prefix in prefixes):
            return True
    return False


def _ancestors(pid: int) -> set[int]:
    chain = set()
    while pid > 0 and pid not in chain:
        chain.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return chain


def rss_kib(pid: int) -> int | None:
    """Resident set size from /proc/<pid>/status, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def tail(path: Path, lines: int = 5) -> str:
    """The last lines a component logged (not the command line we logged before it)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    logged = [line[:300] for line in text.splitlines() if line.strip() and not line.startswith("$ ")]
    return "\n".join(logged[-lines:])
