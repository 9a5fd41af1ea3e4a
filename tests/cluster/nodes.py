"""Real nodes beside the fake Ascend ones: containerd + kubelet per node, a CNI bridge, kube-proxy and CoreDNS.

Everything runs on this machine and stays on it: pods get addresses from `POD_CIDR` on one bridge (`BRIDGE`) that
no physical interface is attached to, a FORWARD rule drops whatever would leave the bridge, the API server binds
to the bridge's address (so pods reach it through the `kubernetes` Service), CoreDNS answers `cluster.local` on
that address. Each node has its own containerd (a kubelet kills sandboxes it does not know), kubelet root dir,
ports, client certificate (`system:node:<name>`) and cgroup root, and a disjoint host-local address range.

The top half of this module is pure builders (configs and command lines, unit-tested); the bottom half is the
glue that starts and stops processes and network devices. Stop order: drain the pods through the API (the
kubelets tear their sandboxes down, removing veths and netns), stop kube-proxy/CoreDNS/kubelets, kill what is
left in the nodes' cgroups, stop the shims and containerds, unmount, delete leftover netns, the bridge, the
iptables chains and the cgroups. `cleanup_state_dir` repeats the non-API part for a run that was killed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import procs
from tests.cluster.errors import ClusterError
from tests.cluster.render import NPU_RESOURCE as NPU_RESOURCE_NAME

BRIDGE = "tcbr0"
POD_CIDR = "10.213.0.0/16"  # used only on BRIDGE: never routed off this machine
GATEWAY = "10.213.0.1"  # the bridge's address: API server, kubelets, CoreDNS listen here
CLUSTER_DOMAIN = "cluster.local"
REAL_NODE_PREFIX = "real-node-"
NODE_KIND_LABEL = "type"  # the fake nodes say `type: kwok`; real ones `type: real`
REAL_NODE_KIND = "real"
DEFAULT_NPUS = 1  # CPU stands in for the NPU: one "device" per real node
CNI_BIN_DIR = Path("/usr/lib/cni")
CGROUP_MOUNT = Path("/sys/fs/cgroup")
FORWARD_CHAIN = f"TELECHAT-{BRIDGE.upper()}"
NODES_DIR = "nodes"  # under the state dir
NETWORK_FILE = "network.json"
COREDNS_IDENTITY = ("system:telechat-coredns", ())
KUBE_PROXY_IDENTITY = ("system:kube-proxy", ())  # bound to system:node-proxier by RBAC's bootstrap policy


def node_name(index: int) -> str:
    return f"{REAL_NODE_PREFIX}{index}"


# -- pure builders ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    """Host programs the real nodes need (paths overridable so tests can point at missing ones)."""

    containerd: str = "/usr/bin/containerd"
    containerd_shim: str = "/usr/bin/containerd-shim-runc-v2"
    ctr: str = "/usr/bin/ctr"
    runc: str = "/usr/sbin/runc"
    iptables: str = "/usr/sbin/iptables"
    ip: str = "/usr/sbin/ip"
    cni_bin_dir: Path = CNI_BIN_DIR
    cgroup_mount: Path = CGROUP_MOUNT


DEFAULT_TOOLS = Tools()


def node_range(index: int, cidr: str = POD_CIDR) -> tuple[str, str]:
    """Node `index`'s host-local range: the /24 numbered index+1 inside `cidr` (the first /24 holds the gateway)."""
    network = ipaddress.ip_network(cidr)
    subnets = list(network.subnets(new_prefix=24))
    if index + 1 >= len(subnets):
        raise ValueError(f"{cidr} has room for {len(subnets) - 1} real nodes, not {index + 1}")
    hosts = list(subnets[index + 1].hosts())
    return str(hosts[1]), str(hosts[-1])


def cni_conflist(
    index: int, data_dir: Path, bridge: str = BRIDGE, cidr: str = POD_CIDR, gateway: str = GATEWAY
) -> dict:
    """Node `index`'s CNI network: the shared bridge, host-local addresses from its own range, no masquerade."""
    start, end = node_range(index, cidr)
    return {
        "cniVersion": "0.4.0",
        "name": "telechat-local",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,  # nothing is NATed off the machine; pod traffic stays on the bridge
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": cidr, "rangeStart": start, "rangeEnd": end, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(data_dir),
                },
            },
        ],
    }


