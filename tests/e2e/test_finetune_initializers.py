"""TeleChatFinetune initializers, planned layouts and model-aware validation, end to end: the real apiserver's CEL
rules, the real operator; kwok plays the pods (`telechat.io/fake-phase`, `fake-message` for a termination message).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ClusterHandle
from tests.cluster.waiting import wait_for
from tests.e2e.finetune_harness import (
    Jobs,
    OperatorProcess,
    condition,
    finetune,
    install,
    service_account_kubeconfig,
    wait_quietly,
)

INIT = {
    "dataset": {
        "path": "/mnt/telechat/data/train.mindrecord",
        "jsonl": "/mnt/telechat/data/train.jsonl",
        "tokenizer": "/mnt/telechat/tokenizer.model",
    },
    "checkpoint": {"huggingface": "/mnt/telechat/hf/telechat2-tiny"},
}


@pytest.fixture(scope="module")
def operator(cluster: ClusterHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install(cluster)
    workdir = tmp_path_factory.mktemp("operator-init")
    process = OperatorProcess(service_account_kubeconfig(cluster, workdir / "kubeconfig"), workdir / "operator.log")
    process.start()
    yield process
    process.stop()
    print(f"operator log tail:\n{process.log_tail()}")


@pytest.fixture
def jobs(cluster: ClusterHandle, namespace: str, operator: OperatorProcess) -> Jobs:
    return Jobs(cluster, namespace)


@pytest.mark.parametrize(
    ("case", "spec", "field"),
    [
        (
            "more pipeline stages than layers",
            {"nodes": 4, "parallel": {"dataParallel": 1, "modelParallel": 1, "pipelineStage": 4, "microBatchNum": 4}},
            "spec.parallel.pipelineStage",
        ),
        (
            "model parallel not dividing the heads",
            {"nodes": 4, "parallel": {"dataParallel": 1, "modelParallel": 4, "pipelineStage": 1, "microBatchNum": 1}},
            "spec.parallel.modelParallel",
        ),
        (
            "jsonl without a tokenizer",
            {"dataset": {"path": "/d/x.mindrecord", "jsonl": "/d/x.jsonl"}},
            "spec.dataset.tokenizer",
        ),
    ],
)
def test_admission_rejects_what_the_model_cannot_take_naming_the_field(
    cluster: ClusterHandle, case: str, spec: dict, field: str
) -> None:
    install(cluster)
    namespace = f"init-adm-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    try:
        body = finetune("bad", **spec)
        result = cluster.kubectl(
            f"--namespace={namespace}", "create", "--filename=-", input=json.dumps(body), check=False
        )
        assert result.returncode != 0, f"{case}: accepted"
        assert "is invalid" in result.stderr and field in result.stderr, result.stderr
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_kubectl_explain_shows_the_default_requests(cluster: ClusterHandle) -> None:
    install(cluster)
    text = " ".join(cluster.kubectl("explain", "telechatfinetune.spec.resources").stdout.split())
    assert "telechat2-7b 8 CPU and 64Gi per NPU" in text
    assert "Planned" in cluster.kubectl("explain", "telechatfinetune.status.layout.source").stdout


def test_rank_pods_start_only_after_the_init_pod_succeeded(jobs: Jobs) -> None:
    jobs.apply("init", **INIT)
    (init,) = jobs.wait_pods("init", 1, "Running", role="initializer")
    containers = {c["name"]: c for c in init["spec"]["containers"]}
    assert containers["preprocess"]["command"][:2] == ["telechat2", "preprocess"]
    assert "--skip-if-complete" in containers["convert"]["command"]
    assert containers["convert"]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    status = jobs.wait_state("init", "Initializing")
    assert condition(status, "Initialized")["status"] == "False"
    wait_quietly(1.0)
    assert jobs.pods("init") == []  # no rank pod while initializing

    jobs.set_phase([init], "Succeeded")
    ranks = jobs.wait_pods("init", 2, "Running")
    status = jobs.wait_state("init", "Running")
    assert condition(status, "Initialized")["status"] == "True"
    config = json.loads(jobs.kubectl("get", "configmap", "init-config", "--output=json").stdout)["data"]["config.yaml"]
    assert "load_checkpoint: /mnt/telechat/output/init/converted/telechat2-tiny.ckpt" in config
    assert "dataset_dir: /mnt/telechat/data/train.mindrecord" in config
    assert len(ranks) == 2


def test_a_failed_init_pod_fails_the_job_with_its_termination_message(jobs: Jobs) -> None:
    jobs.apply("badinit", **INIT)
    (init,) = jobs.wait_pods("badinit", 1, "Running", role="initializer")
    message = "telechat2 preprocess: 1 malformed line(s): line 7: invalid JSON (Expecting value at column 1)"
    jobs.set_phase([init], "Failed", exit_code=1, message=message)
    status = jobs.wait_state("badinit", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "InitializerFailed" and "line 7: invalid JSON" in failed["message"], failed
    assert "badinit-init" in failed["message"] and status["lastFailure"]["exitCode"] == 1
    assert jobs.pods("badinit") == []
    assert "InitializerFailed" in wait_for(
        lambda: (reasons := jobs.events("badinit")) and "InitializerFailed" in reasons and reasons, "the Event"
    )


def test_an_omitted_layout_is_planned_for_the_nodes_and_shown_in_status(jobs: Jobs) -> None:
    jobs.apply("auto", nodes=3, parallel=None)  # telechat2-tiny's own layout is for one device
    ranks = jobs.wait_pods("auto", 3, "Running")
    status = jobs.wait_state("auto", "Running")
    layout = status["layout"]
    assert (layout["dataParallel"], layout["modelParallel"], layout["pipelineStage"]) == (3, 1, 1)
    assert layout["source"] == "Planned" and layout["deviceMemory"] == "64Gi"
    config = json.loads(jobs.kubectl("get", "configmap", "auto-config", "--output=json").stdout)["data"]
    assert "data_parallel: 3" in config["config.yaml"]
    # Default host requests from telechat2/configs (no BestEffort rank pods).
    for pod in ranks:
        requests = pod["spec"]["containers"][0]["resources"]["requests"]
        assert (requests["cpu"], requests["memory"], requests["huawei.com/Ascend910"]) == ("1", "2Gi", "1")
        assert pod["status"].get("qosClass") == "Burstable"


def test_a_layout_no_split_of_the_nodes_fits_fails_before_any_pod(jobs: Jobs) -> None:
    jobs.apply("huge", model="telechat2-115b", nodes=1, devicesPerNode=8, parallel=None)
    status = jobs.wait_state("huge", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.parallel" in failed["message"], failed
    assert "fits 64 GiB per NPU" in failed["message"]
    wait_quietly(1.0)
    assert jobs.pods("huge") == []
    missing = jobs.kubectl("get", "configmap", "huge-config", check=False)
    assert missing.returncode != 0
