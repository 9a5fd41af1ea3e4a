"""Pure builders for the local cluster: kubeconfigs, kwok's config, fake nodes, component command lines.

Nothing here touches processes or the network, so the unit tests can check each piece on its own.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STAGES_FILE = Path(__file__).resolve().parent / "kwok-stages.yaml"
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
NPU_RESOURCE = "huawei.com/Ascend910"
NPUS_PER_NODE = 8
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/16"
CLUSTER_NAME = "telechat-local"


@dataclass(frozen=True)
class Ports:
    """Every port the control plane listens on, all on 127.0.0.1."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def from_list(cls, ports: list[int]) -> Ports:
        return cls(*ports)


PORT_COUNT = 6


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the kernel reports free right now (all sockets held open until all are chosen)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def service_ip(service_cidr: str = SERVICE_CIDR) -> str:
    """The `kubernetes` Service's cluster IP: the first address of the service range."""
    return str(next(ipaddress.ip_network(service_cidr).hosts()))


def kubeconfig(server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str = "admin") -> dict[str, Any]:
    """A self-contained kubeconfig (certificates embedded), so it can be copied or exported as is."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }


def kwok_config_documents(stages_file: Path = STAGES_FILE) -> list[dict[str, Any]]:
    """kwok's --config: our Stage objects only (they replace every built-in default stage)."""
    stages = [doc for doc in yaml.safe_load_all(stages_file.read_text()) if doc]
    for index, stage in enumerate(stages):
        if stage.get("kind") != "Stage" or not stage.get("metadata", {}).get("name"):
            raise ValueError(f"{stages_file}: document {index + 1} is not a named kwok Stage")
    return stages


def render_yaml_documents(documents: Iterable[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(list(documents), sort_keys=False)


def fake_node_name(index: int) -> str:
    return f"ascend-node-{index}"


def fake_node(index: int, npus: int = NPUS_PER_NODE) -> dict[str, Any]:
    """A Node kwok manages: 8 Ascend 910 NPUs, generous CPU/memory, the labels the operator schedules by."""
    name = fake_node_name(index)
    resources = {"cpu": "192", "memory": "1536Gi", "pods": "110", "ephemeral-storage": "2Ti", NPU_RESOURCE: str(npus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION[0]: FAKE_NODE_ANNOTATION[1], "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "arm64",
                "type": "kwok",
                "accelerator-type": "module-910b-8",
                "host-arch": "huawei-arm",
            },
        },
        "spec": {},
        "status": {"allocatable": dict(resources), "capacity": dict(resources)},
    }


def fake_nodes(count: int) -> list[dict[str, Any]]:
    if count < 1:
        raise ValueError(f"--nodes must be at least 1, got {count}")
    return [fake_node(index) for index in range(count)]


def etcd_command(binary: Path, data_dir: Path, ports: Ports) -> list[str]:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(binary),
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        "--unsafe-no-fsync=true",  # a throwaway test cluster: durability buys nothing, fsync costs seconds
        "--quota-backend-bytes=1073741824",
        "--log-level=warn",
    ]


def apiserver_command(
    binary: Path,
    pki: Path,
    ports: Ports,
    advertise_address: str | None,
    cert_dir: Path,
    bind_address: str = "127.0.0.1",
    kubelet_by_ip: bool = False,
) -> list[str]:
    """The API server's command line; real nodes bind it to their bridge's address so pods can reach it."""
    command = [
        str(binary),
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        f"--bind-address={bind_address}",
        f"--secure-port={ports.apiserver}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--authorization-mode=Node,RBAC",
        "--allow-privileged=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'service-account.pub'}",
        f"--service-account-signing-key-file={pki / 'service-account.key'}",
        "--api-audiences=https://kubernetes.default.svc.cluster.local",
        # A request-header CA in extension-apiserver-authentication stops every client component logging, many
        # times a second, that it is missing; no front-proxy-client certificate is ever issued, so none can use it.
        f"--requestheader-client-ca-file={pki / 'ca.crt'}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        "--profiling=false",
        "--v=1",
    ]
    if kubelet_by_ip:
        # Real nodes' names resolve nowhere; their InternalIP (the bridge address) and port do.
        command.append("--kubelet-preferred-address-types=InternalIP")
    if advertise_address is not None:
        command.append(f"--advertise-address={advertise_address}")
        if ipaddress.ip_address(advertise_address).is_loopback:
            # The `kubernetes` Endpoints may not hold a loopback address; skip that reconciler rather than log errors.
            command.append("--endpoint-reconciler-type=none")
    return command


def controller_manager_command(binary: Path, pki: Path, kubeconfig_path: Path, ports: Ports) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig_path}",
        f"--authentication-kubeconfig={kubeconfig_path}",
        f"--authorization-kubeconfig={kubeconfig_path}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.controller_manager}",
        "--leader-elect=false",
        "--controllers=*",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'service-account.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--cluster-name={CLUSTER_NAME}",
        "--kube-api-qps=100",
        "--kube-api-burst=200",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_command(binary: Path, kubeconfig_path: Path, ports: Ports) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig_path}",
        f"--authentication-kubeconfig={kubeconfig_path}",
        f"--authorization-kubeconfig={kubeconfig_path}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.scheduler}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def kwok_command(binary: Path, kubeconfig_path: Path, config_path: Path, ports: Ports) -> list[str]:
    key, value = FAKE_NODE_ANNOTATION
    return [
        str(binary),
        f"--kubeconfig={kubeconfig_path}",
        f"--config={config_path}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={key}={value}",
        f"--cidr={POD_CIDR}",
        "--node-ip=10.0.0.1",
        "--node-lease-duration-seconds=40",
        f"--server-address=127.0.0.1:{ports.kwok}",
    ]


def has_default_route(route_table: str) -> bool:
    """True when /proc/net/route lists a default (destination 0.0.0.0) route."""
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 1 and fields[1] == "00000000":
            return True
    return False


def local_ipv4_addresses(fib_trie: str) -> list[str]:
    """This host's non-loopback IPv4 addresses, from /proc/net/fib_trie ("/32 host LOCAL" entries)."""
    addresses: list[str] = []
    previous = ""
    for line in fib_trie.splitlines():
        stripped = line.strip()
        if stripped == "/32 host LOCAL":
            candidate = previous.split()[-1] if previous.split() else ""
            try:
                ip = ipaddress.IPv4Address(candidate)
            except ValueError:
                pass
            else:
                if not ip.is_loopback and str(ip) not in addresses:
                    addresses.append(str(ip))
        previous = stripped
    return addresses


def choose_advertise_address(route_table: str, fib_trie: str) -> str | None:
    """None when the API server can pick its own address (a default route exists); else a local non-loopback IP."""
    if has_default_route(route_table):
        return None
    addresses = local_ipv4_addresses(fib_trie)
    return addresses[0] if addresses else "127.0.0.1"
