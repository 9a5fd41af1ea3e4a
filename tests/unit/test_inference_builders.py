"""TeleChatInference builders: rendered configs, the serving pod template, Deployment, Service, ConfigMap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from telechat_operator.common import constants as c
from telechat_operator.common.objects import selector_string, stable_hash
from telechat_operator.inference import constants as ic
from telechat_operator.inference.builders import (
    build_config_map,
    build_deployment,
    build_service,
    config_map_data,
    endpoint,
    mindie_config,
    predict_phase,
    render_predict_config,
    serving_selector,
)
from telechat_operator.inference.groups import build_group_pod
from telechat_operator.inference.spec import ResolvedCheckpoint, parse_inference

from tests.unit.inference_fixtures import inference_body, inference_spec, path_checkpoint


def rendered(**spec: Any) -> dict[str, Any]:
    return yaml.safe_load(render_predict_config(inference_spec(**spec), path_checkpoint()))


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize(
    ("spec", "phase"),
    [
        ({}, "predict"),
        ({"devicesPerReplica": 2}, "predict_parallel"),
        ({"devicesPerReplica": 8, "nodesPerReplica": 2}, "predict_parallel"),
    ],
)
def test_predict_phase_by_world_size(spec: dict[str, Any], phase: str) -> None:
    assert predict_phase(inference_spec(**spec)) == phase


def test_predict_config_serves_the_checkpoint_and_tokenizer() -> None:
    config = rendered()
    assert config["load_checkpoint"] == "/models/telechat2-7b/telechat2_7b.ckpt"
    assert config["processor"]["tokenizer"]["vocab_file"] == "/models/telechat2-7b/tokenizer.model"
    assert config["run_mode"] == "predict"
    model = config["model"]["model_config"]
    assert (model["seq_length"], model["extend_method"]) == (8192, "None")


def test_long_context_turns_on_dynamic_ntk() -> None:
    model = rendered(seqLength=32768)["model"]["model_config"]
    assert model["extend_method"] == "DYNAMIC_NTK"
    assert model["seq_length"] == 32768
    assert model["max_position_embedding"] == 8192  # the trained length: dynamic NTK's base_seqlen


def test_parallel_config_shards_over_the_replica_and_covers_the_kv_cache() -> None:
    config = rendered(devicesPerReplica=8, nodesPerReplica=2, seqLength=65536)
    assert config["use_parallel"] is True
    assert config["parallel_config"]["model_parallel"] == 16
    model = config["model"]["model_config"]
    assert model["num_blocks"] * model["block_size"] >= 65536
    assert model["extend_method"] == "DYNAMIC_NTK"


def test_finetune_checkpoints_load_in_the_training_layout() -> None:
    spec = inference_spec(checkpoint={"fromFinetune": "ft"}, devicesPerReplica=2)
    from_finetune = ResolvedCheckpoint(path="/out/merged/rank_0/x.ckpt", vocab_file="/t", from_finetune="ft")
    assert yaml.safe_load(render_predict_config(spec, from_finetune))["model"]["model_config"]["qkv_concat"] is False
    converted = yaml.safe_load(render_predict_config(inference_spec(devicesPerReplica=2), path_checkpoint()))
    assert converted["model"]["model_config"]["qkv_concat"] is True  # the seed's converted serving weights


def test_a_layout_the_model_cannot_split_is_refused_by_name() -> None:
    from telechat2.configs import ConfigError

    with pytest.raises(ConfigError, match="model_parallel 16 does not divide n_kv_heads 8"):
        rendered(model="telechat2-115b", devicesPerReplica=8, nodesPerReplica=2)


def test_mindie_config_json_from_the_spec() -> None:
    spec = inference_spec(backend="mindie", devicesPerReplica=4, maxSeqLen=8192, maxInputTokenLen=6144, npuMemSize=16)
    config = mindie_config(spec, path_checkpoint())
    model = config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]
    assert model["modelWeightPath"] == "/models/telechat2-7b"
    assert (model["worldSize"], model["backendType"], model["npuMemSize"]) == (4, "ms", 16)
    assert config["BackendConfig"]["npuDeviceIds"] == [[0, 1, 2, 3]]
    deploy = config["BackendConfig"]["ModelDeployConfig"]
    assert (deploy["maxSeqLen"], deploy["maxInputTokenLen"]) == (8192, 6144)
    assert config["ServerConfig"]["httpsEnabled"] is False
    assert config["ServerConfig"]["port"] == 1025
    assert config["BackendConfig"]["ScheduleConfig"]["maxIterTimes"] == 8192 - 6144
    data = config_map_data(spec, path_checkpoint())
    assert json.loads(data[ic.MINDIE_CONFIG_KEY]) == config
    assert ic.PREDICT_CONFIG_KEY in data


@pytest.mark.parametrize(("spec", "expected"), [({}, 200), ({"maxBatchSize": 64}, 64), ({"maxBatchSize": 1}, 1)])
def test_mindie_max_batch_size_is_the_spec_field_or_200(spec: dict[str, Any], expected: int) -> None:
    config = mindie_config(inference_spec(backend="mindie", **spec), path_checkpoint())
    assert config["BackendConfig"]["ScheduleConfig"]["maxBatchSize"] == expected


def test_mindie_batch_size_change_changes_the_rendered_config_and_warm_up_does_not() -> None:
    """The config hash is in the pod template: a maxBatchSize change rolls MindIE pods; warmUp is telechat2's."""
    base = config_map_data(inference_spec(backend="mindie"), path_checkpoint())
    assert config_map_data(inference_spec(backend="mindie", maxBatchSize=16), path_checkpoint()) != base
    assert config_map_data(inference_spec(backend="mindie", warmUp=False), path_checkpoint()) == base
    for warm_up in (True, False):
        server = container(build_deployment(inference_spec(backend="mindie", warmUp=warm_up), path_checkpoint(), "h"))
        assert server["command"] == [ic.MINDIE_DAEMON]


