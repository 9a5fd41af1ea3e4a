"""Unit tests of the local cluster tooling's pure parts (and of the build cache, with a tiny real Go module)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.cluster import build, controlplane, pki, procs, render
from tests.cluster.__main__ import main as cluster_main
from tests.cluster.components import COMPONENTS_BY_NAME, Component, pinned_version
from tests.cluster.controlplane import LocalCluster
from tests.cluster.errors import ClusterError

# -- ports -----------------------------------------------------------------------------------------------------


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = render.free_ports(render.PORT_COUNT)
    assert len(set(ports)) == render.PORT_COUNT
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_free_ports_skip_a_port_in_use() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert taken not in render.free_ports(50)


# -- versions and build cache ---------------------------------------------------------------------------------


def test_pinned_version_reads_block_and_single_line_requires(tmp_path: Path) -> None:
    go_mod = tmp_path / "go.mod"
    go_mod.write_text("module x\n\nrequire (\n\tk8s.io/kubernetes v1.34.4\n\tk8s.io/api v0.34.4 // indirect\n)\n")
    assert pinned_version(go_mod, "k8s.io/kubernetes") == "v1.34.4"
    go_mod.write_text("module x\n\nrequire sigs.k8s.io/kwok v0.7.0\n")
    assert pinned_version(go_mod, "sigs.k8s.io/kwok") == "v0.7.0"
    with pytest.raises(ValueError, match="no require line for helm.sh/helm/v3"):
        pinned_version(go_mod, "helm.sh/helm/v3")


def test_kubernetes_ldflags_stamp_the_pinned_version() -> None:
    apiserver = COMPONENTS_BY_NAME["kube-apiserver"]
    version = apiserver.version()
    major, minor = version.removeprefix("v").split(".")[:2]
    flags = apiserver.rendered_ldflags()
    assert f"-X k8s.io/component-base/version.gitVersion={version}" in flags
    assert f"version.gitMajor={major} " in flags
    assert f"version.gitMinor={minor} " in flags


def test_cache_key_changes_with_each_input() -> None:
    base = build.cache_key(b"mod", b"sum", "-s -w")
    assert base == build.cache_key(b"mod", b"sum", "-s -w")
    assert base != build.cache_key(b"mod", b"sum2", "-s -w")
    assert base != build.cache_key(b"mod2", b"sum", "-s -w")
    assert base != build.cache_key(b"mod", b"sum", "-s")
    assert build.cache_key(b"ab", b"c", "") != build.cache_key(b"a", b"bc", "")  # parts cannot run together


TOY_MAIN = """package main

import (
\t"fmt"
\t"os"
)

var version = "unset"