def containerd_config(node_dir: Path, sandbox_image: str, tools: Tools = DEFAULT_TOOLS) -> str:
    """containerd's config.toml (version 2, containerd 1.6): every path under `node_dir`, cgroupfs, our CNI dir."""
    root = node_dir / "containerd"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    lines = [
        "version = 2",
        f'root = "{root / "root"}"',
        f'state = "{root / "state"}"',
        "oom_score = 0",
        'disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",'
        ' "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",'
        ' "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]',
        "",
        "[grpc]",
        f'  address = "{root / "containerd.sock"}"',
        "",
        "[ttrpc]",
        f'  address = "{root / "containerd.ttrpc.sock"}"',
        "",
        "[debug]",
        '  level = "info"',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{root / "opt"}"',
        "",
        f"[{cri}]",
        f'  sandbox_image = "{sandbox_image}"',
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  disable_apparmor = true",
        "  enable_selinux = false",
        "  restrict_oom_score_adj = true",
        "",
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        "",
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        "",
        f"[{cri}.containerd.runtimes.runc.options]",
        "  SystemdCgroup = false",
        f'  BinaryName = "{tools.runc}"',
        "",
        f"[{cri}.cni]",
        f'  bin_dir = "{tools.cni_bin_dir}"',
        f'  conf_dir = "{node_dir / "cni" / "net.d"}"',
        "  max_conf_num = 1",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class NodePorts:
    kubelet: int
    healthz: int


def kubelet_config(
    name: str, node_dir: Path, ca_file: Path, ports: NodePorts, resolv_conf: Path, gateway: str = GATEWAY
) -> dict[str, Any]:
    """KubeletConfiguration for one node on a cgroup v1 host with no systemd: cgroupfs, its own cgroup root."""
    socket = f"unix://{node_dir / 'containerd' / 'containerd.sock'}"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": gateway,
        "port": ports.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports.healthz,
        "authentication": {
            "anonymous": {"enabled": True},  # the API server (logs, exec) has no kubelet client certificate
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "AlwaysAllow"},  # listens only on the bridge address
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/telechat-{name}",  # two kubelets on one host must not clean up each other's pod cgroups
        "cgroupsPerQOS": True,
        "failCgroupV1": False,
        "failSwapOn": False,
        "enforceNodeAllocatable": [],
        "clusterDNS": [gateway],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(resolv_conf),
        "containerRuntimeEndpoint": socket,
        "imageServiceEndpoint": socket,
        # Absolute and small: the nodes share this machine's disk with everything else on it (image archives,
        # other builds), and 1% of a large disk (2.5 GB of 252 GB) was crossed by someone else's build, which
        # evicted every pod and tainted both nodes for 5 minutes. Only a really full disk evicts now.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "256Mi", "imagefs.available": "256Mi"},
        "evictionPressureTransitionPeriod": "30s",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "registerNode": True,
        "rotateCertificates": False,
        "volumePluginDir": str(node_dir / "kubelet" / "volume-plugins"),
        "podLogsDir": str(node_dir / "kubelet" / "pod-logs"),  # not the host's /var/log/pods
        "maxPods": 50,
        "podPidsLimit": -1,
        "shutdownGracePeriod": "0s",
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "containerLogMaxSize": "50Mi",
        "logging": {"format": "text"},
    }


def node_labels(npus: int) -> dict[str, str]:
    """The fake nodes' scheduling labels, plus `type: real` to tell the two kinds apart in a nodeSelector."""
    return {NODE_KIND_LABEL: REAL_NODE_KIND, "accelerator-type": "module-910b-8", "host-arch": "huawei-arm"}


def kubelet_command(
    binary: Path, name: str, node_dir: Path, labels: dict[str, str], gateway: str = GATEWAY
) -> list[str]:
    kubelet_dir = node_dir / "kubelet"
    return [
        str(binary),
        f"--config={kubelet_dir / 'config.yaml'}",
        f"--kubeconfig={kubelet_dir / 'kubeconfig'}",
        f"--root-dir={kubelet_dir / 'root'}",
        f"--cert-dir={kubelet_dir / 'pki'}",
        f"--hostname-override={name}",
        f"--node-ip={gateway}",
        "--node-labels=" + ",".join(f"{key}={value}" for key, value in sorted(labels.items())),
        "--v=1",
    ]


