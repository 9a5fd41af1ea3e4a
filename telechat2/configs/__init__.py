"""TeleChat2 MindFormers configs: one source of truth for every model size and phase.

Layout (all MindFormers-schema YAML, loadable by `mindformers.tools.register.MindFormerConfig` as they are):

- `common/model.yaml`: model keys every size shares (token ids, rope, dtypes, generation defaults);
- `<model>/model.yaml`: that size's architecture, written once (`base_config: ../common/model.yaml`);
- `common/{finetune,predict,predict_parallel}.yaml`: phase settings every size shares;
- `<model>/<phase>.yaml`: `base_config: [../common/<phase>.yaml, model.yaml]` plus the size's parallel layout;
- `catalog.yaml`: what is not MindFormers config: pod environment defaults and devices per node.

`base_config` is resolved exactly as MindFormers does it (bases merged shallowly in order, then the file deep-merged
over them), so `load_config` and MindFormers see the same values. `render_config` produces one self-contained YAML
(no base_config) with user overrides applied: the operator stores it in a ConfigMap and `telechat2 finetune --config`
reads it. This module never imports MindSpore or MindFormers.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from telechat2.configuration import TeleChat2Config

CONFIG_DIR = Path(__file__).resolve().parent
PHASES: tuple[str, ...] = ("finetune", "predict", "predict_parallel")
BASE_CONFIG_KEY = "base_config"

# MindFormers parallel_config keys (mindformers.tools.register.template.ParallelConfig rejects anything else).
PARALLEL_KEYS: tuple[str, ...] = (
    "data_parallel",
    "model_parallel",
    "context_parallel",
    "expert_parallel",
    "pipeline_stage",
    "micro_batch_num",
    "seq_split_num",
    "use_seq_parallel",
    "optimizer_shard",
    "gradient_aggregation_group",
    "vocab_emb_dp",
    "context_parallel_algo",
    "ulysses_degree_in_cp",
    "mem_coeff",
)
# Keys of model.model_config that are MindFormers runtime settings rather than TeleChat2Config architecture fields.
RUNTIME_MODEL_KEYS: frozenset[str] = frozenset(
    {
        "type",
        "batch_size",
        "use_past",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "max_new_tokens",
        "block_size",
        "num_blocks",
    }
)
# Top-level MindFormers keys an override may add although the shipped YAML does not set them.
EXTRA_TOP_LEVEL_KEYS: frozenset[str] = frozenset(
    {
        "profile",
        "profile_start_step",
        "profile_stop_step",
        "profile_communication",
        "profile_memory",
        "init_start_profile",
        "do_eval",
        "eval_step_interval",
        "eval_epoch_interval",
        "eval_dataset",
        "eval_dataset_task",
        "eval_callbacks",
        "metric",
        "moe_config",
        "swap_config",
        "monitor_config",
        "ignore_data_skip",
        "data_skip_steps",
        "transform_process_num",
        "load_ckpt_async",
        "print_separate_loss",
        "processor",
        "predict_batch_size",
        "input_data",
        "train_dataset",
        "train_dataset_task",
        "callbacks",
        "runner_config",
        "optimizer",
        "lr_schedule",
        "recompute_config",
        "runner_wrapper",
        "micro_batch_interleave_num",
    }
)


class ConfigError(ValueError):
    """A model, phase or override that does not make a valid TeleChat2 config; the message names the field."""


# -- loading --------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _merge_mindformers(override: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """MindFormerConfig._merge_a_into_b: nested mappings merge, everything else (lists too) is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge_mindformers(value, merged[key])
        else:
            merged[key] = value
    return merged


def load_yaml_with_bases(path: str | Path) -> dict[str, Any]:
    """Load a YAML file resolving `base_config` the way MindFormers' MindFormerConfig._file2dict does."""
    path = Path(path)
    data = _read_yaml(path)
    bases = data.pop(BASE_CONFIG_KEY, None)
    if bases is None:
        return data
    merged_bases: dict[str, Any] = {}
    for base in bases if isinstance(bases, list) else [bases]:
        merged_bases.update(load_yaml_with_bases(path.parent / base))  # shallow, in order, as MindFormers does
    return _merge_mindformers(data, merged_bases)


@cache
def _catalog() -> dict[str, Any]:
    return _read_yaml(CONFIG_DIR / "catalog.yaml")


def list_models() -> list[str]:
    """Model names, in catalog order."""
    return list(_catalog()["models"])


