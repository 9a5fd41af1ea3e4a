"""Builders: the exact objects the operator creates, checked field by field without a cluster."""

from __future__ import annotations

import yaml
from operator_factories import make_spec
from telechat_operator.common import constants as c
from telechat_operator.finetune import names
from telechat_operator.finetune.configmap import build_config_map, render_finetune_config
from telechat_operator.finetune.podgroup import build_pod_group
from telechat_operator.finetune.pods import build_merge_pod, build_rank_pod, merge_command, rank_command
from telechat_operator.finetune.service import build_service

MASTER = "ft-rank-0.ft-ranks.ns.svc"


def test_rank_command_is_launch_then_finetune_with_the_group_shape() -> None:
    spec = make_spec(model="telechat2-7b", nodes=2, devicesPerNode=8, parallel={"dataParallel": 16})
    assert rank_command(spec, rank=1, attempt=1) == [
        "telechat2", "launch",
        "--worker_num", "16", "--local_worker_num", "8", "--node_rank", "1",
        "--master_addr", MASTER, "--master_port", "8118",
        "--log_dir", "/out/run1/msrun_log", "--cluster_time_out", "300",
        "--", "telechat2", "finetune", "--config", "/etc/telechat/config.yaml",
    ]  # fmt: skip
    assert rank_command(spec, rank=1, attempt=2)[-1] == "--resume"
    assert "--resume" not in rank_command(spec, rank=0, attempt=1)


def test_rank_pod_shape() -> None:
    spec = make_spec(
        nodeSelector={"accelerator-type": "module-910b-8"},
        tolerations=[{"key": "npu", "operator": "Exists"}],
        volumes=[{"name": "shared", "hostPath": {"path": "/mnt"}}],
        volumeMounts=[{"name": "shared", "mountPath": "/out"}],
        resources={"requests": {"cpu": "4"}},
        env=[{"name": "GLOG_v", "value": "2"}],
    )
    pod = build_rank_pod(spec, rank=1, attempt=3)
    meta, pod_spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "ft-a3-rank-1"
    assert meta["labels"] == {
        c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE,
        c.LABEL_OWNER_KIND: c.FINETUNE_KIND,
        c.LABEL_JOB_NAME: "ft",
        c.LABEL_NODE_RANK: "1",
        c.LABEL_ATTEMPT: "3",
        c.LABEL_ROLE: c.ROLE_WORKER,
    }
    assert meta["ownerReferences"][0]["uid"] == "uid-1" and meta["ownerReferences"][0]["controller"]
    assert "annotations" not in meta  # no gang scheduling asked for
    assert pod_spec["restartPolicy"] == "Never"
    assert (pod_spec["hostname"], pod_spec["subdomain"]) == ("ft-rank-1", "ft-ranks")
    assert pod_spec["nodeSelector"] == {"accelerator-type": "module-910b-8"}
    assert pod_spec["tolerations"] == [{"key": "npu", "operator": "Exists"}]
    (container,) = pod_spec["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "4", c.ASCEND_RESOURCE: "1"},
        "limits": {c.ASCEND_RESOURCE: "1"},
    }
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["telechat-config"]["configMap"]["name"] == "ft-config"
    assert volumes["shared"]["hostPath"]["path"] == "/mnt"
    host_paths = {v["hostPath"]["path"] for v in pod_spec["volumes"] if "hostPath" in v}
    assert {
        "/usr/local/Ascend/driver",
        "/usr/local/dcmi",
        "/usr/local/bin/npu-smi",
        "/etc/ascend_install.info",
    } < host_paths
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/telechat"]["readOnly"] and mounts["/usr/local/Ascend/driver"]["readOnly"]
    assert mounts["/dev/shm"]["name"] == "dshm" and mounts["/out"]["name"] == "shared"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GLOG_v"] == "2"
    assert env[c.ENV_NODE_RANK] == "1" and env[c.ENV_MASTER_ADDR] == MASTER and env[c.ENV_ATTEMPT] == "3"
    assert len(env) == len(container["env"])  # no name twice
    assert container["command"] == rank_command(spec, 1, 3)


def test_volcano_gang_scheduling_annotates_pods_and_builds_a_pod_group() -> None:
    spec = make_spec(schedulerName="volcano", priorityClassName="high")
    pod = build_rank_pod(spec, rank=0, attempt=1)
    assert pod["spec"]["schedulerName"] == "volcano"
    assert pod["metadata"]["annotations"] == {c.ANNOTATION_VOLCANO_GROUP: "ft"}
    group = build_pod_group(spec)
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1" and group["kind"] == "PodGroup"
    assert group["metadata"]["name"] == "ft"
    assert group["spec"] == {"minMember": 2, "minResources": {c.ASCEND_RESOURCE: "2"}, "priorityClassName": "high"}
    # The merge pod is not part of the gang.
    assert "schedulerName" not in build_merge_pod(spec, 1)["spec"]