def kube_proxy_config(kubeconfig_path: Path, healthz_port: int, metrics_port: int, cidr: str = POD_CIDR) -> dict:
    """One kube-proxy for the host (all real nodes share its network namespace), iptables mode.

    masqueradeAll: pod -> Service -> pod on one bridge would otherwise answer past the DNAT; nodePortAddresses keeps
    NodePorts on the bridge address only, and conntrack sysctls are left alone.
    """
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig_path)},
        "hostnameOverride": node_name(0),
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "mode": "iptables",
        "clusterCIDR": cidr,
        "nodePortAddresses": [f"{GATEWAY}/32"],
        "iptables": {"masqueradeAll": True, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def kube_proxy_command(binary: Path, config_path: Path) -> list[str]:
    return [str(binary), f"--config={config_path}", "--v=1"]


def corefile(kubeconfig_path: Path, health_port: int, ready_port: int, gateway: str = GATEWAY) -> str:
    """CoreDNS serving cluster.local (Services, headless Services, pods) on the bridge address; nothing else."""
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {gateway}
    errors
    health 127.0.0.1:{health_port}
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig_path}
        pods insecure
        ttl 2
    }}
    cache 2
    loadbalance
}}
"""


def coredns_command(binary: Path, corefile_path: Path) -> list[str]:
    return [str(binary), f"-conf={corefile_path}"]


def coredns_rbac() -> list[dict[str, Any]]:
    """What the CoreDNS kubernetes plugin reads, bound to the identity of its client certificate."""
    name = "telechat-local-coredns"
    rules = [
        {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_IDENTITY[0]}],
        },
    ]


def npu_status_patch(npus: int, resource: str = NPU_RESOURCE_NAME) -> list[dict[str, Any]]:
    """JSON patch of a node's status advertising `npus` of the extended resource (the kubelet keeps it)."""
    escaped = resource.replace("~", "~0").replace("/", "~1")
    return [
        {"op": "add", "path": f"/status/capacity/{escaped}", "value": str(npus)},
        {"op": "add", "path": f"/status/allocatable/{escaped}", "value": str(npus)},
    ]


def forward_rules(bridge: str = BRIDGE, chain: str = FORWARD_CHAIN) -> list[list[str]]:
    """iptables arguments (after `iptables`) that keep the bridge's traffic on the bridge: bridge-to-bridge only."""
    return [
        ["-N", chain],
        ["-A", chain, "-i", bridge, "-o", bridge, "-j", "ACCEPT"],
        ["-A", chain, "-i", bridge, "-j", "DROP"],
        ["-A", chain, "-o", bridge, "-j", "DROP"],
        ["-I", "FORWARD", "1", "-j", chain],
    ]


def forward_cleanup_rules(chain: str = FORWARD_CHAIN) -> list[list[str]]:
    return [["-D", "FORWARD", "-j", chain], ["-F", chain], ["-X", chain]]


# -- checks of the host ------------------------------------------------------------------------------------------


def cgroup_problem(cgroup_mount: Path) -> str | None:
    """Why the host's cgroups cannot hold the nodes' pods, or None (v1 controllers or a unified hierarchy)."""
    if not cgroup_mount.is_dir():
        return f"{cgroup_mount} does not exist: mount the cgroup hierarchies (cgroup v1 controllers or cgroup2)"
    if (cgroup_mount / "cgroup.controllers").is_file():
        return None  # cgroup v2 only
    missing = [name for name in ("cpu", "memory", "pids") if not (cgroup_mount / name / "cgroup.procs").is_file()]
    if missing:
        return f"no {', '.join(missing)} cgroup controller under {cgroup_mount} (needed by the kubelet and runc)"
    return None


def preflight_problems(tools: Tools, euid: int | None = None) -> list[tuple[str, str]]:
    """(component, problem) for each thing the host lacks; empty when real nodes can start."""
    problems: list[tuple[str, str]] = []
    if (os.geteuid() if euid is None else euid) != 0:
        problems.append(("real-nodes", "real nodes need root (network namespaces, a bridge, cgroups, mounts)"))
    packages = {
        "containerd": (tools.containerd, "containerd"),
        "containerd-shim-runc-v2": (tools.containerd_shim, "containerd"),
        "ctr": (tools.ctr, "containerd"),
        "runc": (tools.runc, "runc"),
        "iptables": (tools.iptables, "iptables"),
        "ip": (tools.ip, "iproute2"),
    }
    for component, (path, package) in packages.items():
        if not os.access(path, os.X_OK):
            problems.append((component, f"{path} not found or not executable (Debian package {package})"))
    for plugin in ("bridge", "host-local", "loopback"):
        if not os.access(tools.cni_bin_dir / plugin, os.X_OK):
            problems.append(
                ("cni", f"{tools.cni_bin_dir / plugin} not found (Debian package containernetworking-plugins)")
            )
    problem = cgroup_problem(tools.cgroup_mount)
    if problem:
        problems.append(("cgroup", problem))
    if not Path("/proc/self/ns/net").exists():
        problems.append(("netns", "this kernel has no network namespaces (/proc/self/ns/net is missing)"))
    return problems


