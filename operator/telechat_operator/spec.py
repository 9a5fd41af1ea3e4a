"""Typed view of a TeleChatFinetune: parse the (apiserver-defaulted) body, fill model defaults, validate.

Pure: no API calls. The apiserver already enforces the CRD schema and its CEL rules; this module re-checks what
CEL cannot know, because it depends on the model's default layout from `telechat2.configs` (for example a job
that omits `parallel` on a node count the model's default layout does not fit). Errors name the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from telechat_operator import constants as c
from telechat_operator.spec_common import (
    SpecError,
    check_volume_mounts,
    cpu_resources,
    known_model_defaults,
    optional_int,
    owner_reference,
    require_int,
    require_str,
    resources_without_npus,
    validate_name,
)
from telechat_operator.spec_common import merge_env as _merge_env

__all__ = ["FinetuneSpec", "ModelDefaults", "SpecError", "load_model_defaults", "merge_env", "parse", "validate_name"]


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """What the operator needs from `telechat2.configs.model_defaults(model)`."""

    nodes: int
    devices_per_node: int
    parallel: Mapping[str, Any]  # snake_case keys: data_parallel, model_parallel, ...
    env: Mapping[str, str]


DefaultsLookup = Callable[[str], ModelDefaults]


def load_model_defaults(model: str) -> ModelDefaults:
    """Read a model's defaults from the bundled configs (imported lazily: pure Python, no MindSpore)."""
    raw, env = known_model_defaults(model)
    return ModelDefaults(
        nodes=int(raw.nodes),
        devices_per_node=int(raw.devices_per_node),
        parallel=dict(raw.parallel),
        env=env,
    )


@dataclasses.dataclass(frozen=True)
class Parallel:
    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    vocab_emb_dp: bool
    gradient_aggregation_group: int
    # Not in the CRD: taken from the model's default layout (MoE models shard experts across data-parallel ranks).
    expert_parallel: int = 1

    @property
    def shards_parameters(self) -> bool:
        """False for pure data parallelism: every rank then saves a full copy and merging needs no strategy."""
        return self.model_parallel > 1 or self.pipeline_stage > 1 or self.expert_parallel > 1

    @property
    def devices(self) -> int:
        """Devices the layout occupies: must equal nodes x devicesPerNode."""
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    def as_config(self) -> dict[str, Any]:
        """The snake_case dict `telechat2.configs.finetune_overrides(parallel=...)` takes (the CRD's fields)."""
        config = dataclasses.asdict(self)
        config.pop("expert_parallel")
        return config


@dataclasses.dataclass(frozen=True)
class Training:
    epochs: int | None = None
    learning_rate: float | None = None
    seq_length: int | None = None
    batch_size: int | None = None
    save_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class RunPolicy:
    backoff_limit: int = c.DEFAULT_BACKOFF_LIMIT
    restart_policy: str = c.RESTART_POLICY_EXIT_CODE
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    suspend: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    """Everything the builders need, resolved: no optional field left for a builder to default."""

    name: str
    namespace: str
    uid: str
    generation: int
    model: str
    image: str
    image_pull_policy: str | None
    image_pull_secrets: tuple[dict[str, Any], ...]
    service_account_name: str | None
    nodes: int
    devices_per_node: int
    parallel: Parallel
    dataset_path: str
    load_checkpoint: str | None
    output_path: str
    training: Training
    env: tuple[dict[str, Any], ...]  # Kubernetes EnvVar dicts: model defaults first, then the user's by name
    volumes: tuple[dict[str, Any], ...]
    volume_mounts: tuple[dict[str, Any], ...]
    resources: dict[str, Any]
    node_selector: dict[str, str]
    tolerations: tuple[dict[str, Any], ...]
    affinity: dict[str, Any] | None
    priority_class_name: str | None
    scheduler_name: str | None
    master_port: int
    cluster_timeout: int
    run_policy: RunPolicy
    merge_enabled: bool
    merge_prefix: str
    merge_resources: dict[str, Any]

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def gang_scheduled(self) -> bool:
        return self.scheduler_name == c.VOLCANO_SCHEDULER

    def owner_reference(self) -> dict[str, Any]:
        return owner_reference(c.FINETUNE_KIND, self.name, self.uid)


