"""TeleChatInference admission: the apiserver itself (OpenAPI schema + CEL rules of the CRD) rejects bad resources
with a message naming the field, and accepts (and defaults) the samples. No operator is involved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ClusterHandle

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "telechat.io_telechatinferences.yaml"
SAMPLES = sorted((REPO / "operator" / "deploy" / "samples").glob("telechatinference-*.yaml"))


# Server-side dry runs persist nothing, so one existing namespace serves every case (no per-test namespace cost).
NAMESPACE = "default"


@pytest.fixture(scope="module")
def crd_installed(cluster: ClusterHandle) -> ClusterHandle:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/telechatinferences.telechat.io", "--timeout=60s")
    return cluster


def manifest(name: str = "valid", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "telechat2-7b",
        "image": "telechat-runtime:0.1.0",
        "checkpoint": {"path": "/models/telechat2-7b"},
    }
    for key, value in spec.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return {"apiVersion": "telechat.io/v1alpha1", "kind": "TeleChatInference", "metadata": {"name": name}, "spec": body}


def dry_run(cluster: ClusterHandle, namespace: str, body: dict[str, Any]) -> tuple[int, str]:
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-", input=yaml.safe_dump(body), check=False
    )
    return result.returncode, result.stdout if result.returncode == 0 else result.stderr


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("both checkpoint sources", manifest(checkpoint={"path": "/m", "fromFinetune": "ft"}),
     "spec.checkpoint must set exactly one of path or fromFinetune"),
    ("no checkpoint source", manifest(checkpoint={}), "spec.checkpoint must set exactly one of path or fromFinetune"),
    ("relative checkpoint path", manifest(checkpoint={"path": "models/x"}), "spec.checkpoint.path"),
    ("missing image", manifest(image=None), "spec.image: Required value"),
    ("unknown model", manifest(model="telechat2-1t"), "spec.model: Unsupported value"),
    ("3 NPUs per replica", manifest(devicesPerReplica=3), "spec.devicesPerReplica: Unsupported value"),
    ("negative replicas", manifest(replicas=-1), "spec.replicas"),
    ("zero nodes per replica", manifest(nodesPerReplica=0), "spec.nodesPerReplica"),
    ("input not below max", manifest(maxSeqLen=4096, maxInputTokenLen=4096),
     "spec.maxInputTokenLen must be less than spec.maxSeqLen"),
    ("max past seqLength", manifest(seqLength=16384, maxSeqLen=20000),
     "spec.maxSeqLen must not exceed spec.seqLength"),
    ("privileged port", manifest(port=80), "spec.port"),
    ("msrun port in a group", manifest(nodesPerReplica=2, devicesPerReplica=8, port=8118), "spec.port 8118"),
    ("mindie across nodes", manifest(backend="mindie", nodesPerReplica=2),
     "spec.nodesPerReplica must be 1 with backend mindie"),
    ("unknown backend", manifest(backend="vllm"), "spec.backend: Unsupported value"),
    ("ExternalName service", manifest(service={"type": "ExternalName"}), "spec.service.type: Unsupported value"),
    ("API key in env", manifest(env=[{"name": "TELECHAT_API_KEY", "value": "x"}]), "spec.env must not set"),
    ("duplicate env name", manifest(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
     "spec.env[1]: Duplicate value"),
    ("NPUs in resources", manifest(resources={"limits": {"huawei.com/Ascend910": "8"}}),
     "spec.resources must not set huawei.com/Ascend910"),
    ("reserved volume name", manifest(volumes=[{"name": "dshm", "emptyDir": {}}]), "spec.volumes must not use"),
    ("mount under the config", manifest(volumes=[{"name": "v", "emptyDir": {}}],
                                        volumeMounts=[{"name": "v", "mountPath": "/etc/telechat/x"}]),
     "spec.volumeMounts must not mount at or under"),
    ("mount over shared memory", manifest(volumes=[{"name": "v", "emptyDir": {}}],
                                          volumeMounts=[{"name": "v", "mountPath": "/dev/shm"}]),
     "spec.volumeMounts must not mount at or under"),
    ("resolve timeout in env", manifest(env=[{"name": "TELECHAT_RESOLVE_TIMEOUT", "value": "1"}]),
     "spec.env must not set"),
    ("secret without name", manifest(apiKeySecretRef={"key": "token"}), "spec.apiKeySecretRef.name: Required value"),
    ("name too long for host names", manifest(name="x" * 41), "metadata.name must be at most 40 characters"),
    ("name not a DNS-1035 label", manifest(name="7b-chat"), "metadata.name must be a DNS-1035 label"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_resource_is_rejected_naming_the_field(
    crd_installed: ClusterHandle, case: str, body: dict[str, Any], message: str
) -> None:
    code, output = dry_run(crd_installed, NAMESPACE, body)
    assert code != 0, f"{case}: the apiserver accepted it"
    assert message in output, f"{case}: {output}"


def test_minimal_resource_is_accepted_and_defaulted(crd_installed: ClusterHandle) -> None:
    code, output = dry_run(crd_installed, NAMESPACE, manifest())
    assert code == 0, output
    spec = json.loads(output)["spec"]
    assert (spec["replicas"], spec["nodesPerReplica"], spec["port"], spec["backend"]) == (1, 1, 1025, "telechat2")
    assert spec["service"] == {"type": "ClusterIP"} and spec["npuMemSize"] == 8


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_samples_are_accepted(crd_installed: ClusterHandle, sample: Path) -> None:
    for body in yaml.safe_load_all(sample.read_text()):
        if body and body["kind"] == "TeleChatInference":
            code, output = dry_run(crd_installed, NAMESPACE, body)
            assert code == 0, f"{sample.name}: {output}"