def raise_on_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        component, first = problems[0]
        rest = "\n".join(f"{name}: {text}" for name, text in problems[1:])
        raise ClusterError(component, first, details=rest)


# -- host glue ---------------------------------------------------------------------------------------------------


def _run(
    command: list[str], component: str, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as error:
        raise ClusterError(component, f"{command[0]} not found") from error
    except subprocess.TimeoutExpired as error:
        raise ClusterError(component, f"`{' '.join(command)}` did not finish within {timeout:.0f}s") from error
    if check and result.returncode != 0:
        raise ClusterError(component, f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()}")
    return result


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def setup_network(state_dir: Path, tools: Tools = DEFAULT_TOOLS, log: Callable[[str], None] = lambda m: None) -> None:
    """Create the bridge with the gateway address and the FORWARD guard; record what to undo in network.json."""
    nodes_dir = state_dir / NODES_DIR
    nodes_dir.mkdir(parents=True, exist_ok=True)
    if link_exists(BRIDGE):
        owner = _bridge_owner()
        raise ClusterError(
            "network",
            f"bridge {BRIDGE} already exists"
            + (f" (real nodes of {owner} use it)" if owner else "")
            + "; stop that cluster with `python -m tests.cluster down --state-dir DIR`"
            f" or remove it with `ip link delete {BRIDGE}`",
        )
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    record = {"bridge": BRIDGE, "gateway": GATEWAY, "cidr": POD_CIDR, "ip_forward": forward.read_text().strip()}
    _write_json(nodes_dir / NETWORK_FILE, record)
    _owner_file().write_text(str(state_dir.resolve()))
    prefix = ipaddress.ip_network(POD_CIDR).prefixlen
    _run([tools.ip, "link", "add", BRIDGE, "type", "bridge"], "network")
    _run([tools.ip, "addr", "add", f"{GATEWAY}/{prefix}", "dev", BRIDGE], "network")
    _run([tools.ip, "link", "set", BRIDGE, "up"], "network")
    _run([tools.iptables, "-w", "-D", "FORWARD", "-j", FORWARD_CHAIN], "iptables", check=False)
    _run([tools.iptables, "-w", "-F", FORWARD_CHAIN], "iptables", check=False)
    _run([tools.iptables, "-w", "-X", FORWARD_CHAIN], "iptables", check=False)
    for rule in forward_rules():
        _run([tools.iptables, "-w", *rule], "iptables")
    forward.write_text("1")  # pod -> Service -> pod is routed bridge to bridge; the chain above drops the rest
    log(f"network: bridge {BRIDGE} {GATEWAY}/{prefix} up")


def _owner_file() -> Path:
    return Path("/run") / f"telechat-{BRIDGE}.owner"


def _bridge_owner() -> str | None:
    try:
        return _owner_file().read_text().strip() or None
    except OSError:
        return None


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def mounts_under(directory: Path, mountinfo: str | None = None) -> list[Path]:
    """Mount points at or under `directory`, deepest first (from /proc/self/mountinfo unless given)."""
    prefix = str(directory.resolve())
    found: list[Path] = []
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            mountinfo = ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda path: len(path.parts), reverse=True)


def node_cgroup_dirs(tools: Tools, name: str) -> list[Path]:
    """The cgroup directories of node `name`'s root in every hierarchy (v1 controllers, unified)."""
    dirs = []
    root = tools.cgroup_mount
    if (root / "cgroup.controllers").is_file():
        return [root / f"telechat-{name}"]
    with contextlib.suppress(OSError):
        for hierarchy in sorted(root.iterdir()):
            if (hierarchy / "cgroup.procs").is_file() and not hierarchy.is_symlink():
                dirs.append(hierarchy / f"telechat-{name}")
    return dirs


def create_node_cgroups(tools: Tools, name: str) -> None:
    """The kubelet's cgroupRoot must exist in every hierarchy; cpuset children start empty, so copy the parent's."""
    for directory in node_cgroup_dirs(tools, name):
        directory.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            parent, child = directory.parent / knob, directory / knob
            if parent.is_file() and child.is_file() and not child.read_text().strip():
                child.write_text(parent.read_text())