def _parallel(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> Parallel:
    def pick(camel: str, snake: str) -> Any:
        return raw[camel] if camel in raw else defaults.get(snake)

    try:
        return Parallel(
            data_parallel=require_int(pick("dataParallel", "data_parallel"), "spec.parallel.dataParallel", minimum=1),
            model_parallel=require_int(
                pick("modelParallel", "model_parallel"), "spec.parallel.modelParallel", minimum=1
            ),
            pipeline_stage=require_int(
                pick("pipelineStage", "pipeline_stage"), "spec.parallel.pipelineStage", minimum=1
            ),
            micro_batch_num=require_int(
                pick("microBatchNum", "micro_batch_num"), "spec.parallel.microBatchNum", minimum=1
            ),
            vocab_emb_dp=bool(pick("vocabEmbDp", "vocab_emb_dp")),
            gradient_aggregation_group=require_int(
                pick("gradientAggregationGroup", "gradient_aggregation_group") or 1,
                "spec.parallel.gradientAggregationGroup",
                minimum=1,
            ),
            expert_parallel=int(defaults.get("expert_parallel", 1) or 1),
        )
    except SpecError:
        raise
    except (TypeError, KeyError) as err:  # a defaults table missing a key
        raise SpecError("spec.parallel", f"incomplete layout: {err}") from err


def merge_env(defaults: Mapping[str, str], user: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Model defaults first, user entries override by name; the launch contract's names are reserved."""
    return _merge_env(defaults, user, reserved=c.RESERVED_ENV_NAMES)


def parse(body: Mapping[str, Any], lookup: DefaultsLookup = load_model_defaults) -> FinetuneSpec:
    """Resolve a TeleChatFinetune body into a FinetuneSpec, or raise SpecError naming the field."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    model = require_str(spec.get("model"), "spec.model")
    defaults = lookup(model)

    nodes = require_int(spec.get("nodes", defaults.nodes), "spec.nodes", minimum=1)
    if nodes > c.MAX_NODES:
        raise SpecError("spec.nodes", f"must be at most {c.MAX_NODES}, got {nodes}")
    devices = require_int(spec.get("devicesPerNode", defaults.devices_per_node), "spec.devicesPerNode")
    if devices not in c.ALLOWED_DEVICES_PER_NODE:
        raise SpecError("spec.devicesPerNode", f"must be one of {list(c.ALLOWED_DEVICES_PER_NODE)}, got {devices}")
    name = require_str(meta.get("name"), "metadata.name")
    validate_name(name, nodes)

    parallel = _parallel(spec.get("parallel") or {}, defaults.parallel)
    field = "spec.parallel" if spec.get("parallel") else "spec.parallel (model default)"
    if parallel.devices != nodes * devices:
        raise SpecError(
            field,
            f"dataParallel x modelParallel x pipelineStage = {parallel.devices} must equal nodes x devicesPerNode"
            f" = {nodes} x {devices} = {nodes * devices}",
        )
    if parallel.micro_batch_num < parallel.pipeline_stage:
        raise SpecError(
            f"{field}.microBatchNum",
            f"must be at least pipelineStage ({parallel.pipeline_stage}), got {parallel.micro_batch_num}",
        )

    training_raw = spec.get("training") or {}
    training = Training(
        epochs=optional_int(training_raw.get("epochs"), "spec.training.epochs", minimum=1),
        learning_rate=None if training_raw.get("learningRate") is None else float(training_raw["learningRate"]),
        seq_length=optional_int(training_raw.get("seqLength"), "spec.training.seqLength", minimum=1),
        batch_size=optional_int(training_raw.get("batchSize"), "spec.training.batchSize", minimum=1),
        save_steps=optional_int(training_raw.get("saveSteps"), "spec.training.saveSteps", minimum=1),
    )
    policy_raw = spec.get("runPolicy") or {}
    restart_policy = policy_raw.get("restartPolicy", c.RESTART_POLICY_EXIT_CODE)
    if restart_policy not in c.RESTART_POLICIES:
        raise SpecError("spec.runPolicy.restartPolicy", f"must be one of {list(c.RESTART_POLICIES)}")
    run_policy = RunPolicy(
        backoff_limit=require_int(
            policy_raw.get("backoffLimit", c.DEFAULT_BACKOFF_LIMIT), "spec.runPolicy.backoffLimit", minimum=0
        ),
        restart_policy=restart_policy,
        active_deadline_seconds=optional_int(
            policy_raw.get("activeDeadlineSeconds"), "spec.runPolicy.activeDeadlineSeconds", minimum=1
        ),
        ttl_seconds_after_finished=optional_int(
            policy_raw.get("ttlSecondsAfterFinished"), "spec.runPolicy.ttlSecondsAfterFinished", minimum=0
        ),
        suspend=bool(policy_raw.get("suspend", False)),
    )
    launcher = spec.get("launcher") or {}
    merge = spec.get("merge") or {}
    resources = resources_without_npus(spec.get("resources"), devices_field="spec.devicesPerNode")
    volume_mounts = tuple(spec.get("volumeMounts") or ())
    check_volume_mounts(volume_mounts)

    return FinetuneSpec(
        name=name,
        namespace=require_str(meta.get("namespace"), "metadata.namespace"),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 1)),
        model=model,
        image=require_str(spec.get("image"), "spec.image"),
        image_pull_policy=spec.get("imagePullPolicy"),
        image_pull_secrets=tuple(spec.get("imagePullSecrets") or ()),
        service_account_name=spec.get("serviceAccountName"),
        nodes=nodes,
        devices_per_node=devices,
        parallel=parallel,
        dataset_path=require_str((spec.get("dataset") or {}).get("path"), "spec.dataset.path"),
        load_checkpoint=(spec.get("checkpoint") or {}).get("load") or None,
        output_path=require_str((spec.get("output") or {}).get("path"), "spec.output.path").rstrip("/") or "/",
        training=training,
        env=merge_env(defaults.env, list(spec.get("env") or [])),
        volumes=tuple(spec.get("volumes") or ()),
        volume_mounts=volume_mounts,
        resources=resources,
        node_selector=dict(spec.get("nodeSelector") or {}),
        tolerations=tuple(spec.get("tolerations") or ()),
        affinity=spec.get("affinity") or None,
        priority_class_name=spec.get("priorityClassName") or None,
        scheduler_name=spec.get("schedulerName") or None,
        master_port=require_int(
            launcher.get("masterPort", c.DEFAULT_MASTER_PORT), "spec.launcher.masterPort", minimum=1
        ),
        cluster_timeout=require_int(
            launcher.get("clusterTimeout", c.DEFAULT_CLUSTER_TIMEOUT), "spec.launcher.clusterTimeout", minimum=1
        ),
        run_policy=run_policy,
        merge_enabled=bool(merge.get("enabled", True)),
        merge_prefix=merge.get("prefix") or c.DEFAULT_MERGE_PREFIX,
        merge_resources=cpu_resources(merge.get("resources"), "spec.merge.resources"),
    )