MODELS: tuple[str, ...] = tuple(list_models())


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")


def config_path(model: str, phase: str) -> Path:
    """Path of the shipped YAML for a model and phase (it has base_config; MindFormers can load it directly)."""
    _check_model(model)
    if phase not in PHASES:
        raise ConfigError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    return CONFIG_DIR / model / f"{phase}.yaml"


@cache
def _load_cached(model: str, phase: str) -> dict[str, Any]:
    return load_yaml_with_bases(config_path(model, phase))


def load_config(model: str, phase: str) -> dict[str, Any]:
    """The fully resolved config (base_config merged) as a fresh dict the caller may modify."""
    return copy.deepcopy(_load_cached(model, phase))


def architecture(model: str) -> TeleChat2Config:
    """The model's architecture, read from `<model>/model.yaml`."""
    _check_model(model)
    model_config = load_yaml_with_bases(CONFIG_DIR / model / "model.yaml")["model"]["model_config"]
    return TeleChat2Config.from_model_config(model_config)


# -- defaults for the operator ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDefaults:
    """What the operator needs to size and start a model's pods, all taken from the shipped configs."""

    model: str
    parallel: dict[str, Any]  # finetune parallel_config (MindFormers keys)
    devices_per_node: int
    nodes: int  # finetune nodes: ceil(devices / devices_per_node), at least 1
    devices: int  # finetune devices: data_parallel * model_parallel * pipeline_stage
    predict_devices: int  # devices of the predict_parallel (serving) layout
    seq_length: int
    env: dict[str, str]
    epochs: int
    learning_rate: float
    batch_size: int
    save_steps: int
    # Host CPU/memory requests (catalog.yaml host_resources): per NPU of a rank pod, and per merge/initializer pod.
    trainer_requests_per_device: dict[str, str] = dataclasses.field(default_factory=dict)
    helper_requests: dict[str, str] = dataclasses.field(default_factory=dict)

    def trainer_requests(self, devices_per_node: int) -> dict[str, str]:
        """A rank pod's CPU/memory requests for `devices_per_node` NPUs."""
        return {
            name: scale_quantity(value, devices_per_node) for name, value in self.trainer_requests_per_device.items()
        }


_QUANTITY = re.compile(r"^([0-9]+)(m|Ki|Mi|Gi|Ti)?$")


def scale_quantity(quantity: str, factor: int) -> str:
    """`quantity` x `factor` for the whole-number Kubernetes quantities catalog.yaml uses ("8", "500m", "64Gi")."""
    match = _QUANTITY.match(str(quantity))
    if match is None:
        raise ConfigError(f"catalog.yaml host_resources: {quantity!r} is not a whole-number quantity like 8 or 64Gi")
    return f"{int(match.group(1)) * factor}{match.group(2) or ''}"


def parallel_devices(parallel: Mapping[str, Any]) -> int:
    """Devices a MindFormers parallel_config occupies (expert and sequence parallel reuse data/model ranks)."""
    return (
        int(parallel.get("data_parallel", 1))
        * int(parallel.get("model_parallel", 1))
        * int(parallel.get("pipeline_stage", 1))
        * int(parallel.get("context_parallel", 1))
    )


def _checkpoint_monitor(config: Mapping[str, Any]) -> dict[str, Any]:
    for callback in config.get("callbacks") or []:
        if isinstance(callback, Mapping) and callback.get("type") == "CheckpointMonitor":
            return dict(callback)
    return {}


def model_defaults(model: str) -> ModelDefaults:
    """Parallel layout, node shape, environment and training defaults of a model (its finetune config)."""
    _check_model(model)
    entry = _catalog()["models"][model] or {}
    finetune = load_config(model, "finetune")
    serving = load_config(model, "predict_parallel")
    devices_per_node = int(entry.get("devices_per_node", 8))
    parallel = {key: value for key, value in finetune["parallel_config"].items() if key in PARALLEL_KEYS}
    devices = parallel_devices(parallel)
    env = entry["env"] if "env" in entry else _catalog().get("env", {})
    host = entry.get("host_resources") or {}
    return ModelDefaults(
        model=model,
        parallel=parallel,
        devices_per_node=devices_per_node,
        nodes=max(1, math.ceil(devices / devices_per_node)),
        devices=devices,
        predict_devices=parallel_devices(serving["parallel_config"]),
        seq_length=int(finetune["model"]["model_config"]["seq_length"]),
        env={str(k): str(v) for k, v in env.items()},
        epochs=int(finetune["runner_config"]["epochs"]),
        learning_rate=float(finetune["lr_schedule"]["learning_rate"]),
        batch_size=int(finetune["runner_config"]["batch_size"]),
        save_steps=int(_checkpoint_monitor(finetune).get("save_checkpoint_steps", 0)),
        trainer_requests_per_device={str(k): str(v) for k, v in (host.get("trainer_per_device") or {}).items()},
        helper_requests={str(k): str(v) for k, v in (host.get("helper") or {}).items()},
    )


