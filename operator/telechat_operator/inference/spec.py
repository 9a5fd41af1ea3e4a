"""Typed view of a TeleChatInference: parse the (apiserver-defaulted) body, fill model defaults, validate.

Pure: no API calls. The apiserver enforces the CRD schema and CEL rules; this module fills what depends on the
model (devices per replica, sequence lengths from `telechat2.configs`) and re-checks what CEL cannot know.
Errors are `SpecError`s naming the field, like the finetune's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.spec import (
    SpecError,
    check_volume_mounts,
    default_vocab_file,
    known_model_defaults,
    optional_int,
    owner_reference,
    require_int,
    require_str,
    resources_without_npus,
    validate_name,
)
from telechat_operator.common.spec import merge_env as _merge_env
from telechat_operator.inference import constants as ic

BACKEND_TELECHAT2 = "telechat2"
BACKEND_MINDIE = "mindie"
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")


@dataclasses.dataclass(frozen=True)
class ServingDefaults:
    """What serving needs from `telechat2.configs.model_defaults(model)`."""

    predict_devices: int  # NPUs the model's predict layout uses on one node
    seq_length: int  # the trained sequence length (dynamic NTK starts past it)
    env: Mapping[str, str]


ServingDefaultsLookup = Callable[[str], ServingDefaults]


def load_serving_defaults(model: str) -> ServingDefaults:
    """Read a model's serving defaults from the bundled configs (lazy import: pure Python, no MindSpore)."""
    raw, env = known_model_defaults(model)
    return ServingDefaults(predict_devices=int(raw.predict_devices), seq_length=int(raw.seq_length), env=env)


@dataclasses.dataclass(frozen=True)
class InferenceSpec:
    """Everything the serving builders need, resolved: no optional field left for a builder to default."""

    name: str
    namespace: str
    uid: str
    generation: int
    model: str
    image: str
    image_pull_policy: str | None
    checkpoint_path: str | None  # exactly one of checkpoint_path and from_finetune is set
    from_finetune: str | None
    vocab_file: str | None  # None: tokenizer.model beside the checkpoint (resolved with the checkpoint)
    replicas: int
    devices_per_replica: int  # NPUs per pod
    nodes_per_replica: int
    max_seq_len: int
    max_input_token_len: int
    npu_mem_size: int
    max_batch_size: int | None  # None: the server's default (telechat2 serve 8, MindIE MINDIE_MAX_BATCH_SIZE)
    warm_up: bool  # telechat2 serve --warm-up (compile every batch shape before reporting ready)
    seq_length: int  # seq_length of the rendered predict config
    trained_seq_length: int  # the model's trained length; seq_length past it turns on dynamic NTK
    port: int
    service_type: str
    service_annotations: dict[str, str]
    api_key_secret_name: str | None
    api_key_secret_key: str
    backend: str
    env: tuple[dict[str, Any], ...]  # EnvVar dicts: model defaults, then the user's by name
    volumes: tuple[dict[str, Any], ...]
    volume_mounts: tuple[dict[str, Any], ...]
    resources: dict[str, Any]
    node_selector: dict[str, str]
    tolerations: tuple[dict[str, Any], ...]
    affinity: dict[str, Any] | None
    priority_class_name: str | None

    @property
    def multi_node(self) -> bool:
        """More than one node per replica: groups of pods instead of a Deployment."""
        return self.nodes_per_replica > 1

    @property
    def world_size(self) -> int:
        """NPUs (msrun workers) per replica."""
        return self.devices_per_replica * self.nodes_per_replica

    @property
    def long_context(self) -> bool:
        """Serving past the trained length: the predict config turns on dynamic NTK."""
        return self.seq_length > self.trained_seq_length

    def owner_reference(self) -> dict[str, Any]:
        return owner_reference(ic.INFERENCE_KIND, self.name, self.uid)


@dataclasses.dataclass(frozen=True)
class ResolvedCheckpoint:
    """The checkpoint the pods serve, once known, with any volume needed to reach it."""

    path: str
    vocab_file: str
    volumes: tuple[dict[str, Any], ...] = ()
    volume_mounts: tuple[dict[str, Any], ...] = ()
    from_finetune: str | None = None


def resolve_path_checkpoint(spec: InferenceSpec) -> ResolvedCheckpoint:
    """spec.checkpoint.path: reachable through the user's own volumes, nothing to add."""
    assert spec.checkpoint_path is not None
    return ResolvedCheckpoint(
        path=spec.checkpoint_path, vocab_file=spec.vocab_file or default_vocab_file(spec.checkpoint_path)
    )


