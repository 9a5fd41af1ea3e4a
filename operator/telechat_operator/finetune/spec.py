"""Typed view of a TeleChatFinetune: parse the (apiserver-defaulted) body, fill model defaults, validate.

Pure: no API calls. The apiserver already enforces the CRD schema and its CEL rules; this module re-checks what
CEL cannot know, because it depends on the model's default layout from `telechat2.configs` (for example a job
that omits `parallel` on a node count the model's default layout does not fit). Errors name the field.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.spec import (
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
from telechat_operator.common.spec import merge_env as _merge_env

__all__ = [
    "FinetuneSpec",
    "LayoutChoice",
    "ModelDefaults",
    "SpecError",
    "load_model_defaults",
    "merge_env",
    "parse",
    "plan_layout",
    "validate_name",
]


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """What the operator needs from `telechat2.configs.model_defaults(model)` and the model's architecture."""

    nodes: int
    devices_per_node: int
    parallel: Mapping[str, Any]  # snake_case keys: data_parallel, model_parallel, ...
    env: Mapping[str, str]
    # What layouts the architecture can take (None: not checked): pipelineStage <= num_layers, and modelParallel
    # must divide model_parallel_divisor (gcd of heads, KV heads, FFN width and vocabulary).
    num_layers: int | None = None
    model_parallel_divisor: int | None = None
    # Host CPU/memory requests (catalog.yaml host_resources): per NPU of a rank pod; per merge/initializer pod.
    trainer_requests_per_device: Mapping[str, str] = dataclasses.field(default_factory=dict)
    helper_requests: Mapping[str, str] = dataclasses.field(default_factory=dict)


DefaultsLookup = Callable[[str], ModelDefaults]


def load_model_defaults(model: str) -> ModelDefaults:
    """Read a model's defaults from the bundled configs (imported lazily: pure Python, no MindSpore)."""
    raw, env = known_model_defaults(model)
    num_layers, divisor = _layout_limits(model)
    return ModelDefaults(
        nodes=int(raw.nodes),
        devices_per_node=int(raw.devices_per_node),
        parallel=dict(raw.parallel),
        env=env,
        num_layers=num_layers,
        model_parallel_divisor=divisor,
        trainer_requests_per_device=dict(raw.trainer_requests_per_device),
        helper_requests=dict(raw.helper_requests),
    )


@functools.lru_cache(maxsize=64)
def _layout_limits(model: str) -> tuple[int, int]:
    """(layers, the number every modelParallel divides): read once per model, every pass parses the spec."""
    from telechat2 import configs
    from telechat2.describe import model_parallel_limit

    arch = configs.architecture(model)
    return arch.num_layers, model_parallel_limit(arch)


@dataclasses.dataclass(frozen=True)
class LayoutChoice:
    """The planner's answer: the degrees (snake_case, MindFormers keys), where they came from, the estimate."""

    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    expert_parallel: int
    source: str  # Spec (every degree given), ModelDefault, Planned
    memory_bytes: int
    device_bytes: int


# (model, devices, devices_per_node, fixed degrees, seq_length, batch_size) -> LayoutChoice; ValueError if none.
LayoutPlanner = Callable[[str, int, int, Mapping[str, int], int | None, int | None], LayoutChoice]


@functools.lru_cache(maxsize=1024)
def _plan_cached(
    model: str,
    devices: int,
    devices_per_node: int,
    fixed: tuple[tuple[str, int], ...],
    seq_length: int | None,
    batch_size: int | None,
) -> LayoutChoice:
    from telechat2 import configs, describe

    plan = describe.plan_layout(
        configs.architecture(model),
        describe.base_layout(model, seq_length, batch_size),
        devices,
        devices_per_node,
        dict(fixed),
    )
    layout = plan.layout
    return LayoutChoice(
        data_parallel=layout.data_parallel,
        model_parallel=layout.model_parallel,
        pipeline_stage=layout.pipeline_stage,
        micro_batch_num=layout.micro_batch_num,
        expert_parallel=layout.expert_parallel,
        source=plan.source,
        memory_bytes=plan.memory.total,
        device_bytes=plan.memory.device_bytes,
    )


