"""A real, local Kubernetes control plane with fake Ascend nodes, for tests and for trying the operator by hand.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok are built from pinned Go modules
(`tests/cluster/gomod/`) and run as plain processes on 127.0.0.1: no container engine, no downloads besides Go
modules. Entry points: `python -m tests.cluster {build,up,down,status}` and the pytest `cluster` fixture.
"""

from tests.cluster.errors import ClusterError

__all__ = ["ClusterError"]
