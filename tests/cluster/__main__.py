"""`python -m tests.cluster {build,images,up,down,status}`: the local cluster by hand (run from the repo root)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from tests.cluster import procs
from tests.cluster.build import ensure_built
from tests.cluster.components import COMPONENTS, NODE_COMPONENTS
from tests.cluster.controlplane import DEFAULT_STATE_DIR, LocalCluster, memory_report, running_on, stop_state_dir
from tests.cluster.errors import ClusterError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    binaries = ensure_built(_components(args), log=_log)
    for name, path in binaries.items():
        print(f"{name}: {path}")
    _log(f"build: done in {time.monotonic() - started:.1f}s")
    return 0


def _images(args: argparse.Namespace) -> int:
    from tests.cluster import images

    started = time.monotonic()
    names = args.only.split(",") if args.only else list(images.IMAGE_NAMES)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # an interrupted build still removes its scratch files
    refs = images.ensure_images(names, log=_log)
    if args.prune:
        images.prune_archives(refs, log=_log)
    for address in args.import_into or []:
        images.import_images(address, refs, snapshotter=args.snapshotter, log=_log)
    for name, ref in refs.items():
        info = images.image_info(ref)
        print(f"{name}: {ref.ref} {ref.archive} ({info['bytes'] / 2**20:.0f} MiB)")
    _log(f"images: done in {time.monotonic() - started:.1f}s")
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _components(args: argparse.Namespace) -> tuple:
    """The control plane's binaries, plus kubelet, kube-proxy and CoreDNS only when real nodes are asked for."""
    return (*COMPONENTS, *NODE_COMPONENTS) if getattr(args, "real", 0) else COMPONENTS


def _up(args: argparse.Namespace) -> int:
    binaries = ensure_built(_components(args), log=_log)
    # Detached: the components outlive this command (no parent-death signal); `down` stops them via the pidfile.
    cluster = LocalCluster(args.state_dir, nodes=args.nodes, die_with_parent=False, log=_log, real_nodes=args.real)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so an interrupted `up` still stops what it started
    cluster.start(binaries)
    real = f" and {args.real} real nodes" if args.real else ""
    nodes = f"{args.nodes} fake Ascend nodes{real}"
    _log(f"cluster up in {cluster.timings['total']:.1f}s ({nodes}); logs: {cluster.logs_dir}")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    print(f"export PATH={cluster.bin_dir}:$PATH")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = stop_state_dir(args.state_dir, _log, what="")
    _log(f"stopped {stopped} process(es)")
    return 0


def _status(args: argparse.Namespace) -> int:
    state_dir = args.state_dir.resolve()
    report = memory_report(state_dir / "pids.json")
    if not report:
        print(f"no cluster recorded in {state_dir}")
        unrecorded = running_on(state_dir)
        if unrecorded:
            print(f"yet these run on it (stop them with `down --state-dir {state_dir}`):")
            for process in unrecorded:
                print(f"{process.name:<25} pid {process.pid}")
        return 1
    total = 0
    for name, pid, rss in report:
        if rss is None:
            print(f"{name:<25} pid {pid:<8} NOT RUNNING")
        else:
            total += rss
            print(f"{name:<25} pid {pid:<8} RSS {rss / 1024:7.1f} MiB")
    print(f"{'total':<25} {'':<12} RSS {total / 1024:7.1f} MiB")
    for pid_path, process in procs.recorded_in_pid_files(state_dir):  # e.g. the dev operator (operator.pid)
        rss = procs.rss_kib(process.pid) or 0
        print(f"{process.name:<25} pid {process.pid:<8} RSS {rss / 1024:7.1f} MiB (from {pid_path.name})")
    state_file = state_dir / "cluster.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        print(f"kubeconfig: {state['kubeconfig']}")
    return 0 if all(rss is not None for _, _, rss in report) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or find cached) etcd, Kubernetes, kwok and helm binaries")
    images = commands.add_parser("images", help="build (or find cached) the base, pause, operator and runtime images")
    images.add_argument("--only", default="", help="comma-separated subset of base,pause,operator,runtime")
    images.add_argument(
        "--import", dest="import_into", action="append", metavar="SOCKET", help="also load them into this containerd"
    )
    images.add_argument("--prune", action="store_true", help="delete cached archives other than the current ones")
    images.add_argument("--snapshotter", default=None, help="containerd snapshotter for --import (default: its own)")
    up = commands.add_parser("up", help="start the cluster detached and print the KUBECONFIG to export")
    up.add_argument("--nodes", type=int, default=4, help="number of fake Ascend nodes (default 4)")
    for command in (build, up):
        command.add_argument(
            "--real",
            type=int,
            nargs="?",
            const=2,
            default=0,
            metavar="N",
            help="also N real nodes (containerd + kubelet, default 2; needs root): builds kubelet, kube-proxy, coredns",
        )
    for command in (up, commands.add_parser("down", help="stop it"), commands.add_parser("status", help="show it")):
        command.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="default: .cluster/ in the repo")
    args = parser.parse_args(argv)
    handler = {"build": _build, "images": _images, "up": _up, "down": _down, "status": _status}[args.command]
    try:
        return handler(args)
    except ClusterError as error:
        _log(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        _log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