def plan_layout(
    model: str,
    devices: int,
    devices_per_node: int,
    fixed: Mapping[str, int],
    seq_length: int | None = None,
    batch_size: int | None = None,
) -> LayoutChoice:
    """`telechat2.describe.plan_layout` for a model (pure Python; cached: every reconcile pass parses the spec)."""
    return _plan_cached(model, devices, devices_per_node, tuple(sorted(fixed.items())), seq_length, batch_size)


@dataclasses.dataclass(frozen=True)
class Parallel:
    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    vocab_emb_dp: bool
    gradient_aggregation_group: int
    # Not in the CRD: the model's default, lowered to divide dataParallel (MoE models shard experts across
    # data-parallel ranks); rendered only when it differs from the model's config.
    expert_parallel: int = 1
    default_expert_parallel: int = 1
    # Where the degrees came from (Spec, ModelDefault, Planned) and the planner's memory estimate per device.
    source: str = "Spec"
    memory_bytes: int | None = None
    device_bytes: int | None = None

    @property
    def shards_parameters(self) -> bool:
        """False for pure data parallelism: every rank then saves a full copy and merging needs no strategy."""
        return self.model_parallel > 1 or self.pipeline_stage > 1 or self.expert_parallel > 1

    @property
    def devices(self) -> int:
        """Devices the layout occupies: must equal nodes x devicesPerNode."""
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    def as_config(self) -> dict[str, Any]:
        """The snake_case dict `telechat2.configs.finetune_overrides(parallel=...)` takes (the CRD's fields, and
        expert_parallel only where the layout had to change the model's)."""
        config = {
            "data_parallel": self.data_parallel,
            "model_parallel": self.model_parallel,
            "pipeline_stage": self.pipeline_stage,
            "micro_batch_num": self.micro_batch_num,
            "vocab_emb_dp": self.vocab_emb_dp,
            "gradient_aggregation_group": self.gradient_aggregation_group,
        }
        if self.expert_parallel != self.default_expert_parallel:
            config["expert_parallel"] = self.expert_parallel
        return config

    def status(self) -> dict[str, Any]:
        """`status.layout`: the layout the job runs with, where it came from and the memory estimate."""
        out: dict[str, Any] = {
            "dataParallel": self.data_parallel,
            "modelParallel": self.model_parallel,
            "pipelineStage": self.pipeline_stage,
            "microBatchNum": self.micro_batch_num,
            "expertParallel": self.expert_parallel,
            "source": self.source,
        }
        if self.memory_bytes is not None and self.device_bytes:
            out["estimatedMemoryPerDevice"] = f"{self.memory_bytes / 2**30:.1f}Gi"
            out["deviceMemory"] = f"{self.device_bytes / 2**30:.0f}Gi"
        return out


@dataclasses.dataclass(frozen=True)
class Training:
    epochs: int | None = None
    learning_rate: float | None = None
    seq_length: int | None = None
    batch_size: int | None = None
    save_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Initializers:
    """What the initializer pod prepares before the ranks start (both optional; empty = no initializer pod)."""

    dataset_jsonl: str | None = None  # `telechat2 preprocess` input: a jsonl file or a directory of them
    tokenizer: str | None = None  # tokenizer.model for preprocess
    max_length: int = 0  # preprocess rows are max_length + 1 tokens: the training seq_length
    huggingface: str | None = None  # `telechat2 convert` input: a Hugging Face safetensors directory
    resources: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.dataset_jsonl or self.huggingface)


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
    initializers: Initializers = dataclasses.field(default_factory=Initializers)

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def gang_scheduled(self) -> bool:
        return self.scheduler_name == c.VOLCANO_SCHEDULER

    def owner_reference(self) -> dict[str, Any]:
        return owner_reference(c.FINETUNE_KIND, self.name, self.uid)


_DEGREES = (
    ("dataParallel", "data_parallel"),
    ("modelParallel", "model_parallel"),
    ("pipelineStage", "pipeline_stage"),
    ("microBatchNum", "micro_batch_num"),
)