func main() {
\tif len(os.Args) > 1 && os.Args[1] == "--version" {
\t\tfmt.Println("toy", version)
\t}
}
"""


@pytest.fixture
def toy(tmp_path: Path) -> Component:
    """A one-file Go module built exactly like the real components (no dependencies: builds in a second)."""
    if shutil.which("go") is None:
        pytest.skip("needs the Go toolchain")
    module = tmp_path / "gomod" / "toy"
    module.mkdir(parents=True)
    # The pin lives in a `require` line like the real modules'; a local replace keeps the build offline.
    (module / "go.mod").write_text(
        "module example.com/toy\n\ngo 1.22\n\nrequire example.com/pinned v1.2.3\n\n"
        "replace example.com/pinned => ./pinned\n"
    )
    (module / "go.sum").write_text("")
    (module / "pinned").mkdir()
    (module / "pinned" / "go.mod").write_text("module example.com/pinned\n\ngo 1.22\n")
    (module / "main.go").write_text(TOY_MAIN)
    return Component(
        name="toy",
        module_dir="toy",
        module="example.com/pinned",
        package=".",
        ldflags=("-X main.version={version}",),
        gomod_dir=tmp_path / "gomod",
    )


def test_build_caches_and_a_second_run_builds_nothing(toy: Component, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    logs: list[str] = []
    binary = build.ensure_built([toy], root=cache, log=logs.append)["toy"]
    assert subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout == "toy v1.2.3\n"
    marker = json.loads((binary.parent / build.MARKER_NAME).read_text())
    assert marker["component"] == "toy" and marker["reported"] == "toy v1.2.3"
    assert binary.parent.name.startswith("toy-v1.2.3-")
    logs.clear()
    mtime = binary.stat().st_mtime_ns
    assert build.ensure_built([toy], root=cache, log=logs.append)["toy"] == binary
    assert logs == [] and binary.stat().st_mtime_ns == mtime


def test_a_half_written_build_is_detected_and_redone(toy: Component, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = build.entry_dir(toy, cache)
    entry.mkdir(parents=True)
    (entry / "toy").write_bytes(b"\x7fELF truncated")  # what a killed build could leave: no marker
    assert not build.is_complete(entry, "toy")
    logs: list[str] = []
    binary = build.ensure_built([toy], root=cache, log=logs.append)["toy"]
    assert any("removing unfinished build" in line for line in logs)
    assert build.is_complete(entry, "toy")
    assert subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout == "toy v1.2.3\n"
    assert [path.name for path in entry.parent.iterdir()] == [entry.name]  # no staging directory left behind


def test_a_pin_change_lands_in_a_new_entry(toy: Component, tmp_path: Path) -> None:
    before = build.entry_dir(toy, tmp_path)
    (toy.module_path / "go.sum").write_text("example.com/dep v1.0.0 h1:abc=\n")
    assert build.entry_dir(toy, tmp_path) != before


def test_a_failed_build_names_the_component_and_its_log(toy: Component, tmp_path: Path) -> None:
    (toy.module_path / "main.go").write_text("package main\n\nfunc main() { undefined() }\n")
    cache = tmp_path / "cache"
    with pytest.raises(ClusterError) as caught:
        build.ensure_built([toy], root=cache, log=lambda message: None)
    assert caught.value.component == "toy"
    assert caught.value.log_path is not None and "undefined" in caught.value.log_path.read_text()
    assert str(caught.value.log_path) in str(caught.value)
    assert not build.entry_dir(toy, cache).exists()


def test_a_missing_go_is_one_clear_error(toy: Component, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ClusterError, match="Go toolchain is not on PATH") as caught:
        build.ensure_built([toy], root=tmp_path / "cache", log=lambda message: None)
    assert caught.value.component == "go"


def test_bin_dir_links_are_replaced(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text("1")
    second.write_text("2")
    bin_dir = build.link_bin_dir(tmp_path / "bin", {"kubectl": first})
    build.link_bin_dir(bin_dir, {"kubectl": second})
    assert (bin_dir / "kubectl").read_text() == "2"


# -- kwok stages, nodes, kubeconfig -----------------------------------------------------------------------------


def test_kwok_config_has_our_stages_and_not_pod_complete() -> None:
    stages = render.kwok_config_documents()
    names = {stage["metadata"]["name"] for stage in stages}
    assert {"node-initialize", "node-heartbeat", "pod-ready", "pod-delete"} <= names
    assert {"pod-fake-succeeded", "pod-fake-failed"} <= names
    assert "pod-complete" not in names  # it would complete pods without being asked
    assert all(stage["apiVersion"] == "kwok.x-k8s.io/v1alpha1" for stage in stages)
    by_name = {stage["metadata"]["name"]: stage for stage in stages}
    failed = by_name["pod-fake-failed"]["spec"]
    keys = {expression["key"]: expression.get("values") for expression in failed["selector"]["matchExpressions"]}
    assert keys['.metadata.annotations["telechat.io/fake-phase"]'] == ["Failed"]
    assert keys[".status.phase"] == ["Running"]
    assert "telechat.io/fake-exit-code" in failed["next"]["statusTemplate"]
    # The rendered multi-document config parses back to the same stages.
    assert list(yaml.safe_load_all(render.render_yaml_documents(stages))) == stages


def test_kwok_config_rejects_a_document_that_is_not_a_stage(tmp_path: Path) -> None:
    bad = tmp_path / "stages.yaml"
    bad.write_text("kind: Stage\nmetadata: {name: ok}\n---\nkind: Pod\nmetadata: {name: nope}\n")
    with pytest.raises(ValueError, match=r"stages.yaml: document 2 is not a named kwok Stage"):
        render.kwok_config_documents(bad)


def test_fake_nodes_carry_npus_labels_and_the_kwok_annotation() -> None:
    nodes = render.fake_nodes(5)
    assert [node["metadata"]["name"] for node in nodes] == [f"ascend-node-{index}" for index in range(5)]
    for node in nodes:
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        labels = node["metadata"]["labels"]
        assert labels["accelerator-type"] == "module-910b-8"
        assert labels["host-arch"] == "huawei-arm"
        assert labels["kubernetes.io/hostname"] == node["metadata"]["name"]
        assert node["status"]["allocatable"]["huawei.com/Ascend910"] == "8"
        assert node["status"]["capacity"]["huawei.com/Ascend910"] == "8"
    with pytest.raises(ValueError, match="--nodes must be at least 1"):
        render.fake_nodes(0)


def test_kwok_manages_only_annotated_nodes() -> None:
    ports = render.Ports.from_list(list(range(1, 7)))
    command = render.kwok_command(Path("/bin/kwok"), Path("/k"), Path("/c.yaml"), ports)
    assert "--manage-all-nodes=false" in command
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in command
    assert "--config=/c.yaml" in command


def test_kubeconfig_embeds_credentials() -> None:
    config = render.kubeconfig("https://127.0.0.1:6443", b"CA", b"CERT", b"KEY", user="admin")
    cluster = config["clusters"][0]["cluster"]
    user = config["users"][0]["user"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    assert base64.b64decode(user["client-certificate-data"]) == b"CERT"
    assert base64.b64decode(user["client-key-data"]) == b"KEY"
    context = config["contexts"][0]
    assert config["current-context"] == context["name"]
    assert context["context"] == {"cluster": config["clusters"][0]["name"], "user": "admin"}


ROUTES_WITH_DEFAULT = "Iface\tDestination\tGateway\neth0\t00000000\t010200C0\neth0\t000200C0\t00000000\n"
ROUTES_WITHOUT_DEFAULT = "Iface\tDestination\tGateway\neth0\t000200C0\t00000000\n"
FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
           |-- 127.0.0.1
              /32 host LOCAL
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
"""


