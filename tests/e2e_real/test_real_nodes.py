"""Real nodes really run pods: scheduling by the Ascend resource, pod IPs on the bridge, cluster DNS (headless and
ClusterIP Services), kube-proxy's Service routing from pods and from the host, and the API server from a pod."""

from __future__ import annotations

import ipaddress
import json
import urllib.request

from tests.cluster import nodes
from tests.cluster.build import cache_root
from tests.cluster.controlplane import ClusterHandle
from tests.cluster.testimage import ensure_busybox_image
from tests.cluster.waiting import wait_for

WEB_PORT = 8080


def _image(cluster: ClusterHandle) -> str:
    """The busybox test image every real node was loaded with (its name is its content hash)."""
    return ensure_busybox_image(cache_root() / "images").name


def _pod(name: str, node: str, image: str, command: list[str], labels: dict[str, str], restart: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": {nodes.NODE_KIND_LABEL: nodes.REAL_NODE_KIND, "kubernetes.io/hostname": node},
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "resources": {"limits": {nodes.NPU_RESOURCE_NAME: "1"}},
                }
            ],
        },
    }


def _apply(cluster: ClusterHandle, namespace: str, *documents: dict) -> None:
    text = "\n---\n".join(json.dumps(document) for document in documents)
    cluster.kubectl("apply", f"--namespace={namespace}", "--filename=-", input=text)


def _get(cluster: ClusterHandle, namespace: str, kind: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", kind, name, f"--namespace={namespace}", "--output=json").stdout)


def test_real_nodes_are_ready_with_one_ascend_device_each(real_cluster: ClusterHandle) -> None:
    selector = f"--selector={nodes.NODE_KIND_LABEL}={nodes.REAL_NODE_KIND}"
    items = json.loads(real_cluster.kubectl("get", "nodes", selector, "--output=json").stdout)["items"]
    assert sorted(node["metadata"]["name"] for node in items) == [nodes.node_name(0), nodes.node_name(1)]
    for node in items:
        status = node["status"]
        assert any(c["type"] == "Ready" and c["status"] == "True" for c in status["conditions"])
        assert status["allocatable"][nodes.NPU_RESOURCE_NAME] == str(nodes.DEFAULT_NPUS)
        assert node["metadata"]["labels"]["accelerator-type"] == "module-910b-8"
        assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})


def test_pods_on_two_real_nodes_reach_each_other_through_dns_services_and_the_api_server(
    real_cluster: ClusterHandle, real_namespace: str
) -> None:
    image = _image(real_cluster)
    ns = real_namespace
    web = _pod(
        "web",
        nodes.node_name(0),
        image,
        ["/bin/httpd", "-f", "-p", str(WEB_PORT), "-h", "/www"],
        {"app": "web"},
        "Always",
    )
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web-ranks"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": WEB_PORT}]},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": WEB_PORT}]},
    }
    _apply(real_cluster, ns, web, headless, service)
    wait_for(
        lambda: _get(real_cluster, ns, "pod", "web").get("status", {}).get("podIP")
        and _get(real_cluster, ns, "pod", "web")["status"]["phase"] == "Running",
        "the web pod Running with an IP on real-node-0",
        timeout=120,
    )
    web_ip = _get(real_cluster, ns, "pod", "web")["status"]["podIP"]
    start, end = (ipaddress.ip_address(address) for address in nodes.node_range(0))
    assert start <= ipaddress.ip_address(web_ip) <= end

    domain = f"{ns}.svc.{nodes.CLUSTER_DOMAIN}"
    script = " && ".join(
        [
            f"nslookup web-ranks.{domain} {nodes.GATEWAY}",
            f"wget -q -O - http://web.{domain}/index.html",
            f"wget -q -O - --no-check-certificate https://kubernetes.default.svc.{nodes.CLUSTER_DOMAIN}/healthz",
            "echo",
            "echo client-done",
        ]
    )
    client = _pod("client", nodes.node_name(1), image, ["/bin/sh", "-c", script], {"app": "client"}, "OnFailure")
    _apply(real_cluster, ns, client)

    def finished() -> str | None:
        pod = _get(real_cluster, ns, "pod", "client")
        statuses = pod.get("status", {}).get("containerStatuses", [])
        done = pod.get("status", {}).get("phase") == "Succeeded"
        return pod["status"]["phase"] if done or (statuses and statuses[0].get("restartCount", 0) > 3) else None

    phase = wait_for(finished, "the client pod on real-node-1 to finish", timeout=180)
    logs = real_cluster.kubectl("logs", "client", f"--namespace={ns}").stdout
    assert phase == "Succeeded", logs
    assert web_ip in logs  # the headless Service's record is the web pod
    assert "telechat-busybox" in logs  # through the ClusterIP Service (kube-proxy), by its DNS name
    assert "ok" in logs.splitlines()  # the API server's /healthz through the `kubernetes` Service
    assert "client-done" in logs
    client_ip = _get(real_cluster, ns, "pod", "client")["status"]["podIP"]
    start, end = (ipaddress.ip_address(address) for address in nodes.node_range(1))
    assert start <= ipaddress.ip_address(client_ip) <= end

    cluster_ip = _get(real_cluster, ns, "service", "web")["spec"]["clusterIP"]
    with urllib.request.urlopen(f"http://{cluster_ip}/index.html", timeout=10) as response:  # from the host
        assert response.read().decode().strip() == "telechat-busybox"
