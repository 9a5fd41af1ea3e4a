"""TeleChatInference children: the rendered configs, the serving pod template, the Deployment and the Service.

Pure: an `InferenceSpec` and a `ResolvedCheckpoint` in, object dicts out; same input, same output (hashes on the
objects let the controller skip writes when nothing changed). Multi-node groups live in `groups`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.launch import Launch
from telechat_operator.common.objects import child_labels, child_metadata, stable_hash
from telechat_operator.common.pods import (
    ascend_resources,
    container_security_context,
    npu_pod_volumes,
    npu_volume_mounts,
    placement_fields,
    pod_security_context,
)
from telechat_operator.common.spec import checkpoint_directory
from telechat_operator.inference import constants as ic
from telechat_operator.inference.spec import BACKEND_MINDIE, InferenceSpec, ResolvedCheckpoint

# --- names -----------------------------------------------------------------------------------------------------


def config_map_name(name: str) -> str:
    """Distinct from a TeleChatFinetune's `<job>-config`: a finetune and its inference often share a name."""
    return f"{name}-serving-config"


def deployment_name(name: str) -> str:
    return name


def service_name(name: str) -> str:
    """The Service clients call: the endpoint is http://<name>.<namespace>.svc:<port>."""
    return name


def endpoint(spec: InferenceSpec) -> str:
    return f"http://{service_name(spec.name)}.{spec.namespace}.svc:{spec.port}"


# --- labels and metadata ----------------------------------------------------------------------------------------


def inference_labels(spec: InferenceSpec) -> dict[str, str]:
    """Labels on every child: select an inference's objects; managed-by lets the pod watch filter server-side."""
    return child_labels(ic.INFERENCE_KIND, ic.LABEL_INFERENCE_NAME, spec.name)


def children_selector(name: str) -> dict[str, str]:
    """Every child of one inference (pods, Services), whatever its role."""
    return {c.LABEL_OWNER_KIND: ic.INFERENCE_KIND, ic.LABEL_INFERENCE_NAME: name}


def serving_selector(spec: InferenceSpec) -> dict[str, str]:
    """Pods running the HTTP server (Deployment pods, group leaders): the Service's and the HPA's selector."""
    return {ic.LABEL_INFERENCE_NAME: spec.name, ic.LABEL_SERVING: "true"}


def metadata(spec: InferenceSpec, name: str, **extra_labels: str) -> dict[str, Any]:
    return child_metadata(spec.namespace, name, {**inference_labels(spec), **extra_labels}, spec.owner_reference())


def with_spec_hash(obj: dict[str, Any], hashed_part: Any) -> dict[str, Any]:
    """Annotate an object with the hash of what we want it to be; the controller writes it only when that changes."""
    obj["metadata"].setdefault("annotations", {})[ic.ANNOTATION_SPEC_HASH] = stable_hash(hashed_part)
    return obj


# --- configs -----------------------------------------------------------------------------------------------------


def predict_phase(spec: InferenceSpec) -> str:
    """`predict` on one device; the front-end parallel `predict_parallel` as soon as weights are sharded."""
    return "predict" if spec.world_size == 1 else "predict_parallel"


def predict_overrides(spec: InferenceSpec, checkpoint: ResolvedCheckpoint, base: Mapping[str, Any]) -> dict[str, Any]:
    """MindFormers keys the spec changes in the model's predict config (`base` is that config, for defaults)."""
    model_config: dict[str, Any] = {"seq_length": spec.seq_length}
    if spec.long_context:
        # Train short, infer long: the seed's recipe (max_position_embedding stays the trained length).
        model_config["extend_method"] = "DYNAMIC_NTK"
        model_config["max_position_embedding"] = spec.trained_seq_length
    base_model = (base.get("model") or {}).get("model_config") or {}
    if checkpoint.from_finetune and base_model.get("qkv_concat"):
        # A merged finetune checkpoint keeps the training layout (separate q and fused kv), not qkv_concat.
        model_config["qkv_concat"] = False
    if "num_blocks" in base_model:
        block_size = int(base_model.get("block_size") or ic.KV_BLOCK_SIZE)
        # Paged KV cache: num_blocks * block_size must cover the longest sequence.
        model_config["num_blocks"] = max(int(base_model["num_blocks"]), math.ceil(spec.seq_length / block_size))
    overrides: dict[str, Any] = {
        "load_checkpoint": checkpoint.path,
        "processor": {"tokenizer": {"vocab_file": checkpoint.vocab_file}},
        "model": {"model_config": model_config},
    }
    if spec.world_size > 1:
        overrides["use_parallel"] = True
        overrides["parallel_config"] = {"data_parallel": 1, "model_parallel": spec.world_size, "pipeline_stage": 1}
    return overrides