def test_advertise_address_only_without_a_default_route() -> None:
    assert render.choose_advertise_address(ROUTES_WITH_DEFAULT, FIB_TRIE) is None
    assert render.choose_advertise_address(ROUTES_WITHOUT_DEFAULT, FIB_TRIE) == "192.0.2.2"
    assert render.choose_advertise_address(ROUTES_WITHOUT_DEFAULT, "") == "127.0.0.1"


def test_loopback_advertise_address_disables_the_endpoint_reconciler() -> None:
    ports = render.Ports.from_list(list(range(1, 7)))
    loopback = render.apiserver_command(Path("/a"), Path("/pki"), ports, "127.0.0.1", Path("/c"))
    assert "--endpoint-reconciler-type=none" in loopback
    routed = render.apiserver_command(Path("/a"), Path("/pki"), ports, "192.0.2.2", Path("/c"))
    assert "--advertise-address=192.0.2.2" in routed and "--endpoint-reconciler-type=none" not in routed
    assert not any(
        flag.startswith("--advertise-address")
        for flag in render.apiserver_command(Path("/a"), Path("/pki"), ports, None, Path("/c"))
    )


# -- certificates -----------------------------------------------------------------------------------------------


def test_pki_serving_and_client_certificates(tmp_path: Path) -> None:
    paths = pki.write_pki(tmp_path, ["127.0.0.1", "10.96.0.1"], ["localhost", "kubernetes"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    serving = x509.load_pem_x509_certificate(paths["apiserver.crt"].read_bytes())
    serving.verify_directly_issued_by(ca)
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.96.0.1"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "kubernetes"}
    admin = x509.load_pem_x509_certificate(paths["admin.crt"].read_bytes())
    admin.verify_directly_issued_by(ca)
    assert [a.value for a in admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["system:masters"]
    usage = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    assert paths["admin.key"].stat().st_mode & 0o077 == 0
    assert b"PUBLIC KEY" in paths["service-account.pub"].read_bytes()


# -- processes --------------------------------------------------------------------------------------------------


def test_reap_stops_what_a_previous_run_left(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids.json"
    sleeper = procs.start_process("sleeper", ["sleep", "60"], tmp_path / "logs" / "sleeper.log")
    procs.write_pidfile(pidfile, [sleeper])
    assert procs.owner_alive(pidfile)
    recorded = procs.read_pidfile(pidfile)
    assert [(p.name, p.pid) for p in recorded] == [("sleeper", sleeper.pid)]
    assert recorded[0].alive()
    started = time.monotonic()
    assert procs.reap(pidfile) == 1
    assert time.monotonic() - started < 5
    assert not recorded[0].alive() and not pidfile.exists()
    assert sleeper.popen is not None and sleeper.popen.poll() is not None


def test_a_recycled_pid_is_not_ours(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids.json"
    (tmp_path / "pids.json").write_text(
        json.dumps({"owner": {}, "processes": [{"name": "x", "pid": 1, "start_time": "0", "log": "/x"}]})
    )
    assert not procs.read_pidfile(pidfile)[0].alive()  # pid 1 exists but started at another time
    assert procs.reap(pidfile) == 0


# -- start-up faults ------------------------------------------------------------------------------------------


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _fake_binaries(tmp_path: Path, etcd_body: str) -> dict[str, Path]:
    idle = _script(tmp_path / "idle", "sleep 60")
    binaries = {name: idle for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")}
    binaries["kubectl"] = idle
    binaries["etcd"] = _script(tmp_path / "etcd", etcd_body)
    return binaries


def test_a_component_that_crashes_is_named_with_its_log(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "state", die_with_parent=True)
    binaries = _fake_binaries(tmp_path, "echo 'etcd: bad flag --foo' >&2; exit 3")
    with pytest.raises(ClusterError) as caught:
        cluster.start(binaries)
    error = caught.value
    assert error.component == "etcd"
    assert error.log_path == tmp_path / "state" / "logs" / "etcd.log"
    assert "exited (code 3)" in str(error) and "bad flag --foo" in str(error)
    assert cluster.processes == [] and not cluster.pidfile.exists()


def test_a_component_that_never_gets_ready_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controlplane, "READY_TIMEOUT", 1.0)
    cluster = LocalCluster(tmp_path / "state", die_with_parent=True)
    binaries = _fake_binaries(tmp_path, "echo 'etcd: waiting forever' >&2; exec sleep 60")
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"etcd: not ready within 1s \(log: .*etcd.log\)") as caught:
        cluster.start(binaries)
    assert "waiting forever" in str(caught.value)
    assert time.monotonic() - started < 15
    assert cluster.processes == []


# -- `down` without a pidfile ---------------------------------------------------------------------------------


def _sleeper(*args: str) -> list[str]:
    """A real short-lived process whose command line carries `args` (as a component's flags would)."""
    return [sys.executable, "-c", "import time; time.sleep(60)", *args]


def test_down_stops_the_cluster_and_dev_operator_even_without_pids_json(tmp_path: Path) -> None:
    state = (tmp_path / "state").resolve()
    state.mkdir()
    logs = tmp_path / "logs"
    # What `up` and operator/deploy/dev-up.sh leave running; pids.json is gone (the reported bug).
    etcd = procs.start_process("etcd", _sleeper(f"--data-dir={state}/etcd-data"), logs / "etcd.log", None, True)
    kwok = procs.start_process(
        "kwok", _sleeper(f"--kubeconfig={state}/kubeconfigs/kwok.kubeconfig"), logs / "kwok.log", None, True
    )
    # The dev operator: started with `nohup ... &` (not a process-group leader), known only through operator.pid.
    operator = subprocess.Popen(_sleeper(), stdout=subprocess.DEVNULL)
    (state / "operator.pid").write_text(f"{operator.pid}\n")
    # Not this state dir's: a pytest session's cluster nested in it, a command naming the dir itself, and a pid file
    # older than its process (a recycled pid).
    nested = procs.start_process(
        "nested", _sleeper(f"--data-dir={state}/pytest-1/etcd-data"), logs / "nested.log", None, True
    )
    naming_dir = procs.start_process("cli", _sleeper("--state-dir", str(state)), logs / "cli.log", None, True)
    recycled = subprocess.Popen(_sleeper(), stdout=subprocess.DEVNULL)
    (state / "stale.pid").write_text(f"{recycled.pid}\n")
    os.utime(state / "stale.pid", (time.time() - 3600, time.time() - 3600))
    try:
        assert not (state / "pids.json").exists()
        assert cluster_main(["down", "--state-dir", str(state)]) == 0
        for process in (etcd, kwok):
            assert process.popen is not None and process.popen.wait(timeout=5) is not None
        assert operator.wait(timeout=5) is not None
        assert not (state / "operator.pid").exists()
        assert nested.alive() and naming_dir.alive() and recycled.poll() is None
    finally:
        procs.terminate([etcd, kwok, nested, naming_dir])
        for popen in (operator, recycled):
            popen.kill()
            popen.wait()


def test_down_with_a_pidfile_also_stops_unrecorded_leftovers(tmp_path: Path) -> None:
    state = (tmp_path / "state").resolve()
    state.mkdir()
    recorded = procs.start_process("etcd", _sleeper(f"--data-dir={state}/etcd-data"), tmp_path / "a.log", None, True)
    procs.write_pidfile(state / "pids.json", [recorded])
    # E.g. a second `up` racing on the same dir overwrote pids.json: this one is in no pidfile.
    orphan = procs.start_process(
        "kube-apiserver", _sleeper(f"--tls-cert-file={state}/pki/apiserver.crt"), tmp_path / "b.log", None, True
    )
    try:
        assert cluster_main(["down", "--state-dir", str(state)]) == 0
        assert not recorded.alive() and not orphan.alive()
        assert not (state / "pids.json").exists()
    finally:
        procs.terminate([recorded, orphan])


def test_stopping_a_cluster_leaves_a_pidfile_another_run_wrote(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "state", die_with_parent=True)
    cluster.state_dir.mkdir()
    cluster.pidfile.write_text(json.dumps({"owner": {"pid": os.getppid()}, "processes": []}))
    cluster.stop()
    assert cluster.pidfile.exists()  # a second `up` on the same dir wrote it: `down` needs it to find that cluster
    procs.write_pidfile(cluster.pidfile, [])
    cluster.stop()
    assert not cluster.pidfile.exists()