# -- overrides and rendering ------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def finetune_overrides(
    *,
    dataset_path: str | None = None,
    load_checkpoint: str | None = None,
    output_dir: str | None = None,
    parallel: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    learning_rate: float | None = None,
    seq_length: int | None = None,
    batch_size: int | None = None,
    save_steps: int | None = None,
    resume: bool | None = None,
) -> dict[str, Any]:
    """Map user-level finetune settings onto MindFormers YAML keys (for `render_config`). None = keep default.

    `learning_rate` also sets the cosine schedule's `lr_end` to a tenth of it, the seed's ratio.
    `save_steps` is merged into the CheckpointMonitor callback (render_config merges callback lists by type).
    """
    out: dict[str, Any] = {}
    if dataset_path is not None:
        out["train_dataset"] = {"data_loader": {"dataset_dir": str(dataset_path)}}
    if load_checkpoint is not None:
        out["load_checkpoint"] = str(load_checkpoint)
    if output_dir is not None:
        out["output_dir"] = str(output_dir)
    if parallel is not None:
        unknown = sorted(set(parallel) - set(PARALLEL_KEYS))
        if unknown:
            raise ConfigError(f"unknown parallel key(s) {', '.join(unknown)}; known: {', '.join(PARALLEL_KEYS)}")
        out["parallel_config"] = dict(parallel)
    runner: dict[str, Any] = {}
    if epochs is not None:
        runner["epochs"] = _positive_int("epochs", epochs)
    if batch_size is not None:
        runner["batch_size"] = _positive_int("batch_size", batch_size)
    if runner:
        out["runner_config"] = runner
    if learning_rate is not None:
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float) or not learning_rate > 0:
            raise ConfigError(f"learning_rate must be a positive number, got {learning_rate!r}")
        out["lr_schedule"] = {"learning_rate": float(learning_rate), "lr_end": float(learning_rate) / 10}
    if seq_length is not None:
        out["model"] = {"model_config": {"seq_length": _positive_int("seq_length", seq_length)}}
    if save_steps is not None:
        out["callbacks"] = [
            {"type": "CheckpointMonitor", "save_checkpoint_steps": _positive_int("save_steps", save_steps)}
        ]
    if resume is not None:
        out["resume_training"] = bool(resume)
    return out