def _cgroup_pids(directory: Path) -> set[int]:
    pids: set[int] = set()
    if not directory.is_dir():
        return pids
    for procs_file in directory.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(line) for line in procs_file.read_text().split())
    return pids


def kill_node_cgroups(tools: Tools, name: str, timeout: float = 10.0) -> int:
    """SIGKILL every process left in node `name`'s cgroups (containers whose kubelet is gone); remove the cgroups."""
    dirs = node_cgroup_dirs(tools, name)
    killed = 0
    deadline = time.monotonic() + timeout
    while True:
        pids = set().union(*(_cgroup_pids(directory) for directory in dirs)) if dirs else set()
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.1)
    for directory in dirs:
        if directory.is_dir():
            for child in sorted(
                (p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                directory.rmdir()
    return killed


def _netns_in_cidr(tools: Tools, cidr: str) -> list[str]:
    """Named network namespaces (/run/netns) holding an address of `cidr`: pod sandboxes of our nodes."""
    network = ipaddress.ip_network(cidr)
    found = []
    netns_dir = Path("/run/netns")
    if not netns_dir.is_dir():
        return found
    for entry in sorted(netns_dir.iterdir()):
        result = _run([tools.ip, "-n", entry.name, "-o", "-4", "addr", "show"], "netns", check=False, timeout=10)
        for token in result.stdout.split():
            with contextlib.suppress(ValueError):
                if "/" in token and ipaddress.ip_interface(token).ip in network:
                    found.append(entry.name)
                    break
    return found


def cleanup_state_dir(
    state_dir: Path, tools: Tools = DEFAULT_TOOLS, log: Callable[[str], None] = lambda m: None
) -> None:
    """Undo everything the real nodes of `state_dir` set up on the host; safe to run twice or on a fresh dir.

    The processes must be stopped already (or dead): this kills the containers left in the nodes' cgroups and
    the shims, unmounts, and removes the netns, the bridge, the iptables chains and the kube-proxy rules.
    """
    nodes_dir = state_dir.resolve() / NODES_DIR
    if not nodes_dir.is_dir():
        return
    network_file = nodes_dir / NETWORK_FILE
    try:
        network = json.loads(network_file.read_text())
    except (OSError, ValueError):
        network = None
    for node_dir in sorted(path for path in nodes_dir.iterdir() if path.is_dir()):
        killed = kill_node_cgroups(tools, node_dir.name)
        if killed:
            log(f"{node_dir.name}: killed {killed} container process(es) left in its cgroups")
    for process in procs.referencing([nodes_dir]):  # shims (their -address names our socket), stray daemons
        log(f"stopping leftover {process.name} (pid {process.pid})")
        procs.terminate([process], timeout=5)
    for point in mounts_under(nodes_dir):
        result = subprocess.run(["umount", "--lazy", str(point)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log(f"umount {point}: {result.stderr.strip()}")
    if network is None:
        return
    for netns in _netns_in_cidr(tools, network["cidr"]):
        log(f"network: deleting leftover network namespace {netns}")
        _run([tools.ip, "netns", "delete", netns], "netns", check=False)
    if link_exists(network["bridge"]):
        for veth in _bridge_ports(network["bridge"]):
            _run([tools.ip, "link", "delete", veth], "network", check=False)
        _run([tools.ip, "link", "delete", network["bridge"]], "network", check=False)
        log(f"network: bridge {network['bridge']} removed")
    for rule in forward_cleanup_rules():
        _run([tools.iptables, "-w", *rule], "iptables", check=False)
    _cleanup_kube_proxy_rules(tools)
    if not _other_bridges():  # another bridge on the host (someone else's) may need forwarding: leave it on
        with contextlib.suppress(OSError):
            Path("/proc/sys/net/ipv4/ip_forward").write_text(network.get("ip_forward", "0"))
    if _bridge_owner() == str(state_dir.resolve()):
        _owner_file().unlink(missing_ok=True)
    network_file.unlink(missing_ok=True)


def _other_bridges() -> list[str]:
    return sorted(path.parent.name for path in Path("/sys/class/net").glob("*/bridge") if path.parent.name != BRIDGE)


def _bridge_ports(bridge: str) -> list[str]:
    brif = Path(f"/sys/class/net/{bridge}/brif")
    return sorted(entry.name for entry in brif.iterdir()) if brif.is_dir() else []


def _cleanup_kube_proxy_rules(tools: Tools) -> None:
    """Remove the KUBE-* chains kube-proxy left in the nat and filter tables (what `kube-proxy --cleanup` does)."""
    for table in ("nat", "filter", "mangle"):
        listing = _run([tools.iptables, "-w", "-t", table, "-S"], "iptables", check=False).stdout.splitlines()
        jumps = [
            line
            for line in listing
            if line.startswith("-A ") and " -j KUBE-" in line and not line.split()[1].startswith("KUBE-")
        ]
        for line in jumps:
            _run([tools.iptables, "-w", "-t", table, "-D", *shlex.split(line)[1:]], "iptables", check=False)
        chains = [line.split()[1] for line in listing if line.startswith("-N KUBE-")]
        for chain in chains:
            _run([tools.iptables, "-w", "-t", table, "-F", chain], "iptables", check=False)
        for chain in chains:
            _run([tools.iptables, "-w", "-t", table, "-X", chain], "iptables", check=False)


@dataclass
class RealNodes:
    """The real nodes of one cluster: set up by `LocalCluster` around its control plane."""

    state_dir: Path
    count: int
    npus: int = DEFAULT_NPUS
    tools: Tools = field(default_factory=Tools)

    @property
    def nodes_dir(self) -> Path:
        return self.state_dir / NODES_DIR

    def names(self) -> list[str]:
        return [node_name(index) for index in range(self.count)]

    def node_dir(self, name: str) -> Path:
        return self.nodes_dir / name

    def preflight(self) -> None:
        raise_on_problems(preflight_problems(self.tools))

    def write_node_files(self, index: int, kubeconfig_text: str, ca_file: Path, ports: NodePorts, sandbox: str) -> None:
        name = node_name(index)
        node_dir = self.node_dir(name)
        for sub in ("containerd", "kubelet/root", "kubelet/pki", "kubelet/volume-plugins", "cni/net.d", "cni/data"):
            (node_dir / sub).mkdir(parents=True, exist_ok=True)
        (node_dir / "containerd" / "config.toml").write_text(containerd_config(node_dir, sandbox, self.tools))
        conflist = cni_conflist(index, node_dir / "cni" / "data")
        (node_dir / "cni" / "net.d" / "10-telechat.conflist").write_text(json.dumps(conflist, indent=2) + "\n")
        resolv = node_dir / "kubelet" / "resolv.conf"
        resolv.write_text("")  # pods get cluster DNS only: nothing resolves (or leaves) past the cluster
        config = kubelet_config(name, node_dir, ca_file, ports, resolv)
        (node_dir / "kubelet" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        kubeconfig = node_dir / "kubelet" / "kubeconfig"
        kubeconfig.write_text(kubeconfig_text)
        kubeconfig.chmod(0o600)
        create_node_cgroups(self.tools, name)

    def containerd_socket(self, name: str) -> Path:
        return self.node_dir(name) / "containerd" / "containerd.sock"

    def containerd_command(self, name: str) -> list[str]:
        return [self.tools.containerd, f"--config={self.node_dir(name) / 'containerd' / 'config.toml'}"]

    def containerd_ready(self, name: str) -> bool:
        socket = self.containerd_socket(name)
        if not socket.exists():
            return False
        result = subprocess.run(
            [self.tools.ctr, f"--address={socket}", "version"], capture_output=True, text=True, timeout=20, check=False
        )
        return result.returncode == 0

    def import_archive(self, name: str, archive: Path) -> None:
        """Load an image archive into node `name`'s containerd (namespace k8s.io, where the kubelet looks)."""
        socket = self.containerd_socket(name)
        command = [self.tools.ctr, f"--address={socket}", "--namespace=k8s.io", "images", "import"]
        _run([*command, str(archive)], f"containerd-{name}", timeout=600)

    def teardown(self, log: Callable[[str], None] = lambda m: None) -> None:
        cleanup_state_dir(self.state_dir, self.tools, log)


def remove_nodes_dir(state_dir: Path) -> None:
    """Delete the nodes' files, but never through a mount (a hostPath bind would take the host's data with it)."""
    nodes_dir = state_dir / NODES_DIR
    if not nodes_dir.exists():
        return
    if mounts_under(nodes_dir):
        raise ClusterError(
            "real-nodes",
            f"{nodes_dir} still has mounts ({', '.join(map(str, mounts_under(nodes_dir)[:3]))}); "
            "not deleting it: run `python -m tests.cluster down --state-dir DIR` first",
        )
    shutil.rmtree(nodes_dir)