def render_predict_config(spec: InferenceSpec, checkpoint: ResolvedCheckpoint) -> str:
    """The predict YAML from `telechat2.configs` (lazy import: pure Python, no MindSpore)."""
    from telechat2 import configs

    phase = predict_phase(spec)
    return configs.render_config(
        spec.model, phase, predict_overrides(spec, checkpoint, configs.load_config(spec.model, phase))
    )


def mindie_config(spec: InferenceSpec, checkpoint: ResolvedCheckpoint) -> dict[str, Any]:
    """MindIE Service's conf/config.json for this spec (MindIE 1.0 layout; the seed's keys come from the spec)."""
    max_output = spec.max_seq_len - spec.max_input_token_len
    return {
        "Version": "1.0.0",
        "LogConfig": {"logLevel": "Info", "logFileSize": 20, "logFileNum": 20, "logPath": "logs/mindservice.log"},
        "ServerConfig": {
            "ipAddress": "0.0.0.0",  # the pod IP is not known when the config is rendered
            "managementIpAddress": "127.0.0.1",
            "port": spec.port,
            "managementPort": spec.port + 1,
            "metricsPort": spec.port + 2,
            "allowAllZeroIpListening": True,
            "maxLinkNum": 1000,
            "httpsEnabled": False,  # TLS terminates at the Service/Ingress
            "fullTextEnabled": False,
            "tokenTimeout": 600,
            "e2eTimeout": 600,
            "inferMode": "standard",
            "interCommTLSEnabled": False,
        },
        "BackendConfig": {
            "backendName": "mindieservice_llm_engine",
            "modelInstanceNumber": 1,
            "npuDeviceIds": [list(range(spec.devices_per_replica))],
            "tokenizerProcessNumber": 8,
            "multiNodesInferEnabled": False,
            "interNodeTLSEnabled": False,
            "ModelDeployConfig": {
                "maxSeqLen": spec.max_seq_len,
                "maxInputTokenLen": spec.max_input_token_len,
                "truncation": False,
                "ModelConfig": [
                    {
                        "modelInstanceType": "Standard",
                        "modelName": spec.model,
                        "modelWeightPath": checkpoint_directory(checkpoint.path),
                        "worldSize": spec.devices_per_replica,
                        "cpuMemSize": 5,
                        "npuMemSize": spec.npu_mem_size,
                        "backendType": "ms",
                        "trustRemoteCode": False,
                    }
                ],
            },
            "ScheduleConfig": {
                "templateType": "Standalone",
                "templateName": "Standard_LLM",
                "cacheBlockSize": 128,
                "maxPrefillBatchSize": 50,
                "maxPrefillTokens": max(8192, spec.max_input_token_len),
                "prefillTimeMsPerReq": 150,
                "prefillPolicyType": 0,
                "decodeTimeMsPerReq": 50,
                "decodePolicyType": 0,
                "maxBatchSize": spec.max_batch_size or ic.MINDIE_MAX_BATCH_SIZE,
                "maxIterTimes": max_output,
                "maxPreemptCount": 0,
                "supportSelectBatch": False,
                "maxQueueDelayMicroseconds": 5000,
            },
        },
    }


def render_mindie_config(spec: InferenceSpec, checkpoint: ResolvedCheckpoint) -> str:
    return json.dumps(mindie_config(spec, checkpoint), indent=4) + "\n"


PredictRenderer = Callable[[InferenceSpec, ResolvedCheckpoint], str]


def config_map_data(
    spec: InferenceSpec, checkpoint: ResolvedCheckpoint, render: PredictRenderer = render_predict_config
) -> dict[str, str]:
    data = {ic.PREDICT_CONFIG_KEY: render(spec, checkpoint)}
    if spec.backend == BACKEND_MINDIE:
        data[ic.MINDIE_CONFIG_KEY] = render_mindie_config(spec, checkpoint)
    return data


