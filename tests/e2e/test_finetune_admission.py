"""Invalid TeleChatFinetunes are refused by the real apiserver at admission (OpenAPI schema + CEL rules of the
CRD), with a message naming the field; no operator is involved."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.controlplane import ClusterHandle
from tests.e2e.finetune_harness import finetune, install


@pytest.fixture(scope="module")
def installed(cluster: ClusterHandle) -> ClusterHandle:
    install(cluster)
    return cluster


@pytest.fixture(scope="module")
def namespace(installed: ClusterHandle) -> Iterator[str]:
    """One namespace for the module: admission needs no pods, so no ServiceAccount wait either."""
    name = f"admission-{uuid.uuid4().hex[:8]}"
    installed.kubectl("create", "namespace", name)
    yield name
    installed.kubectl("delete", "namespace", name, "--wait=false", check=False)


def with_spec(**changes: Any) -> dict[str, Any]:
    return finetune("bad", **changes)


def renamed(name: str, **changes: Any) -> dict[str, Any]:
    return finetune(name, **changes)


LAYOUT_2 = {"dataParallel": 2, "modelParallel": 1, "pipelineStage": 1, "microBatchNum": 1}
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("unknown model", with_spec(model="telechat2-1t"), "spec.model"),
    ("missing image", with_spec(image=None), "spec.image"),
    ("missing dataset", with_spec(dataset=None), "spec.dataset"),
    ("relative output path", with_spec(output={"path": "out"}), "spec.output.path"),
    ("zero nodes", with_spec(nodes=0, parallel=None), "spec.nodes"),
    ("too many nodes", with_spec(nodes=5000, parallel=None), "spec.nodes"),
    ("3 devices per node", with_spec(devicesPerNode=3), "spec.devicesPerNode"),
    ("layout product", with_spec(parallel={**LAYOUT_2, "dataParallel": 4}), "spec.parallel"),
    (
        "micro batches below pipeline stages",
        with_spec(parallel={**LAYOUT_2, "dataParallel": 1, "pipelineStage": 2, "microBatchNum": 1}),
        "spec.parallel.microBatchNum",
    ),
    ("layout without nodes", with_spec(nodes=None, parallel=LAYOUT_2), "spec.parallel"),
    ("reserved env", with_spec(env=[{"name": "MS_WORKER_NUM", "value": "1"}]), "spec.env"),
    ("duplicate env", with_spec(env=[{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]), "spec.env[1]"),
    ("NPU in resources", with_spec(resources={"limits": {"huawei.com/Ascend910": "8"}}), "spec.resources"),
    ("bad quantity", with_spec(resources={"requests": {"cpu": "lots"}}), "spec.resources.requests.cpu"),
    ("unknown restart policy", with_spec(runPolicy={"restartPolicy": "Always"}), "spec.runPolicy.restartPolicy"),
    ("negative backoff limit", with_spec(runPolicy={"backoffLimit": -1}), "spec.runPolicy.backoffLimit"),
    ("zero deadline", with_spec(runPolicy={"activeDeadlineSeconds": 0}), "spec.runPolicy.activeDeadlineSeconds"),
    ("privileged port", with_spec(launcher={"masterPort": 80}), "spec.launcher.masterPort"),
    ("short cluster timeout", with_spec(launcher={"clusterTimeout": 1}), "spec.launcher.clusterTimeout"),
    ("reserved volume name", with_spec(volumes=[{"name": "dshm", "emptyDir": {}}]), "spec.volumes"),
    (
        "mount over the config",
        with_spec(volumeMounts=[{"name": "x", "mountPath": "/etc/telechat"}]),
        "spec.volumeMounts",
    ),
    (
        "mount under the config",
        with_spec(volumeMounts=[{"name": "x", "mountPath": "/etc/telechat/extra"}]),
        "spec.volumeMounts",
    ),
    (
        "mount under the driver",
        with_spec(volumeMounts=[{"name": "x", "mountPath": "/usr/local/Ascend/driver/lib64"}]),
        "spec.volumeMounts",
    ),
    (
        "NPUs in merge resources",
        with_spec(merge={"resources": {"limits": {"huawei.com/Ascend910": 1}}}),
        "spec.merge.resources must not set huawei.com/Ascend910",
    ),
    (
        "merge resources not quantities",
        with_spec(merge={"resources": {"requests": {"cpu": "two"}}}),
        "spec.merge.resources.requests.cpu",
    ),
    ("reserved resolve timeout", with_spec(env=[{"name": "TELECHAT_RESOLVE_TIMEOUT", "value": "1"}]), "spec.env"),
    ("zero learning rate", with_spec(training={"learningRate": 0}), "spec.training.learningRate"),
    ("merge prefix with a slash", with_spec(merge={"prefix": "a/b"}), "spec.merge.prefix"),
    ("name too long for host names", renamed("n" * 57), "metadata.name"),
    (
        "name too long for 11 ranks",
        renamed("n" * 56, nodes=11, parallel={**LAYOUT_2, "dataParallel": 11}),
        "metadata.name",
    ),
    ("dotted name", renamed("a.b"), "metadata.name"),
]


@pytest.mark.parametrize(("case", "body", "field"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_finetunes_are_rejected_naming_the_field(
    installed: ClusterHandle, namespace: str, case: str, body: dict[str, Any], field: str
) -> None:
    result = installed.kubectl(
        f"--namespace={namespace}", "create", "--filename=-", input=json.dumps(body), check=False
    )
    assert result.returncode != 0, f"{case}: accepted"
    assert "is invalid" in result.stderr, result.stderr
    assert field in result.stderr, f"{case}: {field!r} not named in: {result.stderr}"
    assert f"telechatfinetune.telechat.io/{body['metadata']['name']}" not in result.stdout


def test_a_valid_finetune_is_accepted_with_defaults(installed: ClusterHandle, namespace: str) -> None:
    body = finetune("good", runPolicy=None)
    created = installed.kubectl(
        f"--namespace={namespace}", "create", "--filename=-", "--output=json", input=json.dumps(body)
    )
    spec = json.loads(created.stdout)["spec"]
    assert spec["runPolicy"] == {"backoffLimit": 3, "restartPolicy": "ExitCode", "suspend": False}
    assert spec["launcher"] == {"masterPort": 8118, "clusterTimeout": 300}
    assert spec["merge"] == {"enabled": True, "prefix": "telechat2"}


def test_layout_fields_are_immutable(installed: ClusterHandle, namespace: str) -> None:
    installed.kubectl(f"--namespace={namespace}", "create", "--filename=-", input=json.dumps(finetune("fixed")))
    patch = json.dumps({"spec": {"nodes": 3, "parallel": {**LAYOUT_2, "dataParallel": 3}}})
    result = installed.kubectl(
        f"--namespace={namespace}", "patch", "tcft", "fixed", "--type=merge", f"--patch={patch}", check=False
    )
    assert result.returncode != 0 and "spec.nodes is immutable" in result.stderr, result.stderr


def test_kubectl_explain_describes_the_fields(installed: ClusterHandle) -> None:
    text = installed.kubectl("explain", "telechatfinetune.spec.runPolicy.restartPolicy").stdout
    assert "exit codes 128-255" in text
    assert "huawei.com/Ascend910" in installed.kubectl("explain", "tcft.spec.devicesPerNode").stdout
