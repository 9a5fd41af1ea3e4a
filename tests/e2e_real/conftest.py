"""The real-node cluster: its own control plane with 2 real nodes (containerd + kubelet), started once per session.

Needs root (bridge, network namespaces, cgroups, mounts); tests/test.sh runs it in CI. At session end the cluster
is stopped and the host is checked for anything left behind (bridge, netns, mounts, iptables chain, processes).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ClusterHandle
from tests.cluster.waiting import wait_for

REAL_NODES = 2


def leftovers(state_dir: os.PathLike[str] | str) -> list[str]:
    """What a stopped real-node cluster must not leave on the host (empty when clean)."""
    from pathlib import Path

    from tests.cluster import nodes, procs

    state = Path(state_dir)
    found = []
    if nodes.link_exists(nodes.BRIDGE):
        found.append(f"bridge {nodes.BRIDGE}")
    found += [f"mount {path}" for path in nodes.mounts_under(state / nodes.NODES_DIR)]
    found += [f"netns {name}" for name in nodes._netns_in_cidr(nodes.DEFAULT_TOOLS, nodes.POD_CIDR)]
    chains = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True, check=False).stdout
    if nodes.FORWARD_CHAIN in chains:
        found.append(f"iptables chain {nodes.FORWARD_CHAIN}")
    nat = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True, check=False).stdout
    found += [f"iptables {line}" for line in (chains + nat).splitlines() if "KUBE-" in line]
    found += [f"process {p.name} ({p.pid})" for p in procs.referencing([state / nodes.NODES_DIR])]
    return found


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[ClusterHandle]:
    if os.geteuid() != 0:
        pytest.skip("real nodes need root (bridge, network namespaces, cgroups); CI runs these as root")
    from tests.cluster.session import session_cluster

    with session_cluster(real_nodes=REAL_NODES) as handle:
        state_dir = handle.state_dir
        yield handle
    if os.environ.get("TELECHAT_REAL_CLUSTER_KUBECONFIG"):
        return  # a reused cluster is not ours to stop
    left = leftovers(state_dir)
    assert not left, f"the stopped real-node cluster left behind: {', '.join(left)}"


@pytest.fixture
def real_namespace(real_cluster: ClusterHandle) -> Iterator[str]:
    name = f"real-{uuid.uuid4().hex[:8]}"
    real_cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: real_cluster.kubectl("get", "serviceaccount", "default", f"--namespace={name}", check=False).returncode
        == 0,
        f"the default ServiceAccount in namespace {name}",
    )
    yield name
    real_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