def _check_against_model(fixed: Mapping[str, int], defaults: ModelDefaults) -> None:
    """The user's degrees against the architecture (the CRD's CEL rules say the same, generated from the configs)."""
    micro, stages = fixed.get("micro_batch_num"), fixed.get("pipeline_stage")
    if micro is not None and stages is not None and micro < stages:
        raise SpecError("spec.parallel.microBatchNum", f"must be at least pipelineStage ({stages}), got {micro}")
    if stages is not None and defaults.num_layers is not None and stages > defaults.num_layers:
        raise SpecError("spec.parallel.pipelineStage", f"{stages} exceeds the model's {defaults.num_layers} layers")
    mp = fixed.get("model_parallel")
    if mp is not None and defaults.model_parallel_divisor is not None and defaults.model_parallel_divisor % mp:
        raise SpecError(
            "spec.parallel.modelParallel",
            f"{mp} does not divide the model's attention heads, KV heads, FFN width and vocabulary "
            f"(modelParallel must divide {defaults.model_parallel_divisor})",
        )


def _parallel(
    raw: Mapping[str, Any],
    defaults: ModelDefaults,
    model: str,
    nodes: int,
    devices_per_node: int,
    training: Training,
    planner: LayoutPlanner,
) -> Parallel:
    """The user's degrees, completed by the planner (the model's default layout when it suits the node count and
    fits NPU memory, else the least-sharded split that fits); SpecError names the field when nothing works."""
    fixed = {
        snake: require_int(raw[camel], f"spec.parallel.{camel}", minimum=1)
        for camel, snake in _DEGREES
        if raw.get(camel) is not None
    }
    _check_against_model(fixed, defaults)
    world = nodes * devices_per_node
    completed = [
        fixed.get(key, defaults.parallel.get(key, 1)) for key in ("data_parallel", "model_parallel", "pipeline_stage")
    ]
    product = completed[0] * completed[1] * completed[2]
    field = "spec.parallel" if raw else "spec.parallel (model default)"
    mismatch = (
        f"dataParallel x modelParallel x pipelineStage = {product} must equal nodes x devicesPerNode"
        f" = {nodes} x {devices_per_node} = {world}"
    )
    if len(fixed.keys() & {"data_parallel", "model_parallel", "pipeline_stage"}) == 3 and product != world:
        raise SpecError(field, mismatch)
    try:
        choice = planner(model, world, devices_per_node, fixed, training.seq_length, training.batch_size)
    except ValueError as err:  # telechat2.configs.ConfigError: nothing suits the model or fits
        raise SpecError(field, f"{mismatch}; {err}" if product != world else str(err)) from err

    def pick(camel: str, snake: str) -> Any:
        return raw[camel] if camel in raw else defaults.parallel.get(snake)

    return Parallel(
        data_parallel=choice.data_parallel,
        model_parallel=choice.model_parallel,
        pipeline_stage=choice.pipeline_stage,
        micro_batch_num=choice.micro_batch_num,
        vocab_emb_dp=bool(pick("vocabEmbDp", "vocab_emb_dp")),
        gradient_aggregation_group=require_int(
            pick("gradientAggregationGroup", "gradient_aggregation_group") or 1,
            "spec.parallel.gradientAggregationGroup",
            minimum=1,
        ),
        expert_parallel=choice.expert_parallel,
        default_expert_parallel=int(defaults.parallel.get("expert_parallel", 1) or 1),
        source=choice.source,
        memory_bytes=choice.memory_bytes,
        device_bytes=choice.device_bytes,
    )


def with_default_requests(resources: Mapping[str, Any], defaults: Mapping[str, str]) -> dict[str, Any]:
    """The user's container resources plus the model's default requests for every resource the user left out.

    A resource the user names anywhere (in requests or limits) keeps exactly the user's settings: a default request
    above the user's limit would make the pod invalid."""
    out = dict(resources)
    named = set(out.get("requests") or {}) | set(out.get("limits") or {})
    missing = {name: value for name, value in defaults.items() if name not in named}
    if missing:
        out["requests"] = {**missing, **(out.get("requests") or {})}
    return out


