"""The running local cluster: start the components in order, wait for each to be ready, stop them all.

State dir layout (default `.cluster/` in the repo): `kubeconfig` (admin), `bin/` (links to the cached binaries),
`logs/<component>.log`, `pki/`, `kubeconfigs/`, `etcd-data/`, `kwok/`, `pids.json`, `cluster.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import nodes as nodes_module
from tests.cluster import pki as pki_module
from tests.cluster import procs, render
from tests.cluster.build import cache_root, link_bin_dir
from tests.cluster.errors import ClusterError
from tests.cluster.testimage import ensure_busybox_image

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO_ROOT / ".cluster"
MANIFESTS_DIR = Path(__file__).resolve().parent / "manifests"
READY_TIMEOUT = float(os.environ.get("TELECHAT_CLUSTER_READY_TIMEOUT", "180"))  # generous: CI's 2 cores are busy
# Entries of a state dir that a fresh start replaces; nothing else in the directory is ever deleted.
_STATE_ENTRIES = ("etcd-data", "pki", "kubeconfigs", "kwok", "logs", "kubeconfig", "cluster.json", "nodes.yaml")
# Stop order: the real nodes' daemons (kube-proxy, coredns, kubelet-*, containerd-*) first, then the clients,
# etcd last.
_STOP_ORDER = (
    "kube-proxy",
    "coredns",
    "kubelet",
    "containerd",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
)
# Entries that only the components name on their command lines (not `logs`: a `tail -f` of a log is no component).
_COMPONENT_PATHS = ("etcd-data", "pki", "kubeconfigs", "kwok", nodes_module.NODES_DIR)
# How long a stop waits for the kubelets to tear down the real nodes' pods before killing what is left.
DRAIN_TIMEOUT = float(os.environ.get("TELECHAT_CLUSTER_DRAIN_TIMEOUT", "60"))


def stop_rank(name: str) -> int:
    """Position of a process in the stop order (`kubelet-real-node-0` ranks as `kubelet`); unknown ones first."""
    for index, prefix in enumerate(_STOP_ORDER):
        if name == prefix or name.startswith(f"{prefix}-"):
            return index
    return -1


class ClusterHandle:
    """What tests and scripts use: a kubeconfig, the binaries, a client and a kubectl helper."""

    def __init__(self, kubeconfig: Path, bin_dir: Path, state_dir: Path) -> None:
        self.kubeconfig = kubeconfig
        self.bin_dir = bin_dir
        self.state_dir = state_dir

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; on failure (with check) raise naming the command and its stderr."""
        command = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ClusterError("kubectl", f"`kubectl {' '.join(args)}` failed: {result.stderr.strip()}")
        return result

    def helm(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster with a clean HOME, so no user's helm config or repositories leak in."""
        command = [str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args]
        env = {"HOME": "/tmp", "PATH": "/usr/bin:/bin"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check and result.returncode != 0:
            raise ClusterError("helm", f"`helm {' '.join(args)}` failed: {result.stderr.strip()}")
        return result

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for this cluster (imported lazily: only tests need the package)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


class LocalCluster(ClusterHandle):
    """A control plane this process starts (and therefore must stop)."""

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        nodes: int = 4,
        die_with_parent: bool = False,
        log: Callable[[str], None] = lambda message: None,
        real_nodes: int = 0,
        real_npus: int = nodes_module.DEFAULT_NPUS,
        image_importer: Callable[[str], None] | None = None,
        sandbox_image: str | None = None,
        tools: nodes_module.Tools | None = None,
    ) -> None:
        """`real_nodes` > 0 adds that many real nodes (containerd + kubelet, see nodes.py); `image_importer` is
        called with each node's containerd socket to load more images, `sandbox_image` names the pause image it
        loads (else the busybox test image serves as sandbox)."""
        state_dir = state_dir.resolve()
        super().__init__(state_dir / "kubeconfig", state_dir / "bin", state_dir)
        self.node_count = nodes
        self.real = (
            nodes_module.RealNodes(state_dir, real_nodes, real_npus, tools or nodes_module.Tools())
            if real_nodes > 0
            else None
        )
        self.image_importer = image_importer
        self.sandbox_image = sandbox_image
        self.die_with_parent = die_with_parent
        self.log = log
        self.logs_dir = state_dir / "logs"
        self.pidfile = state_dir / "pids.json"
        self.processes: list[procs.ManagedProcess] = []
        self.timings: dict[str, float] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, binaries: dict[str, Path]) -> None:
        """Bring the whole cluster up, or raise ClusterError with nothing left running."""
        started = time.monotonic()
        for attempt in (1, 2):
            try:
                self._start(binaries, started)
                break
            except ClusterError as error:
                self.stop()
                # Ports are free when chosen but not reserved: another program may take one first. Retry once.
                if attempt == 1 and "address already in use" in error.args[0]:
                    self.log(f"{error.component}: a chosen port was taken meanwhile; starting again on new ports")
                    continue
                raise
            except BaseException:
                self.stop()
                raise
        self.timings["total"] = time.monotonic() - started

    def stop(self) -> None:
        if self.real is not None and any(process.name.startswith("kubelet-") for process in self.processes):
            self._drain_real_nodes()
        running = sorted(self.processes, key=lambda process: stop_rank(process.name))
        for process in running:
            procs.terminate([process])
            if process.name.startswith("kubelet-") and self.real is not None:
                # Containers outlive their kubelet and containerd: kill them while the shims still run.
                nodes_module.kill_node_cgroups(self.real.tools, process.name.removeprefix("kubelet-"))
        self.processes = []
        if self.real is not None:
            self.real.teardown(self.log)
        procs.remove_own_pidfile(self.pidfile)

    def _drain_real_nodes(self) -> None:
        """Delete the real nodes' pods through the API so the kubelets tear down sandboxes, veths and netns."""
        assert self.real is not None
        names = self.real.names()
        try:
            self.kubectl("cordon", *names, check=False, timeout=20)
            for name in names:
                self.kubectl(
                    "delete",
                    "pods",
                    "--all-namespaces",
                    f"--field-selector=spec.nodeName={name}",
                    "--grace-period=1",
                    "--wait=false",
                    check=False,
                    timeout=30,
                )
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while time.monotonic() < deadline:
                left = [self._pods_on(name) for name in names]
                if None in left:
                    self.log("real nodes: the API server does not answer; killing their containers")
                    return
                if not any(left):
                    return
                time.sleep(0.5)
            self.log(f"real nodes: pods still on {', '.join(names)} after {DRAIN_TIMEOUT:.0f}s; killing them")
        except (ClusterError, subprocess.TimeoutExpired) as error:
            self.log(f"real nodes: drain failed ({error}); killing their containers")

    def _pods_on(self, node: str) -> bool | None:
        """Whether pods are left on `node`; None when the API server cannot say."""
        result = self.kubectl(
            "get",
            "pods",
            "--all-namespaces",
            f"--field-selector=spec.nodeName={node}",
            "--output=name",
            check=False,
            timeout=20,
        )
        return None if result.returncode != 0 else bool(result.stdout.strip())

    def _start(self, binaries: dict[str, Path], started: float) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        stop_state_dir(self.state_dir, self.log)
        nodes_module.remove_nodes_dir(self.state_dir)
        for entry in _STATE_ENTRIES:
            path = self.state_dir / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        link_bin_dir(self.bin_dir, binaries)

        bind = "127.0.0.1"
        advertise = render.choose_advertise_address(_read("/proc/net/route"), _read("/proc/net/fib_trie"))
        if self.real is not None:
            self.real.preflight()
            nodes_module.setup_network(self.state_dir, self.real.tools, self.log)
            # Pods reach the API server through the `kubernetes` Service, whose endpoint is this address.
            bind = advertise = nodes_module.GATEWAY
        ports = render.Ports.from_list(render.free_ports(render.PORT_COUNT))
        pki_dir = self.state_dir / "pki"
        serving_ips = ["127.0.0.1", bind, render.service_ip()] + ([advertise] if advertise else [])
        serving_dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
        serving_dns.append("kubernetes.default.svc.cluster.local")
        pki_module.write_pki(pki_dir, sorted(set(serving_ips)), serving_dns)
        server = f"https://{bind}:{ports.apiserver}"
        kubeconfigs = self._write_kubeconfigs(pki_dir, server)

        kwok_dir = self.state_dir / "kwok"
        (kwok_dir / "workdir").mkdir(parents=True)
        kwok_config = kwok_dir / "kwok.yaml"
        kwok_config.write_text(render.render_yaml_documents(render.kwok_config_documents()))
        nodes_file = self.state_dir / "nodes.yaml"
        nodes_file.write_text(render.render_yaml_documents(render.fake_nodes(self.node_count)))

        self._launch("etcd", render.etcd_command(binaries["etcd"], self.state_dir / "etcd-data", ports))
        self._wait_http("etcd", f"http://127.0.0.1:{ports.etcd_client}/health", None, started)

        apiserver_cmd = render.apiserver_command(
            binaries["kube-apiserver"],
            pki_dir,
            ports,
            advertise,
            self.state_dir / "pki" / "generated",
            bind,
            kubelet_by_ip=self.real is not None,
        )
        self._launch("kube-apiserver", apiserver_cmd)
        admin_tls = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        admin_tls.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
        self._wait_http("kube-apiserver", f"{server}/readyz", admin_tls, started)

        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # their serving certs are self-signed in memory; only health is read
        cm_cmd = render.controller_manager_command(
            binaries["kube-controller-manager"], pki_dir, kubeconfigs["kube-controller-manager"], ports
        )
        self._launch("kube-controller-manager", cm_cmd)
        scheduler_cmd = render.scheduler_command(binaries["kube-scheduler"], kubeconfigs["kube-scheduler"], ports)
        self._launch("kube-scheduler", scheduler_cmd)
        kwok_env = {**os.environ, "KWOK_WORKDIR": str(kwok_dir / "workdir")}  # never read ~/.kwok/kwok.yaml
        self._launch("kwok", render.kwok_command(binaries["kwok"], kubeconfigs["kwok"], kwok_config, ports), kwok_env)
        local = "https://127.0.0.1"
        self._wait_http("kube-controller-manager", f"{local}:{ports.controller_manager}/healthz", insecure, started)
        self._wait_http("kube-scheduler", f"{local}:{ports.scheduler}/healthz", insecure, started)
        self._wait_http("kwok", f"http://127.0.0.1:{ports.kwok}/healthz", None, started)

        manifests = sorted(MANIFESTS_DIR.glob("*.yaml"))
        if manifests:
            self.kubectl("apply", "--server-side", *(f"--filename={path}" for path in manifests))
            # Established before anyone is told the cluster is up: a test may create a PodGroup right away.
            self.kubectl("wait", "--for=condition=Established", "customresourcedefinitions", "--all", "--timeout=60s")
        self.kubectl("apply", "--server-side", f"--filename={nodes_file}")
        self._wait_until("kwok", "fake nodes Ready", self._fake_nodes_ready, started)
        self._wait_until(
            "kube-controller-manager", "the `default` ServiceAccount", self._default_service_account, started
        )
        if self.real is not None:
            self._start_real_nodes(binaries, pki_dir, server, started)
        self._write_state(ports, advertise)

    def _start_real_nodes(self, binaries: dict[str, Path], pki_dir: Path, server: str, started: float) -> None:
        """containerd + kubelet per node, then kube-proxy and CoreDNS; each waited for, naming its log on failure."""
        real = self.real
        assert real is not None
        ca_pem = (pki_dir / "ca.crt").read_bytes()

        def identity_kubeconfig(name: str, user: str, groups: tuple[str, ...]) -> str:
            pair = pki_module.write_client_cert(pki_dir, name, user, groups)
            return yaml.safe_dump(render.kubeconfig(server, ca_pem, pair.cert_pem, pair.key_pem, user), sort_keys=False)

        busybox = ensure_busybox_image(cache_root() / "images")
        sandbox = self.sandbox_image or busybox.name
        names = real.names()
        for index, name in enumerate(names):
            kubelet_ports = render.free_ports(2, nodes_module.GATEWAY)
            kubeconfig_text = identity_kubeconfig(f"node-{name}", f"system:node:{name}", ("system:nodes",))
            real.write_node_files(
                index, kubeconfig_text, pki_dir / "ca.crt", nodes_module.NodePorts(*kubelet_ports), sandbox
            )
            self._launch(f"containerd-{name}", real.containerd_command(name))
        for name in names:
            self._wait_until(f"containerd-{name}", "ready", lambda name=name: real.containerd_ready(name), started)
            real.import_archive(name, busybox.archive)
            if self.image_importer is not None:
                self.image_importer(str(real.containerd_socket(name)))  # a path, as `ctr --address` takes it
        labels = nodes_module.node_labels(real.npus)
        for name in names:
            command = nodes_module.kubelet_command(binaries["kubelet"], name, real.node_dir(name), labels)
            self._launch(f"kubelet-{name}", command)

        self.kubectl(
            "apply", "--server-side", "--filename=-", input=render.render_yaml_documents(nodes_module.coredns_rbac())
        )
        proxy_dir = real.nodes_dir / "kube-proxy"
        proxy_dir.mkdir(parents=True, exist_ok=True)
        proxy_kubeconfig = proxy_dir / "kubeconfig"
        _write_private(proxy_kubeconfig, identity_kubeconfig("kube-proxy", *nodes_module.KUBE_PROXY_IDENTITY))
        proxy_ports = render.free_ports(2)
        proxy_config = proxy_dir / "config.yaml"
        proxy_config.write_text(
            yaml.safe_dump(nodes_module.kube_proxy_config(proxy_kubeconfig, *proxy_ports), sort_keys=False)
        )
        self._launch("kube-proxy", nodes_module.kube_proxy_command(binaries["kube-proxy"], proxy_config))
        dns_dir = real.nodes_dir / "coredns"
        dns_dir.mkdir(parents=True, exist_ok=True)
        dns_kubeconfig = dns_dir / "kubeconfig"
        _write_private(dns_kubeconfig, identity_kubeconfig("coredns", *nodes_module.COREDNS_IDENTITY))
        dns_ports = render.free_ports(2)
        (dns_dir / "Corefile").write_text(nodes_module.corefile(dns_kubeconfig, *dns_ports))
        self._launch("coredns", nodes_module.coredns_command(binaries["coredns"], dns_dir / "Corefile"))

        for name in names:
            self._wait_until(f"kubelet-{name}", "registered", lambda name=name: self._node_exists(name), started)
            patch = json.dumps(nodes_module.npu_status_patch(real.npus))
            self.kubectl("patch", "node", name, "--subresource=status", "--type=json", f"--patch={patch}")
        for name in names:
            self._wait_until(f"kubelet-{name}", "Ready", lambda name=name: self._node_ready(name), started)
        self._wait_http("kube-proxy", f"http://127.0.0.1:{proxy_ports[0]}/healthz", None, started)
        self._wait_http("coredns", f"http://127.0.0.1:{dns_ports[1]}/ready", None, started)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _write_kubeconfigs(self, pki_dir: Path, server: str) -> dict[str, Path]:
        ca_pem = (pki_dir / "ca.crt").read_bytes()
        directory = self.state_dir / "kubeconfigs"
        directory.mkdir()
        paths: dict[str, Path] = {}
        for name in pki_module.CLIENT_IDENTITIES:
            config = render.kubeconfig(
                server, ca_pem, (pki_dir / f"{name}.crt").read_bytes(), (pki_dir / f"{name}.key").read_bytes(), name
            )
            path = self.kubeconfig if name == "admin" else directory / f"{name}.kubeconfig"
            _write_private(path, yaml.safe_dump(config, sort_keys=False))
            paths[name] = path
        return paths

    def _launch(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        self.log(f"starting {name}")
        process = procs.start_process(
            name, command, self.logs_dir / f"{name}.log", env=env, die_with_parent=self.die_with_parent
        )
        self.processes.append(process)
        procs.write_pidfile(self.pidfile, self.processes)

    def _process(self, name: str) -> procs.ManagedProcess:
        return next(process for process in self.processes if process.name == name)

    def _wait_until(self, component: str, what: str, probe: Callable[[], bool], started: float) -> None:
        """Poll `probe` until true; fail fast if a process died, fail at the deadline naming `component`."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            for process in self.processes:
                if not process.alive():
                    code = process.exit_code()
                    raise ClusterError(
                        process.name,
                        f"exited (code {code}) while waiting for {what}",
                        process.log_path,
                        procs.tail(process.log_path),
                    )
            if probe():
                self.timings[component if what == "ready" else what] = time.monotonic() - started
                self.log(f"{component}: {what} after {time.monotonic() - started:.1f}s")
                return
            if time.monotonic() > deadline:
                log_path = self.logs_dir / f"{component}.log"
                raise ClusterError(component, f"not {what} within {READY_TIMEOUT:.0f}s", log_path, procs.tail(log_path))
            time.sleep(0.25)

    def _wait_http(self, component: str, url: str, tls: ssl.SSLContext | None, started: float) -> None:
        def probe() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5, context=tls) as response:
                    return response.status == 200
            except (urllib.error.URLError, OSError, ssl.SSLError):
                return False

        self._wait_until(component, "ready", probe, started)

    def _fake_nodes_ready(self) -> bool:
        result = self.kubectl("get", "nodes", "--output=json", check=False)
        if result.returncode != 0:
            return False
        ready = 0
        for node in json.loads(result.stdout)["items"]:
            conditions = node.get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                ready += 1
        return ready >= self.node_count

    def _node_exists(self, name: str) -> bool:
        return self.kubectl("get", "node", name, "--output=name", check=False).returncode == 0

    def _node_ready(self, name: str) -> bool:
        result = self.kubectl("get", "node", name, "--output=json", check=False)
        if result.returncode != 0:
            return False
        status = json.loads(result.stdout).get("status", {})
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
        return ready and nodes_module.NPU_RESOURCE_NAME in status.get("allocatable", {})

    def _default_service_account(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", "--namespace=default", check=False).returncode == 0

    def _write_state(self, ports: render.Ports, advertise: str | None) -> None:
        state = {
            "kubeconfig": str(self.kubeconfig),
            "bin_dir": str(self.bin_dir),
            "nodes": self.node_count,
            "real_nodes": self.real.names() if self.real is not None else [],
            "ports": ports.__dict__,
            "advertise_address": advertise,
            "ready_seconds": {name: round(seconds, 2) for name, seconds in self.timings.items()},
        }
        _write_private(self.state_dir / "cluster.json", json.dumps(state, indent=2) + "\n")


def stop_state_dir(state_dir: Path, log: Callable[[str], None] = lambda message: None, what: str = "leftover ") -> int:
    """Stop everything running on `state_dir`; returns how many processes were stopped.

    In order: the clients recorded in `*.pid` files (the dev operator's `operator.pid`), the components in
    `pids.json`, then any process whose command line still names the dir's component files (`etcd-data/`, `pki/`,
    `kubeconfigs/`, `kwok/`): the pidfile may be missing, unreadable or incomplete, and those must not outlive it.
    Clusters of pytest sessions nested in the dir (`pytest-<pid>/`) are not this dir's and are left alone.
    """
    state_dir = state_dir.resolve()
    stopped = 0
    for pid_path, process in procs.recorded_in_pid_files(state_dir):
        log(f"stopping {what}{process.name} (pid {process.pid}, from {pid_path.name})")
        procs.terminate([process])
        pid_path.unlink(missing_ok=True)
        stopped += 1
    stopped += procs.reap(state_dir / "pids.json", log, what)
    for process in sorted(running_on(state_dir), key=lambda process: stop_rank(process.name)):
        log(f"stopping {what}{process.name} (pid {process.pid}, not in pids.json; its command line names {state_dir})")
        procs.terminate([process])
        stopped += 1
    nodes_module.cleanup_state_dir(state_dir, log=log)  # containers, mounts, netns, bridge, iptables of real nodes
    return stopped


def running_on(state_dir: Path) -> list[procs.ManagedProcess]:
    """The processes whose command line names `state_dir`'s component files (what `stop_state_dir` would find)."""
    return procs.referencing([state_dir.resolve() / entry for entry in _COMPONENT_PATHS])


def memory_report(pidfile: Path) -> list[tuple[str, int, int | None]]:
    """(component, pid, RSS in KiB or None when not running) for each recorded process."""
    return [
        (process.name, process.pid, procs.rss_kib(process.pid) if process.alive() else None)
        for process in procs.read_pidfile(pidfile)
    ]


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _write_private(path: Path, text: str) -> None:
    """Write a file holding keys: owner-only, and atomically."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    temporary.chmod(0o600)
    os.replace(temporary, path)