def _expand_dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}} (MindFormers' merge_from_dict spelling), merged with nested keys."""
    expanded: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        expanded = deep_merge(expanded, {parts[0]: nested})
    return expanded


def _is_typed_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, Mapping) and "type" in item for item in value)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge override into a copy of base. Mappings merge; lists of {type: ...} entries (callbacks) merge by type,
    so an override can change one callback's setting; anything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = deep_merge(current, value)
        elif _is_typed_list(value) and _is_typed_list(current):
            items = [copy.deepcopy(dict(item)) for item in current]
            for entry in value:
                match = next((i for i, item in enumerate(items) if item["type"] == entry["type"]), None)
                if match is None:
                    items.append(copy.deepcopy(dict(entry)))
                else:
                    items[match] = deep_merge(items[match], entry)
            merged[key] = items
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate_config(config: Mapping[str, Any], phase: str) -> TeleChat2Config:
    """Check that the architecture is consistent and the parallel layout can split it; return the architecture."""
    try:
        arch = TeleChat2Config.from_model_config(dict(config["model"]["model_config"]))
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"model.model_config: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"model.model_config: {exc}") from exc
    parallel = config.get("parallel_config") or {}
    unknown = sorted(set(parallel) - set(PARALLEL_KEYS))
    if unknown:
        raise ConfigError(f"parallel_config: unknown key(s) {', '.join(unknown)}")
    sizes = {}
    for key in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "micro_batch_num"):
        sizes[key] = _positive_int(f"parallel_config.{key}", parallel.get(key, 1))
    dp, mp, pp, ep = (sizes[k] for k in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel"))
    problems = []
    if arch.num_heads % mp:
        problems.append(f"model_parallel {mp} does not divide num_heads {arch.num_heads}")
    if arch.n_kv_heads % mp:
        problems.append(f"model_parallel {mp} does not divide n_kv_heads {arch.n_kv_heads}")
    if arch.intermediate_size % mp:
        problems.append(f"model_parallel {mp} does not divide intermediate_size {arch.intermediate_size}")
    if arch.vocab_size % mp:
        problems.append(f"model_parallel {mp} does not divide vocab_size {arch.vocab_size}")
    if pp > arch.num_layers:
        problems.append(f"pipeline_stage {pp} exceeds num_layers {arch.num_layers}")
    if pp > 1 and sizes["micro_batch_num"] < pp:
        problems.append(f"micro_batch_num {sizes['micro_batch_num']} must be >= pipeline_stage {pp}")
    if ep > 1:
        if not arch.is_moe:
            problems.append(f"expert_parallel {ep} needs a mixture-of-experts model")
        elif arch.num_experts % ep:
            problems.append(f"expert_parallel {ep} does not divide num_experts {arch.num_experts}")
        if dp % ep:
            problems.append(f"expert_parallel {ep} must divide data_parallel {dp}")
    if problems:
        raise ConfigError("parallel_config: " + "; ".join(problems))
    if phase == "finetune":
        for name in ("epochs", "batch_size"):
            _positive_int(f"runner_config.{name}", (config.get("runner_config") or {}).get(name, 1))
    return arch


class _PureDumper(yaml.SafeDumper):
    """Plain YAML: no anchors/aliases, so the rendered file reads the same to any YAML reader."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# libyaml's emitter writes the same bytes some 4x faster (the operator renders one config per job); the pure-Python
# dumper is the fallback where PyYAML was built without libyaml. A test checks both give identical output.
if getattr(yaml, "CSafeDumper", None) is not None:

    class _Dumper(yaml.CSafeDumper):  # type: ignore[name-defined,misc]
        """`_PureDumper` on libyaml's emitter."""

        def ignore_aliases(self, data: Any) -> bool:
            return True

else:  # pragma: no cover - depends on how PyYAML was built
    _Dumper = _PureDumper  # type: ignore[misc]


def render_config(model: str, phase: str, overrides: Mapping[str, Any] | None = None) -> str:
    """Self-contained YAML for a model and phase with overrides deep-merged and validated.

    Override keys may be nested mappings or dotted paths ("parallel_config.data_parallel"); a top-level key
    that is neither in the config nor a known MindFormers key is rejected by name. Same input, same bytes.
    """
    config = load_config(model, phase)
    overrides = _expand_dotted(overrides or {})
    unknown = sorted(key for key in overrides if key not in config and key not in EXTRA_TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) in overrides: {', '.join(unknown)}")
    config = deep_merge(config, overrides)
    validate_config(config, phase)
    header = (
        f"# TeleChat2 MindFormers config: model {model}, phase {phase}.\n"
        "# Rendered by telechat2.configs.render_config from telechat2/configs; self-contained (no base_config).\n"
    )
    if overrides:
        header += f"# Overridden: {', '.join(sorted(_leaf_paths(overrides)))}\n"
    return header + _dump(config, _Dumper)


def _dump(config: Mapping[str, Any], dumper: type) -> str:
    return yaml.dump(config, Dumper=dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)


def _leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            paths.extend(_leaf_paths(value, path + "."))
        elif _is_typed_list(value) and value:
            for entry in value:
                rest = {k: v for k, v in entry.items() if k != "type"}
                paths.extend(_leaf_paths(rest, f"{path}[{entry['type']}].") if rest else [f"{path}[{entry['type']}]"])
        else:
            paths.append(path)
    return paths


def model_config_fields() -> frozenset[str]:
    """Architecture keys allowed in model.model_config (TeleChat2Config fields)."""
    return frozenset(f.name for f in dataclasses.fields(TeleChat2Config)) - {"extra"}


__all__ = [
    "CONFIG_DIR",
    "MODELS",
    "PARALLEL_KEYS",
    "PHASES",
    "RUNTIME_MODEL_KEYS",
    "ConfigError",
    "ModelDefaults",
    "architecture",
    "config_path",
    "deep_merge",
    "finetune_overrides",
    "list_models",
    "load_config",
    "load_yaml_with_bases",
    "model_config_fields",
    "model_defaults",
    "parallel_devices",
    "render_config",
    "scale_quantity",
    "validate_config",
]
