"""The real operator on the local cluster, for the TeleChatFinetune end-to-end tests.

The operator runs as a subprocess (`python -m telechat_operator run`) under the ServiceAccount and ClusterRole of
`operator/deploy/rbac.yaml`, authenticated with a token of that ServiceAccount: a verb missing from the RBAC
manifest fails these tests. The backoff base is shortened through TELECHAT_OPERATOR_BACKOFF_BASE_SECONDS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import ClusterHandle
from tests.cluster.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
RBAC = REPO / "operator" / "deploy" / "rbac.yaml"
BACKOFF_BASE_SECONDS = "0.5"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_account_kubeconfig(cluster: ClusterHandle, path: Path) -> Path:
    """A kubeconfig for the operator's ServiceAccount (token auth), on the same server and CA as the admin's."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    server_entry = admin["clusters"][0]["cluster"]
    token = cluster.kubectl(
        "create", "token", "telechat-operator", "--namespace=telechat", "--duration=2h"
    ).stdout.strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": server_entry}],
        "users": [{"name": "telechat-operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "telechat-operator"}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """`telechat-operator run` in the background; start, kill -9 and restart it at will."""

    def __init__(self, kubeconfig: Path, log_path: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.health_port = 0
        self.metrics_port = 0

    def start(self) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "TELECHAT_OPERATOR_BACKOFF_BASE_SECONDS": BACKOFF_BASE_SECONDS,
            "TELECHAT_OPERATOR_BACKOFF_MAX_SECONDS": "2",
            # The test jobs keep their output on a hostPath volume (kwok runs nothing, nothing is written).
            "TELECHAT_OPERATOR_ALLOWED_HOSTPATHS": "/mnt/telechat",
        }
        command = [
            sys.executable, "-m", "telechat_operator", "run", "--all-namespaces", "--log-format", "full",
            "--liveness", f"http://127.0.0.1:{self.health_port}/healthz", "--metrics-port", str(self.metrics_port),
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        wait_for(self.healthy, "the operator's health endpoint", timeout=60)

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}; log: {self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a node or OOM kill."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def install(cluster: ClusterHandle) -> None:
    """CRDs and the operator's RBAC, as a user installs them (idempotent)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", f"--filename={CRDS}")
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/telechatfinetunes.telechat.io")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", f"--filename={RBAC}")


class Jobs:
    """kubectl-level helpers for one namespace: what a user would type, plus the fake-phase annotations."""

    def __init__(self, cluster: ClusterHandle, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(f"--namespace={self.namespace}", *args, **kwargs)

    def apply(self, name: str, **spec: Any) -> dict[str, Any]:
        body = finetune(name, **spec)
        self.kubectl("apply", "--filename=-", input=json.dumps(body))
        return body

    def get(self, name: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "telechatfinetune", name, "--output=json").stdout)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, patch: dict[str, Any]) -> None:
        self.kubectl("patch", "telechatfinetune", name, "--type=merge", f"--patch={json.dumps({'spec': patch})}")

    def pods(self, name: str, role: str = "worker") -> list[dict[str, Any]]:
        selector = f"telechat.io/job-name={name},telechat.io/role={role}"
        return json.loads(self.kubectl("get", "pods", f"--selector={selector}", "--output=json").stdout)["items"]

    def wait_state(self, name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (s := self.status(name)).get("state") == state and s, f"{name} to reach state {state}", timeout
        )

    def wait_pods(
        self, name: str, count: int, phase: str, role: str = "worker", attempt: int | None = None, timeout: float = 60
    ) -> list[dict[str, Any]]:
        def probe() -> list[dict[str, Any]] | None:
            pods = [
                pod
                for pod in self.pods(name, role)
                if attempt is None or pod["metadata"]["labels"]["telechat.io/attempt"] == str(attempt)
            ]
            ready = [
                p for p in pods if p["status"].get("phase") == phase and not p["metadata"].get("deletionTimestamp")
            ]
            return ready if len(ready) == count else None

        what = f"{count} {role} pod(s) of {name}{'' if attempt is None else f' attempt {attempt}'} {phase}"
        return wait_for(probe, what, timeout)

    def set_phase(
        self, pods: list[dict[str, Any]], phase: str, exit_code: int | None = None, message: str | None = None
    ) -> None:
        """Tell kwok to end these pods (the simulated cluster never runs their containers); `message` becomes the
        containers' termination message."""
        annotations = [f"telechat.io/fake-phase={phase}"]
        if exit_code is not None:
            annotations.append(f"telechat.io/fake-exit-code={exit_code}")
        if message is not None:
            annotations.append(f"telechat.io/fake-message={message}")
        names = [pod["metadata"]["name"] for pod in pods]
        self.kubectl("annotate", "pods", *names, *annotations, "--overwrite")

    def events(self, name: str) -> list[str]:
        selector = f"involvedObject.name={name},involvedObject.kind=TeleChatFinetune"
        items = json.loads(self.kubectl("get", "events", f"--field-selector={selector}", "--output=json").stdout)
        return [event["reason"] for event in items["items"]]


def finetune(name: str, **spec: Any) -> dict[str, Any]:
    """A telechat2-tiny job; spec keyword arguments replace top-level fields (None removes one)."""
    nodes = spec.get("nodes", 2)
    base: dict[str, Any] = {
        "model": "telechat2-tiny",
        "image": "telechat-runtime:test",
        "nodes": nodes,
        "devicesPerNode": 1,
        "parallel": {"dataParallel": nodes, "modelParallel": 1, "pipelineStage": 1, "microBatchNum": 1},
        "dataset": {"path": "/mnt/telechat/data/train.mindrecord"},
        "output": {"path": f"/mnt/telechat/output/{name}"},
        "volumes": [{"name": "shared", "hostPath": {"path": "/mnt/telechat", "type": "DirectoryOrCreate"}}],
        "volumeMounts": [{"name": "shared", "mountPath": "/mnt/telechat"}],
        "runPolicy": {"backoffLimit": 3},
    }
    for key, value in spec.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return {"apiVersion": "telechat.io/v1alpha1", "kind": "TeleChatFinetune", "metadata": {"name": name}, "spec": base}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((cond for cond in status.get("conditions") or [] if cond["type"] == kind), {})


def eventually(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    wait_for(lambda: check() or None, what, timeout)


def wait_quietly(seconds: float) -> None:
    time.sleep(seconds)