def test_merge_pod_is_cpu_only_with_the_output_volume() -> None:
    spec = make_spec(
        volumes=[{"name": "shared", "persistentVolumeClaim": {"claimName": "data"}}],
        volumeMounts=[{"name": "shared", "mountPath": "/out"}],
        merge={"prefix": "tiny", "resources": {"requests": {"cpu": "2"}}},
    )
    pod = build_merge_pod(spec, merge_attempt=2)
    assert pod["metadata"]["name"] == "ft-merge-2"
    assert pod["metadata"]["labels"][c.LABEL_ROLE] == c.ROLE_MERGE
    assert c.LABEL_NODE_RANK not in pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    assert c.ASCEND_RESOURCE not in str(container) and "hostPath" not in str(pod["spec"]["volumes"])
    assert container["image"] == spec.image and container["resources"] == {"requests": {"cpu": "2"}}
    assert pod["spec"]["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "data"}}]
    assert container["volumeMounts"] == [{"name": "shared", "mountPath": "/out"}]
    assert container["command"] == [
        "telechat2", "merge", "--src_ckpt_dir", "/out/run1/checkpoint",
        "--dst_ckpt_dir", "/out/run1/merged", "--prefix", "tiny",
    ]  # fmt: skip


def test_merge_passes_the_strategy_when_parameters_are_sharded() -> None:
    spec = make_spec(nodes=2, parallel={"dataParallel": 1, "pipelineStage": 2, "microBatchNum": 2})
    command = merge_command(spec)
    assert command[2:4] == ["--src_ckpt_strategy", "/out/run1/strategy"]


def test_headless_service_selects_the_ranks() -> None:
    service = build_service(make_spec(launcher={"masterPort": 9000}))
    assert service["metadata"]["name"] == names.service("ft") == "ft-ranks"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {c.LABEL_JOB_NAME: "ft", c.LABEL_ROLE: c.ROLE_WORKER}
    assert service["spec"]["ports"][0]["port"] == 9000


def test_config_map_renders_the_model_config_with_the_spec_layout_and_overrides() -> None:
    spec = make_spec(training={"epochs": 3, "learningRate": 2e-5, "seqLength": 128, "saveSteps": 7})
    config_map = build_config_map(spec)
    assert config_map["metadata"]["name"] == "ft-config"
    rendered = yaml.safe_load(config_map["data"][c.CONFIG_KEY])
    assert rendered["parallel_config"]["data_parallel"] == 2
    assert rendered["output_dir"] == "/out/run1"
    assert rendered["train_dataset"]["data_loader"]["dataset_dir"] == "/data/train.mindrecord"
    assert rendered["runner_config"]["epochs"] == 3
    assert rendered["lr_schedule"]["learning_rate"] == 2e-5
    assert rendered["model"]["model_config"]["seq_length"] == 128
    monitor = next(cb for cb in rendered["callbacks"] if cb["type"] == "CheckpointMonitor")
    assert monitor["save_checkpoint_steps"] == 7


def test_every_child_is_owned_by_the_job() -> None:
    spec = make_spec(schedulerName="volcano")
    children = [
        build_config_map(spec, render=lambda _: "x: 1\n"),
        build_service(spec),
        build_pod_group(spec),
        build_rank_pod(spec, 0, 1),
        build_merge_pod(spec, 1),
    ]
    for child in children:
        assert child["metadata"]["ownerReferences"] == [spec.owner_reference()], child["kind"]
        assert child["metadata"]["namespace"] == "ns"
        assert child["metadata"]["labels"][c.LABEL_JOB_NAME] == "ft"


def test_merge_copies_the_tokenizer_from_beside_the_base_checkpoint() -> None:
    """A fromFinetune inference without vocabFile reads merged/rank_0/tokenizer.model: the merge writes it."""
    spec = make_spec(checkpoint={"load": "/models/telechat2-tiny/telechat2_tiny.ckpt"})
    assert merge_command(spec)[-2:] == ["--vocab_file", "/models/telechat2-tiny/tokenizer.model"]
    assert "--vocab_file" not in merge_command(make_spec())  # trained from scratch: no tokenizer to copy


def test_init_pod_runs_preprocess_and_convert_side_by_side_with_skip_and_termination_messages() -> None:
    from telechat_operator.finetune.initializer import build_init_pod

    spec = make_spec(
        dataset={"path": "/d/train.mindrecord", "jsonl": "/d/train.jsonl", "tokenizer": "/d/tokenizer.model"},
        checkpoint={"huggingface": "/models/hf"},
        training={"seqLength": 256},
        volumes=[{"name": "shared", "persistentVolumeClaim": {"claimName": "data"}}],
        volumeMounts=[{"name": "shared", "mountPath": "/d"}],
        initializer={"resources": {"requests": {"cpu": "3"}}},
    )
    pod = build_init_pod(spec)
    assert pod["metadata"]["name"] == "ft-init"
    assert pod["metadata"]["labels"][c.LABEL_ROLE] == c.ROLE_INITIALIZER
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert pod["spec"]["restartPolicy"] == "Never"
    preprocess, convert = pod["spec"]["containers"]
    assert (preprocess["name"], convert["name"]) == (c.PREPROCESS_CONTAINER, c.CONVERT_CONTAINER)
    assert preprocess["command"] == [
        "telechat2", "preprocess", "--input_dataset_file", "/d/train.jsonl", "--vocab_file_path",
        "/d/tokenizer.model", "--max_length", "256", "--output_path", "/d/train.mindrecord",
        "--skip-if-complete", "--termination-message-path", "/dev/termination-log",
    ]  # fmt: skip
    assert convert["command"] == [
        "telechat2", "convert", "--torch_path", "/models/hf", "--mindspore_path",
        "/out/run1/converted/telechat2-tiny.ckpt", "--model", "telechat2-tiny",
        "--skip-if-complete", "--termination-message-path", "/dev/termination-log",
    ]  # fmt: skip
    for container in (preprocess, convert):
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert container["resources"] == {"requests": {"cpu": "3"}}
        assert c.ASCEND_RESOURCE not in str(container)
        assert container["volumeMounts"] == [{"name": "shared", "mountPath": "/d"}]
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "data"}}]
    # The ranks then load the converted checkpoint.
    assert "load_checkpoint: /out/run1/converted/telechat2-tiny.ckpt" in render_finetune_config(spec)
    only_data = build_init_pod(make_spec(dataset={"path": "/d/x", "jsonl": "/d/x.jsonl", "tokenizer": "/t"}))
    assert [ct["name"] for ct in only_data["spec"]["containers"]] == [c.PREPROCESS_CONTAINER]