def build_config_map(spec: InferenceSpec, data: Mapping[str, str]) -> dict[str, Any]:
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(spec, config_map_name(spec.name)),
        "data": dict(data),
    }
    return with_spec_hash(config_map, config_map["data"])


# --- the serving container ----------------------------------------------------------------------------------------


def serve_command(spec: InferenceSpec, checkpoint: ResolvedCheckpoint) -> list[str]:
    """`telechat2 serve` with the spec's limits (or MindIE's daemon, which reads the rendered config.json)."""
    if spec.backend == BACKEND_MINDIE:
        return [ic.MINDIE_DAEMON]
    command = [
        "telechat2",
        "serve",
        "--config",
        ic.PREDICT_CONFIG_PATH,
        "--load_checkpoint",
        checkpoint.path,
        "--vocab_file",
        checkpoint.vocab_file,
        "--port",
        str(spec.port),
        "--max-seq-len",
        str(spec.max_seq_len),
        "--max-input-token-len",
        str(spec.max_input_token_len),
        "--model-name",
        spec.model,
    ]
    if spec.max_batch_size is not None:  # unset: the server's own default
        command += ["--max-batch-size", str(spec.max_batch_size)]
    if spec.warm_up:  # delays only Ready: the startup and liveness probes use /v2/health/live, which answers meanwhile
        command.append("--warm-up")
    return command


def replica_launch(spec: InferenceSpec, *, node_rank: int, master_addr: str) -> Launch:
    """Sharded serving: `telechat2 launch` runs msrun (join=True) over the replica's NPUs, then the server."""
    return Launch(
        worker_num=spec.world_size,
        local_worker_num=spec.devices_per_replica,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=ic.GROUP_MASTER_PORT,
        log_dir=ic.GROUP_LOG_DIR,
        cluster_timeout=ic.GROUP_CLUSTER_TIMEOUT,
    )


def container_env(spec: InferenceSpec, contract: Mapping[str, str]) -> list[dict[str, Any]]:
    """Model defaults and user env (merged by name), then operator-owned names (reserved, never duplicated)."""
    env = [dict(e) for e in spec.env]
    env.append({"name": ic.ENV_INFERENCE_NAME, "value": spec.name})
    env.extend({"name": key, "value": value} for key, value in contract.items())
    if spec.backend == BACKEND_MINDIE:
        env.append({"name": ic.ENV_MINDIE_CONFIG, "value": ic.MINDIE_CONFIG_PATH})
    if spec.api_key_secret_name:
        env.append(
            {
                "name": ic.ENV_API_KEY,
                "valueFrom": {"secretKeyRef": {"name": spec.api_key_secret_name, "key": spec.api_key_secret_key}},
            }
        )
    return env


def health_probes(spec: InferenceSpec) -> dict[str, Any]:
    """Startup waits for the model to load; liveness restarts a hung server; readiness gates the Service."""

    def http_get(path: str) -> dict[str, Any]:
        return {"path": path, "port": ic.HTTP_PORT_NAME, "scheme": "HTTP"}

    return {
        "startupProbe": {
            "httpGet": http_get(ic.HEALTH_LIVE_PATH),
            "periodSeconds": ic.PROBE_PERIOD_SECONDS,
            "failureThreshold": ic.STARTUP_TIMEOUT_SECONDS // ic.PROBE_PERIOD_SECONDS,
        },
        "livenessProbe": {
            "httpGet": http_get(ic.HEALTH_LIVE_PATH),
            "periodSeconds": ic.PROBE_PERIOD_SECONDS,
            "failureThreshold": 3,
        },
        "readinessProbe": {"httpGet": http_get(ic.HEALTH_READY_PATH), "periodSeconds": 5, "failureThreshold": 3},
    }


