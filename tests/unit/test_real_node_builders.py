"""The real-node mode's pure builders and its bad-setup messages (no root effects: nothing here touches the host)."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import itertools
import json
import tarfile
import tomllib
from pathlib import Path

import pytest

from tests.cluster import nodes
from tests.cluster.components import COMPONENTS_BY_NAME, GOMOD_DIR, NODE_COMPONENTS, pinned_version
from tests.cluster.controlplane import LocalCluster, stop_rank
from tests.cluster.errors import ClusterError
from tests.cluster.testimage import docker_archive


def test_node_ranges_are_disjoint_inside_the_pod_cidr_and_skip_the_gateway() -> None:
    network = ipaddress.ip_network(nodes.POD_CIDR)
    ranges = [nodes.node_range(index) for index in range(4)]
    spans = [(ipaddress.ip_address(start), ipaddress.ip_address(end)) for start, end in ranges]
    for start, end in spans:
        assert start in network and end in network and start < end
        assert not start <= ipaddress.ip_address(nodes.GATEWAY) <= end
    for (_, first_end), (second_start, _) in itertools.pairwise(spans):
        assert first_end < second_start
    assert ipaddress.ip_address(nodes.GATEWAY) in network
    assert network.is_private


def test_node_range_refuses_more_nodes_than_the_cidr_holds() -> None:
    with pytest.raises(ValueError, match="room for 3 real nodes"):
        nodes.node_range(3, "10.213.0.0/22")


def test_cni_conflist_uses_the_shared_bridge_its_own_range_and_no_masquerade(tmp_path: Path) -> None:
    conflist = nodes.cni_conflist(1, tmp_path / "data")
    plugin = conflist["plugins"][0]
    assert plugin["type"] == "bridge" and plugin["bridge"] == nodes.BRIDGE
    assert plugin["ipMasq"] is False
    (range_,) = plugin["ipam"]["ranges"][0]
    assert (range_["rangeStart"], range_["rangeEnd"]) == nodes.node_range(1)
    assert range_["gateway"] == nodes.GATEWAY and range_["subnet"] == nodes.POD_CIDR
    assert plugin["ipam"]["dataDir"] == str(tmp_path / "data")


def test_containerd_config_keeps_every_path_under_the_node_dir(tmp_path: Path) -> None:
    node_dir = tmp_path / "real-node-0"
    config = tomllib.loads(nodes.containerd_config(node_dir, "localhost/pause:3.10"))
    assert config["version"] == 2
    for path in (config["root"], config["state"], config["grpc"]["address"], config["ttrpc"]["address"]):
        assert Path(path).is_relative_to(node_dir)
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "localhost/pause:3.10"
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False
    assert Path(cri["cni"]["conf_dir"]).is_relative_to(node_dir)


def test_kubelet_configs_of_two_nodes_do_not_share_cgroups_ports_or_dirs(tmp_path: Path) -> None:
    configs = [
        nodes.kubelet_config(
            nodes.node_name(index),
            tmp_path / str(index),
            tmp_path / "ca.crt",
            nodes.NodePorts(1000 + index, 2000 + index),
            tmp_path / "resolv.conf",
        )
        for index in range(2)
    ]
    assert configs[0]["cgroupRoot"] != configs[1]["cgroupRoot"]
    assert configs[0]["port"] != configs[1]["port"]
    assert configs[0]["containerRuntimeEndpoint"] != configs[1]["containerRuntimeEndpoint"]
    for config in configs:
        assert config["cgroupDriver"] == "cgroupfs" and config["failCgroupV1"] is False
        assert config["clusterDNS"] == [nodes.GATEWAY] and config["address"] == nodes.GATEWAY
        assert config["readOnlyPort"] == 0
        assert Path(config["podLogsDir"]).is_relative_to(tmp_path)  # never the host's /var/log/pods
        assert Path(config["volumePluginDir"]).is_relative_to(tmp_path)
        # The disk is shared with the whole machine: eviction only when it is really full, never by a percentage.
        assert config["evictionHard"]["nodefs.available"] == config["evictionHard"]["imagefs.available"] == "256Mi"
        assert config["imageGCHighThresholdPercent"] == 100  # imported images cannot be pulled again


def test_real_mode_api_server_binds_the_bridge_and_reaches_kubelets_by_ip(tmp_path: Path) -> None:
    from tests.cluster import render

    ports = render.Ports(1, 2, 3, 4, 5, 6)
    command = render.apiserver_command(
        Path("kube-apiserver"), tmp_path, ports, nodes.GATEWAY, tmp_path, nodes.GATEWAY, kubelet_by_ip=True
    )
    assert f"--bind-address={nodes.GATEWAY}" in command
    assert "--kubelet-preferred-address-types=InternalIP" in command
    fake_only = render.apiserver_command(Path("kube-apiserver"), tmp_path, ports, None, tmp_path)
    assert "--bind-address=127.0.0.1" in fake_only
    assert not any(arg.startswith("--kubelet-preferred-address-types") for arg in fake_only)


def test_kubelet_command_names_the_node_and_labels_it_real(tmp_path: Path) -> None:
    command = nodes.kubelet_command(Path("/bin/kubelet"), "real-node-1", tmp_path, nodes.node_labels(1))
    assert "--hostname-override=real-node-1" in command
    labels = next(arg for arg in command if arg.startswith("--node-labels="))
    assert f"{nodes.NODE_KIND_LABEL}={nodes.REAL_NODE_KIND}" in labels
    assert "accelerator-type=module-910b-8" in labels


def test_corefile_serves_cluster_local_on_the_bridge_only(tmp_path: Path) -> None:
    text = nodes.corefile(tmp_path / "kubeconfig", 1111, 2222)
    assert text.startswith("cluster.local:53")
    assert f"bind {nodes.GATEWAY}" in text
    assert f"kubeconfig {tmp_path / 'kubeconfig'}" in text
    assert "forward" not in text  # no upstream: nothing resolves past the cluster


def test_kube_proxy_keeps_node_ports_on_the_bridge_and_masquerades_service_traffic(tmp_path: Path) -> None:
    config = nodes.kube_proxy_config(tmp_path / "kubeconfig", 1, 2)
    assert config["mode"] == "iptables"
    assert config["nodePortAddresses"] == [f"{nodes.GATEWAY}/32"]
    assert config["iptables"]["masqueradeAll"] is True
    assert config["healthzBindAddress"] == "127.0.0.1:1"


def test_npu_status_patch_escapes_the_resource_name() -> None:
    patch = nodes.npu_status_patch(2)
    assert {op["path"] for op in patch} == {
        "/status/capacity/huawei.com~1Ascend910",
        "/status/allocatable/huawei.com~1Ascend910",
    }
    assert all(op["value"] == "2" for op in patch)


def test_forward_rules_accept_bridge_to_bridge_and_drop_everything_leaving_it() -> None:
    rules = nodes.forward_rules()
    assert rules[0] == ["-N", nodes.FORWARD_CHAIN]
    accept = rules.index(["-A", nodes.FORWARD_CHAIN, "-i", nodes.BRIDGE, "-o", nodes.BRIDGE, "-j", "ACCEPT"])
    drop_out = rules.index(["-A", nodes.FORWARD_CHAIN, "-i", nodes.BRIDGE, "-j", "DROP"])
    assert accept < drop_out
    assert ["-A", nodes.FORWARD_CHAIN, "-o", nodes.BRIDGE, "-j", "DROP"] in rules
    assert rules[-1] == ["-I", "FORWARD", "1", "-j", nodes.FORWARD_CHAIN]
    assert [rule[0] for rule in nodes.forward_cleanup_rules()] == ["-D", "-F", "-X"]


def test_preflight_names_a_missing_containerd_binary() -> None:
    tools = nodes.Tools(containerd="/missing/containerd")
    problems = nodes.preflight_problems(tools, euid=0)
    assert ("containerd", "/missing/containerd not found or not executable (Debian package containerd)") in problems


def test_preflight_names_missing_cni_plugins_and_cgroups(tmp_path: Path) -> None:
    tools = nodes.Tools(cni_bin_dir=tmp_path / "cni", cgroup_mount=tmp_path / "no-cgroup")
    components = [component for component, _ in nodes.preflight_problems(tools, euid=0)]
    assert components.count("cni") == 3
    assert "cgroup" in components


def test_preflight_asks_for_root() -> None:
    assert nodes.preflight_problems(nodes.Tools(), euid=1000)[0][0] == "real-nodes"


def test_cgroup_problem_lists_missing_v1_controllers(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cgroup.procs").write_text("")
    problem = nodes.cgroup_problem(tmp_path)
    assert problem is not None and "no memory, pids cgroup controller" in problem
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    assert nodes.cgroup_problem(tmp_path) is None  # a unified (v2) hierarchy will do


def test_real_cluster_start_fails_on_a_missing_containerd_before_starting_anything(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "state", real_nodes=2, tools=nodes.Tools(containerd="/missing/containerd"))
    with pytest.raises(ClusterError) as raised:
        cluster.start({})
    assert "/missing/containerd not found" in str(raised.value)
    assert cluster.processes == []
    assert not (tmp_path / "state" / nodes.NODES_DIR / nodes.NETWORK_FILE).exists()  # no bridge was made


def test_real_cluster_start_names_the_cgroup_mount(tmp_path: Path) -> None:
    tools = nodes.Tools(cgroup_mount=tmp_path / "no-cgroup")
    with pytest.raises(ClusterError, match="no-cgroup does not exist"):
        LocalCluster(tmp_path / "state", real_nodes=1, tools=tools).start({})


def test_mounts_under_finds_nested_mounts_deepest_first(tmp_path: Path) -> None:
    base = tmp_path / "nodes"
    mountinfo = "\n".join(
        [
            f"30 1 0:1 / {base}/real-node-0/kubelet/root/pods/x/volumes/tok rw - tmpfs tmpfs rw",
            f"31 1 0:2 / {base}/real-node-0/containerd/state/shm rw - tmpfs shm rw",
            f"32 1 0:3 / {tmp_path}/elsewhere rw - tmpfs tmpfs rw",
            f"33 1 0:4 / {base}/with\\040space rw - tmpfs tmpfs rw",
        ]
    )
    found = nodes.mounts_under(base, mountinfo)
    assert found[0] == base / "real-node-0/kubelet/root/pods/x/volumes/tok"
    assert set(found) == {
        base / "real-node-0/kubelet/root/pods/x/volumes/tok",
        base / "real-node-0/containerd/state/shm",
        base / "with space",
    }


def test_remove_nodes_dir_refuses_while_a_mount_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / nodes.NODES_DIR / "real-node-0").mkdir(parents=True)
    monkeypatch.setattr(nodes, "mounts_under", lambda directory: [directory / "real-node-0" / "shm"])
    with pytest.raises(ClusterError, match="still has mounts"):
        nodes.remove_nodes_dir(tmp_path)
    assert (tmp_path / nodes.NODES_DIR / "real-node-0").is_dir()


def test_stop_order_puts_the_node_daemons_before_the_control_plane() -> None:
    names = ["etcd", "kube-apiserver", "containerd-real-node-0", "kubelet-real-node-1", "coredns", "kube-proxy", "kwok"]
    ordered = sorted(names, key=stop_rank)
    assert ordered == [
        "kube-proxy",
        "coredns",
        "kubelet-real-node-1",
        "containerd-real-node-0",
        "kwok",
        "kube-apiserver",
        "etcd",
    ]


def test_node_binaries_pin_the_same_kubernetes_as_the_control_plane() -> None:
    control_plane = pinned_version(GOMOD_DIR / "kubernetes" / "go.mod", "k8s.io/kubernetes")
    assert COMPONENTS_BY_NAME["kubelet"].version() == control_plane
    assert COMPONENTS_BY_NAME["kube-proxy"].version() == control_plane
    assert {component.name for component in NODE_COMPONENTS} == {"kubelet", "kube-proxy", "coredns"}


def test_busybox_archive_is_a_loadable_docker_archive() -> None:
    data, name = docker_archive(b"\x7fELF fake busybox", "abc123")
    assert name == "localhost/telechat-busybox:abc123"
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        (manifest,) = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert manifest["RepoTags"] == [name]
        config = json.loads(archive.extractfile(manifest["Config"]).read())  # type: ignore[union-attr]
        layer = archive.extractfile(manifest["Layers"][0]).read()  # type: ignore[union-attr]

    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(layer)) as rootfs:
        names = rootfs.getnames()
        assert rootfs.extractfile("bin/busybox").read() == b"\x7fELF fake busybox"  # type: ignore[union-attr]
    assert {"bin/sh", "bin/nslookup", "bin/wget", "bin/httpd"} <= set(names)
    assert docker_archive(b"\x7fELF fake busybox", "abc123")[0] == data  # deterministic: cacheable by content


def test_setup_network_refuses_an_existing_bridge_naming_its_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodes, "link_exists", lambda name: name == nodes.BRIDGE)
    monkeypatch.setattr(nodes, "_bridge_owner", lambda: "/somewhere/.cluster/pytest-1-real")
    with pytest.raises(ClusterError) as raised:
        nodes.setup_network(tmp_path)
    message = str(raised.value)
    assert message.startswith(f"network: bridge {nodes.BRIDGE} already exists")
    assert "/somewhere/.cluster/pytest-1-real" in message and "tests.cluster down" in message
    assert not (tmp_path / nodes.NODES_DIR / nodes.NETWORK_FILE).exists()  # nothing recorded, nothing to undo


def test_cleanup_of_a_dir_without_real_nodes_does_nothing(tmp_path: Path) -> None:
    nodes.cleanup_state_dir(tmp_path)  # no nodes dir: must not touch the host
    (tmp_path / nodes.NODES_DIR).mkdir()
    nodes.cleanup_state_dir(tmp_path, tools=nodes.Tools(cgroup_mount=tmp_path / "no-cgroup"))
    assert (tmp_path / nodes.NODES_DIR).is_dir()
