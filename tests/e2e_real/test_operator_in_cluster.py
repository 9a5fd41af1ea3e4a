"""The operator runs in-cluster from its locally built image (wt-images' images.py), installed by the Helm chart,
on a real node: its pod really starts and talks to the API server through the `kubernetes` Service."""

from __future__ import annotations

from tests.cluster import images, nodes
from tests.cluster.controlplane import ClusterHandle


def test_operator_chart_runs_the_operator_image_on_a_real_node(real_cluster: ClusterHandle) -> None:
    refs = images.ensure_images(["operator"])
    for index in range(2):
        socket = real_cluster.state_dir / nodes.NODES_DIR / nodes.node_name(index) / "containerd" / "containerd.sock"
        images.import_images(str(socket), refs)
    values = {"nodeSelector": {nodes.NODE_KIND_LABEL: nodes.REAL_NODE_KIND}}
    release = images.install_operator_chart(real_cluster, refs["operator"], values, timeout=300)
    try:
        selector = f"--selector=app.kubernetes.io/instance={release.release}"
        pods = real_cluster.kubectl(
            "get",
            "pods",
            f"--namespace={release.namespace}",
            selector,
            "--output=jsonpath={range .items[*]}{.spec.nodeName} {.status.phase} {.status.podIP}{'\\n'}{end}",
        ).stdout.split("\n")
        running = [line.split() for line in pods if line.strip()]
        assert running, "no operator pod"
        for node, phase, ip in running:
            assert node.startswith(nodes.REAL_NODE_PREFIX) and phase == "Running" and ip.startswith("10.213.")
    finally:
        images.uninstall_operator_chart(real_cluster, release)