def server_container(
    spec: InferenceSpec,
    checkpoint: ResolvedCheckpoint,
    *,
    command: list[str],
    contract: Mapping[str, str],
    serves_http: bool,
) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        *npu_volume_mounts(),
        *(dict(m) for m in checkpoint.volume_mounts),
        *(dict(m) for m in spec.volume_mounts),
    ]
    if spec.backend == BACKEND_MINDIE:
        # Older MindIE releases read only <home>/conf/config.json; newer ones honour MIES_CONFIG_JSON_PATH too.
        mounts.append(
            {
                "name": c.CONFIG_VOLUME,
                "mountPath": ic.MINDIE_CONFIG_PATH,
                "subPath": ic.MINDIE_CONFIG_KEY,
                "readOnly": True,
            }
        )
    container: dict[str, Any] = {"name": ic.SERVER_CONTAINER, "image": spec.image}
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    container["command"] = command
    container["env"] = container_env(spec, contract)
    ports = []
    if serves_http:
        ports.append({"name": ic.HTTP_PORT_NAME, "containerPort": spec.port, "protocol": "TCP"})
    if spec.world_size > 1:
        ports.append({"name": c.MASTER_PORT_NAME, "containerPort": ic.GROUP_MASTER_PORT, "protocol": "TCP"})
    if ports:
        container["ports"] = ports
    container["resources"] = ascend_resources(spec.resources, spec.devices_per_replica)
    container["volumeMounts"] = mounts
    container["securityContext"] = container_security_context()
    if serves_http:
        container.update(health_probes(spec))
    return container


def pod_volumes(spec: InferenceSpec, checkpoint: ResolvedCheckpoint) -> list[dict[str, Any]]:
    return [
        *npu_pod_volumes(config_map_name(spec.name)),
        *(dict(v) for v in checkpoint.volumes),
        *(dict(v) for v in spec.volumes),
    ]


def pod_spec(spec: InferenceSpec, checkpoint: ResolvedCheckpoint, container: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "enableServiceLinks": False,
        # Finish in-flight requests: the Service drops the pod first, the server gets SIGTERM.
        "terminationGracePeriodSeconds": 60,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": pod_volumes(spec, checkpoint),
    }
    fields.update(placement_fields(spec.node_selector, spec.tolerations, spec.affinity, spec.priority_class_name))
    return fields


def template_annotations(checkpoint: ResolvedCheckpoint, config_hash: str) -> dict[str, str]:
    """A config change changes the pod template, so the Deployment rolls (a ConfigMap mount alone would not)."""
    annotations = {ic.ANNOTATION_CONFIG_HASH: config_hash}
    if checkpoint.from_finetune:
        annotations[ic.ANNOTATION_FROM_FINETUNE] = checkpoint.from_finetune
    return annotations


# --- Deployment (single-node replicas) and Service --------------------------------------------------------------


def deployment_selector(spec: InferenceSpec) -> dict[str, str]:
    """Immutable once created: only the name and the role."""
    return {ic.LABEL_INFERENCE_NAME: spec.name, c.LABEL_ROLE: ic.ROLE_SERVER}


def build_deployment(spec: InferenceSpec, checkpoint: ResolvedCheckpoint, config_hash: str) -> dict[str, Any]:
    """One pod per replica; a spec change changes the template and the Deployment rolls (surge one, none down)."""
    if spec.world_size > 1:
        launch = replica_launch(spec, node_rank=0, master_addr="127.0.0.1")
        command, contract = launch.command(serve_command(spec, checkpoint)), launch.env()
    else:
        command = serve_command(spec, checkpoint)
        contract = {}
    container = server_container(spec, checkpoint, command=command, contract=contract, serves_http=True)
    pod_labels = {**inference_labels(spec), **deployment_selector(spec), **serving_selector(spec)}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(spec, deployment_name(spec.name)),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": deployment_selector(spec)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            # Loading a large model takes long: report a stalled rollout only after the startup probe gave up.
            "progressDeadlineSeconds": ic.STARTUP_TIMEOUT_SECONDS + 600,
            "template": {
                "metadata": {"labels": pod_labels, "annotations": template_annotations(checkpoint, config_hash)},
                "spec": {**pod_spec(spec, checkpoint, container), "restartPolicy": "Always"},
            },
        },
    }
    return with_spec_hash(deployment, deployment["spec"])


def build_service(spec: InferenceSpec) -> dict[str, Any]:
    """The endpoint: selects ready serving pods (Deployment pods or group leaders) on the server port."""
    meta = metadata(spec, service_name(spec.name))
    if spec.service_annotations:
        meta["annotations"] = dict(spec.service_annotations)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": spec.service_type,
            "selector": serving_selector(spec),
            "ports": [
                {"name": ic.HTTP_PORT_NAME, "port": spec.port, "targetPort": ic.HTTP_PORT_NAME, "protocol": "TCP"}
            ],
        },
    }
    return with_spec_hash(service, {"spec": service["spec"], "annotations": spec.service_annotations})