def _initializers(
    spec: Mapping[str, Any], model: str, seq_length: int, helper_requests: Mapping[str, str]
) -> tuple[Initializers, str | None]:
    """The initializer settings and the checkpoint the ranks load (`telechat2 convert`'s output when converting)."""
    dataset = spec.get("dataset") or {}
    checkpoint = spec.get("checkpoint") or {}
    jsonl = dataset.get("jsonl") or None
    tokenizer = dataset.get("tokenizer") or None
    if jsonl and not tokenizer:
        raise SpecError("spec.dataset.tokenizer", "is required with spec.dataset.jsonl (telechat2 preprocess needs it)")
    huggingface = checkpoint.get("huggingface") or None
    load = checkpoint.get("load") or None
    if huggingface and not load:
        output = require_str((spec.get("output") or {}).get("path"), "spec.output.path").rstrip("/")
        load = f"{output}/{c.CONVERTED_DIR}/{model}.ckpt"
    resources = cpu_resources((spec.get("initializer") or {}).get("resources"), "spec.initializer.resources")
    init = Initializers(
        dataset_jsonl=jsonl,
        tokenizer=tokenizer,
        max_length=seq_length,
        huggingface=huggingface,
        resources=with_default_requests(resources, helper_requests),
    )
    return init, load


def merge_env(defaults: Mapping[str, str], user: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Model defaults first, user entries override by name; the launch contract's names are reserved."""
    return _merge_env(defaults, user, reserved=c.RESERVED_ENV_NAMES)


def parse(
    body: Mapping[str, Any], lookup: DefaultsLookup = load_model_defaults, planner: LayoutPlanner = plan_layout
) -> FinetuneSpec:
    """Resolve a TeleChatFinetune body into a FinetuneSpec, or raise SpecError naming the field."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    model = require_str(spec.get("model"), "spec.model")
    defaults = lookup(model)

    nodes = require_int(spec.get("nodes", defaults.nodes), "spec.nodes", minimum=1, maximum=c.MAX_NODES)
    devices = require_int(spec.get("devicesPerNode", defaults.devices_per_node), "spec.devicesPerNode")
    if devices not in c.ALLOWED_DEVICES_PER_NODE:
        raise SpecError("spec.devicesPerNode", f"must be one of {list(c.ALLOWED_DEVICES_PER_NODE)}, got {devices}")
    name = require_str(meta.get("name"), "metadata.name")
    validate_name(name, nodes)

    training_raw = spec.get("training") or {}
    training = Training(
        epochs=optional_int(training_raw.get("epochs"), "spec.training.epochs", minimum=1),
        learning_rate=None if training_raw.get("learningRate") is None else float(training_raw["learningRate"]),
        seq_length=optional_int(training_raw.get("seqLength"), "spec.training.seqLength", minimum=1),
        batch_size=optional_int(training_raw.get("batchSize"), "spec.training.batchSize", minimum=1),
        save_steps=optional_int(training_raw.get("saveSteps"), "spec.training.saveSteps", minimum=1),
    )
    parallel = _parallel(spec.get("parallel") or {}, defaults, model, nodes, devices, training, planner)
    field = "spec.parallel" if spec.get("parallel") else "spec.parallel (model default)"
    if parallel.devices != nodes * devices:  # a planner that broke its promise
        raise SpecError(field, f"the layout occupies {parallel.devices} devices, not {nodes * devices}")
    if parallel.micro_batch_num < parallel.pipeline_stage:
        raise SpecError(
            f"{field}.microBatchNum",
            f"must be at least pipelineStage ({parallel.pipeline_stage}), got {parallel.micro_batch_num}",
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
    resources = with_default_requests(
        resources_without_npus(spec.get("resources"), devices_field="spec.devicesPerNode"),
        {name: _scaled(value, devices) for name, value in defaults.trainer_requests_per_device.items()},
    )
    volume_mounts = tuple(spec.get("volumeMounts") or ())
    check_volume_mounts(volume_mounts)
    initializers, load_checkpoint = _initializers(
        spec, model, training.seq_length or seq_length_default(model), defaults.helper_requests
    )

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
        load_checkpoint=load_checkpoint,
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
        merge_resources=with_default_requests(
            cpu_resources(merge.get("resources"), "spec.merge.resources"), defaults.helper_requests
        ),
        initializers=initializers,
    )


def _scaled(quantity: str, factor: int) -> str:
    from telechat2.configs import scale_quantity

    return scale_quantity(quantity, factor)


@functools.lru_cache(maxsize=64)
def seq_length_default(model: str) -> int:
    """The model's finetune seq_length (what preprocess packs to when spec.training.seqLength is not set)."""
    from telechat2 import configs

    if model not in configs.list_models():
        return 0
    return configs.model_defaults(model).seq_length