def merge_env(defaults: Mapping[str, str], user: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """Model defaults first, user entries override by name; the serving contract's names are reserved."""
    return _merge_env(defaults, user, reserved=ic.INFERENCE_RESERVED_ENV_NAMES)


def _validate_name(name: str) -> None:
    validate_name(name, 1)
    if len(name) > ic.MAX_INFERENCE_NAME:
        raise SpecError(
            "metadata.name",
            f"must be at most {ic.MAX_INFERENCE_NAME} characters (group pod host names must fit 63), got {len(name)}",
        )


def _checkpoint(raw: Mapping[str, Any]) -> tuple[str | None, str | None]:
    path = raw.get("path") or None
    finetune = raw.get("fromFinetune") or None
    if (path is None) == (finetune is None):
        raise SpecError("spec.checkpoint", "set exactly one of path or fromFinetune")
    if path is not None and not str(path).startswith("/"):
        raise SpecError("spec.checkpoint.path", f"must be an absolute path, got {path!r}")
    return path, finetune


def _volumes(spec: Mapping[str, Any]) -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    volumes = tuple(dict(v) for v in spec.get("volumes") or ())
    names = set()
    for index, volume in enumerate(volumes):
        name = volume.get("name")
        if name in ic.RESERVED_VOLUME_NAMES:
            raise SpecError(f"spec.volumes[{index}].name", f"{name} is reserved (added by the operator)")
        names.add(name)
    mounts = tuple(dict(m) for m in spec.get("volumeMounts") or ())
    check_volume_mounts(mounts)
    for index, mount in enumerate(mounts):
        if mount.get("name") not in names:
            raise SpecError(
                f"spec.volumeMounts[{index}].name", f"no volume named {mount.get('name')!r} in spec.volumes"
            )
    return volumes, mounts


def parse_inference(body: Mapping[str, Any], lookup: ServingDefaultsLookup = load_serving_defaults) -> InferenceSpec:
    """Resolve a TeleChatInference body into an InferenceSpec, or raise SpecError naming the field."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    name = require_str(meta.get("name"), "metadata.name")
    _validate_name(name)
    model = require_str(spec.get("model"), "spec.model")
    defaults = lookup(model)

    devices = require_int(spec.get("devicesPerReplica", defaults.predict_devices), "spec.devicesPerReplica")
    if devices not in c.ALLOWED_DEVICES_PER_NODE:
        raise SpecError("spec.devicesPerReplica", f"must be one of {list(c.ALLOWED_DEVICES_PER_NODE)}, got {devices}")
    nodes = require_int(spec.get("nodesPerReplica", 1), "spec.nodesPerReplica", minimum=1)

    seq_length = optional_int(spec.get("seqLength"), "spec.seqLength", minimum=16) or defaults.seq_length
    max_seq_len = optional_int(spec.get("maxSeqLen"), "spec.maxSeqLen", minimum=2) or seq_length
    if max_seq_len > seq_length:
        field = "spec.seqLength" if "seqLength" in spec else f"the model's trained length ({seq_length})"
        raise SpecError("spec.maxSeqLen", f"{max_seq_len} must not exceed {field}: set spec.seqLength to serve longer")
    max_input = optional_int(spec.get("maxInputTokenLen"), "spec.maxInputTokenLen", minimum=1) or max(
        1, int(max_seq_len * ic.DEFAULT_INPUT_FRACTION)
    )
    if max_input >= max_seq_len:
        raise SpecError("spec.maxInputTokenLen", f"{max_input} must be less than spec.maxSeqLen ({max_seq_len})")

    max_batch_size = optional_int(spec.get("maxBatchSize"), "spec.maxBatchSize", minimum=1, maximum=ic.MAX_BATCH_SIZE)
    warm_up = spec.get("warmUp", True)
    if not isinstance(warm_up, bool):
        raise SpecError("spec.warmUp", f"must be a boolean, got {warm_up!r}")

    backend = spec.get("backend", BACKEND_TELECHAT2)
    if backend not in (BACKEND_TELECHAT2, BACKEND_MINDIE):
        raise SpecError("spec.backend", f"must be {BACKEND_TELECHAT2} or {BACKEND_MINDIE}, got {backend!r}")
    if backend == BACKEND_MINDIE and nodes > 1:
        raise SpecError("spec.nodesPerReplica", "must be 1 with backend mindie")

    service = spec.get("service") or {}
    service_type = service.get("type", "ClusterIP")
    if service_type not in SERVICE_TYPES:
        raise SpecError("spec.service.type", f"must be one of {list(SERVICE_TYPES)}, got {service_type!r}")
    port = require_int(spec.get("port", ic.DEFAULT_PORT), "spec.port", minimum=1)
    if nodes > 1 and port == ic.GROUP_MASTER_PORT:
        raise SpecError("spec.port", f"{port} is msrun's master port in multi-node groups; choose another")

    api_key = spec.get("apiKeySecretRef") or {}
    resources = resources_without_npus(spec.get("resources"), devices_field="spec.devicesPerReplica")
    checkpoint_path, from_finetune = _checkpoint(spec.get("checkpoint") or {})
    volumes, mounts = _volumes(spec)

    return InferenceSpec(
        name=name,
        namespace=require_str(meta.get("namespace"), "metadata.namespace"),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation", 1)),
        model=model,
        image=require_str(spec.get("image"), "spec.image"),
        image_pull_policy=spec.get("imagePullPolicy") or None,
        checkpoint_path=checkpoint_path,
        from_finetune=from_finetune,
        vocab_file=spec.get("vocabFile") or None,
        replicas=require_int(spec.get("replicas", 1), "spec.replicas", minimum=0),
        devices_per_replica=devices,
        nodes_per_replica=nodes,
        max_seq_len=max_seq_len,
        max_input_token_len=max_input,
        npu_mem_size=require_int(spec.get("npuMemSize", 8), "spec.npuMemSize", minimum=-1),
        max_batch_size=max_batch_size,
        warm_up=warm_up,
        seq_length=seq_length,
        trained_seq_length=defaults.seq_length,
        port=port,
        service_type=service_type,
        service_annotations={str(k): str(v) for k, v in (service.get("annotations") or {}).items()},
        api_key_secret_name=api_key.get("name") or None,
        api_key_secret_key=api_key.get("key") or "api-key",
        backend=backend,
        env=merge_env(defaults.env, list(spec.get("env") or [])),
        volumes=volumes,
        volume_mounts=mounts,
        resources=resources,
        node_selector={str(k): str(v) for k, v in (spec.get("nodeSelector") or {}).items()},
        tolerations=tuple(dict(t) for t in spec.get("tolerations") or ()),
        affinity=spec.get("affinity") or None,
        priority_class_name=spec.get("priorityClassName") or None,
    )