def test_config_map_has_mindie_json_only_for_mindie() -> None:
    data = config_map_data(inference_spec(), path_checkpoint())
    assert set(data) == {ic.PREDICT_CONFIG_KEY}
    config_map = build_config_map(inference_spec(), data)
    assert config_map["metadata"]["name"] == "tc7b-serving-config"  # never the finetune's <job>-config
    assert config_map["metadata"]["ownerReferences"][0]["kind"] == "TeleChatInference"


def test_deployment_pod_template() -> None:
    spec = inference_spec(
        replicas=2,
        apiKeySecretRef={"name": "keys", "key": "token"},
        env=[{"name": "EXTRA", "value": "1"}],
        volumes=[{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        volumeMounts=[{"name": "models", "mountPath": "/models"}],
        tolerations=[{"key": "npu", "operator": "Exists"}],
    )
    deployment = build_deployment(spec, path_checkpoint(), "cfg123")
    assert deployment["spec"]["replicas"] == 2
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"][ic.ANNOTATION_CONFIG_HASH] == "cfg123"
    assert template["metadata"]["labels"][ic.LABEL_SERVING] == "true"
    server = container(deployment)
    assert server["resources"]["limits"][c.ASCEND_RESOURCE] == "1"
    assert server["resources"]["requests"][c.ASCEND_RESOURCE] == "1"
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert server["command"][:2] == ["telechat2", "serve"]
    assert server["command"][-1] == "--warm-up"  # the CRD's default warmUp: true
    args = dict(zip(server["command"][2:-1:2], server["command"][3:-1:2], strict=True))
    assert args == {
        "--config": ic.PREDICT_CONFIG_PATH,
        "--load_checkpoint": "/models/telechat2-7b/telechat2_7b.ckpt",
        "--vocab_file": "/models/telechat2-7b/tokenizer.model",
        "--port": "1025",
        "--max-seq-len": "8192",
        "--max-input-token-len": "6144",
        "--model-name": "telechat2-7b",
    }
    env = env_of(server)
    assert env["TELECHAT_API_KEY"] == {"secretKeyRef": {"name": "keys", "key": "token"}}
    assert env["EXTRA"] == "1" and env["ENABLE_CELL_REUSE"] == "1"
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    assert mounts["/usr/local/Ascend/driver"] == "ascend-driver"
    assert mounts["/models"] == "models" and mounts[c.CONFIG_MOUNT_DIR] == c.CONFIG_VOLUME
    volumes = {v["name"] for v in template["spec"]["volumes"]}
    assert {"models", c.CONFIG_VOLUME, c.SHM_VOLUME, "ascend-driver", "ascend-npu-smi"} <= volumes
    assert template["spec"]["tolerations"] == [{"key": "npu", "operator": "Exists"}]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def serve_args(command: list[str]) -> list[str]:
    """The `telechat2 serve ...` part of a container command (after `telechat2 launch ... --` under msrun)."""
    start = command.index("--") + 1 if command[:2] == ["telechat2", "launch"] else 0
    assert command[start : start + 2] == ["telechat2", "serve"]
    return command[start + 2 :]


@pytest.mark.parametrize(
    ("spec", "batch", "warm_up"),
    [
        ({}, None, True),  # the server's default batch (8); warmUp defaults to true in the CRD
        ({"maxBatchSize": 32}, "32", True),
        ({"maxBatchSize": 1, "warmUp": False}, "1", False),
        ({"warmUp": False}, None, False),
        ({"maxBatchSize": 1024, "devicesPerReplica": 4}, "1024", True),  # under msrun
    ],
)
def test_max_batch_size_and_warm_up_reach_the_serve_command(
    spec: dict[str, Any], batch: str | None, warm_up: bool
) -> None:
    args = serve_args(container(build_deployment(inference_spec(**spec), path_checkpoint(), "h"))["command"])
    if batch is None:
        assert "--max-batch-size" not in args
    else:
        assert args[args.index("--max-batch-size") + 1] == batch
    assert ("--warm-up" in args) is warm_up
    assert args.count("--warm-up") <= 1


def test_group_pods_serve_with_the_batch_size_and_warm_up_on_every_rank() -> None:
    """Every rank runs the same serve command: warm-up compiles on all of them in the same order."""
    spec = inference_spec(devicesPerReplica=8, nodesPerReplica=2, maxBatchSize=16)
    for rank in (0, 1):
        args = serve_args(build_group_pod(spec, path_checkpoint(), 0, rank, "h")["spec"]["containers"][0]["command"])
        assert args[args.index("--max-batch-size") + 1] == "16" and "--warm-up" in args
    cold = inference_spec(devicesPerReplica=8, nodesPerReplica=2, warmUp=False)
    args = serve_args(build_group_pod(cold, path_checkpoint(), 0, 0, "h")["spec"]["containers"][0]["command"])
    assert "--warm-up" not in args and "--max-batch-size" not in args


def test_multi_device_replica_runs_under_msrun_on_its_own_node() -> None:
    server = container(build_deployment(inference_spec(devicesPerReplica=4), path_checkpoint(), "h"))
    command = server["command"]
    assert command[:2] == ["telechat2", "launch"]
    launch = dict(zip(command[2 : command.index("--") : 2], command[3 : command.index("--") : 2], strict=True))
    assert launch["--worker_num"] == launch["--local_worker_num"] == "4"
    assert launch["--master_addr"] == "127.0.0.1"
    assert command[command.index("--") + 1 : command.index("--") + 3] == ["telechat2", "serve"]
    assert server["resources"]["limits"][c.ASCEND_RESOURCE] == "4"


def test_spec_change_changes_the_template_and_the_hash_but_not_the_selector() -> None:
    base = build_deployment(inference_spec(), path_checkpoint(), "h1")
    same = build_deployment(inference_spec(), path_checkpoint(), "h1")
    assert base == same  # deterministic: a second pass writes nothing
    for changed in (
        build_deployment(inference_spec(image="registry.local/telechat2-runtime:0.2.0"), path_checkpoint(), "h1"),
        build_deployment(inference_spec(), path_checkpoint(), "h2"),  # the rendered config changed
        build_deployment(inference_spec(maxInputTokenLen=4096), path_checkpoint(), "h1"),
        build_deployment(inference_spec(maxBatchSize=16), path_checkpoint(), "h1"),
        build_deployment(inference_spec(warmUp=False), path_checkpoint(), "h1"),
    ):
        assert changed["spec"]["template"] != base["spec"]["template"]
        assert changed["metadata"]["annotations"] != base["metadata"]["annotations"]
        assert changed["spec"]["selector"] == base["spec"]["selector"]


def test_scaling_changes_the_hash_but_not_the_template() -> None:
    one = build_deployment(inference_spec(replicas=1), path_checkpoint(), "h")
    two = build_deployment(inference_spec(replicas=2), path_checkpoint(), "h")
    assert one["spec"]["template"] == two["spec"]["template"]
    assert one["metadata"]["annotations"] != two["metadata"]["annotations"]


def test_mindie_container_reads_the_rendered_config_json() -> None:
    server = container(build_deployment(inference_spec(backend="mindie"), path_checkpoint(), "h"))
    assert server["command"] == [ic.MINDIE_DAEMON]
    assert env_of(server)[ic.ENV_MINDIE_CONFIG] == ic.MINDIE_CONFIG_PATH
    assert {
        "name": c.CONFIG_VOLUME,
        "mountPath": ic.MINDIE_CONFIG_PATH,
        "subPath": "config.json",
        "readOnly": True,
    } in (server["volumeMounts"])


def test_finetune_checkpoint_volume_is_mounted() -> None:
    checkpoint = ResolvedCheckpoint(
        path="/output/merged/rank_0/telechat20.ckpt",
        vocab_file="/output/tokenizer.model",
        volumes=({"name": ic.FINETUNE_OUTPUT_VOLUME, "persistentVolumeClaim": {"claimName": "out", "readOnly": True}},),
        volume_mounts=({"name": ic.FINETUNE_OUTPUT_VOLUME, "mountPath": "/output", "readOnly": True},),
        from_finetune="ft",
    )
    deployment = build_deployment(inference_spec(checkpoint={"fromFinetune": "ft"}), checkpoint, "h")
    assert deployment["spec"]["template"]["metadata"]["annotations"][ic.ANNOTATION_FROM_FINETUNE] == "ft"
    assert {"name": ic.FINETUNE_OUTPUT_VOLUME, "mountPath": "/output", "readOnly": True} in container(deployment)[
        "volumeMounts"
    ]
    assert container(deployment)["command"][5] == "/output/merged/rank_0/telechat20.ckpt"


@pytest.mark.parametrize("service_type", ["ClusterIP", "NodePort", "LoadBalancer"])
def test_service_selects_serving_pods(service_type: str) -> None:
    spec = inference_spec(service={"type": service_type, "annotations": {"lb": "internal"}}, port=8080)
    service = build_service(spec)
    assert service["metadata"]["name"] == "tc7b"
    assert service["metadata"]["annotations"]["lb"] == "internal"
    assert service["spec"]["type"] == service_type
    assert service["spec"]["selector"] == serving_selector(spec)
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert endpoint(spec) == "http://tc7b.serving.svc:8080"


def test_selector_string_and_hash_are_stable() -> None:
    assert selector_string({"b": "2", "a": "1"}) == "a=1,b=2"
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


SAMPLES = sorted((Path(__file__).resolve().parents[2] / "operator" / "deploy" / "samples").glob("telechatinference-*"))


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_samples_parse_and_render(sample: Path) -> None:
    """Every shipped sample is a spec the operator can build (the apiserver side is checked in e2e)."""
    docs = [d for d in yaml.safe_load_all(sample.read_text()) if d and d["kind"] == "TeleChatInference"]
    assert docs
    for doc in docs:
        body = inference_body(name=doc["metadata"]["name"], **doc["spec"])
        spec = parse_inference(body)
        checkpoint = ResolvedCheckpoint(path=spec.checkpoint_path or "/out/merged/rank_0/x.ckpt", vocab_file="/t")
        data = config_map_data(spec, checkpoint)
        assert yaml.safe_load(data[ic.PREDICT_CONFIG_KEY])["model"]["model_config"]["seq_length"] == spec.seq_length
        if spec.multi_node:
            assert build_group_pod(spec, checkpoint, 0, 1, stable_hash(data))["spec"]["subdomain"]
        else:
            assert build_deployment(spec, checkpoint, stable_hash(data))["spec"]["replicas"] == spec.replicas
