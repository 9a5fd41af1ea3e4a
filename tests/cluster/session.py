"""The cluster for one pytest session: started on first use, stopped at the end, never left behind.

`TELECHAT_CLUSTER_KUBECONFIG=<path>` reuses a cluster that is already running (e.g. one from
`python -m tests.cluster up`) instead of starting one; it is then neither reset nor stopped.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from tests.cluster import procs
from tests.cluster.build import ensure_built, link_bin_dir
from tests.cluster.components import COMPONENTS, NODE_COMPONENTS
from tests.cluster.controlplane import DEFAULT_STATE_DIR, ClusterHandle, LocalCluster, stop_state_dir
from tests.cluster.errors import ClusterError
from tests.cluster.nodes import remove_nodes_dir

REUSE_ENV = "TELECHAT_CLUSTER_KUBECONFIG"
REAL_REUSE_ENV = "TELECHAT_REAL_CLUSTER_KUBECONFIG"  # the same for the real-node session (`up --real`)
# Each session gets `.cluster/pytest-<pid>`: a session never resets a cluster brought up by hand in .cluster/ nor
# one of another session running at the same time in the same checkout.
SESSION_DIR_PREFIX = "pytest-"


@contextmanager
def session_cluster(real_nodes: int = 0) -> Iterator[ClusterHandle]:
    """The session's cluster; with `real_nodes` its own one (`pytest-<pid>-real`) with that many real nodes."""
    binaries = ensure_built((*COMPONENTS, *NODE_COMPONENTS) if real_nodes else COMPONENTS)
    reuse = os.environ.get(REAL_REUSE_ENV if real_nodes else REUSE_ENV)
    if reuse:
        kubeconfig = Path(reuse).resolve()
        with tempfile.TemporaryDirectory(prefix="telechat-cluster-bin-") as bin_dir:
            yield ClusterHandle(kubeconfig, link_bin_dir(Path(bin_dir), binaries), kubeconfig.parent)
        return
    parent = Path(os.environ.get("TELECHAT_CLUSTER_STATE_DIR", DEFAULT_STATE_DIR))
    sweep_stale_sessions(parent)
    state_dir = parent / f"{SESSION_DIR_PREFIX}{os.getpid()}{'-real' if real_nodes else ''}"
    nodes = 1 if real_nodes else int(os.environ.get("TELECHAT_CLUSTER_NODES", "4"))
    cluster = LocalCluster(state_dir, nodes=nodes, die_with_parent=True, real_nodes=real_nodes)
    with _stopped_on_exit(cluster):
        cluster.start(binaries)
        yield cluster
    # Keep the logs for a look after a failure (the next session sweeps the directory); drop the bulky data.
    shutil.rmtree(state_dir / "etcd-data", ignore_errors=True)


def sweep_stale_sessions(parent: Path) -> int:
    """Stop and remove the clusters of earlier sessions whose pytest process is gone (killed, crashed)."""
    removed = 0
    for state_dir in sorted(parent.glob(f"{SESSION_DIR_PREFIX}*")):
        pidfile = state_dir / "pids.json"
        if pidfile.exists() and procs.owner_alive(pidfile):
            continue
        owner = state_dir.name.removeprefix(SESSION_DIR_PREFIX).removesuffix("-real")
        if not pidfile.exists() and owner.isdigit() and procs.process_start_time(int(owner)) is not None:
            continue  # a session that is still starting (no pidfile yet)
        stop_state_dir(state_dir)
        try:
            remove_nodes_dir(state_dir)  # refuses while a mount is left: rmtree must never cross one
        except ClusterError:
            continue
        shutil.rmtree(state_dir, ignore_errors=True)
        removed += 1
    return removed


@contextmanager
def _stopped_on_exit(cluster: LocalCluster) -> Iterator[None]:
    """Stop the cluster on normal exit, on an exception, at interpreter exit and on SIGTERM/SIGHUP.

    SIGINT needs nothing extra: pytest turns it into KeyboardInterrupt and still tears fixtures down. SIGKILL of
    pytest is covered by the children's parent-death signal, and a next start reaps through the pidfile.
    """
    atexit.register(cluster.stop)
    previous: dict[int, object] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        cluster.stop()
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
