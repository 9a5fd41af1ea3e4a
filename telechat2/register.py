"""TeleChat2 as a MindFormers model, so MindFormers YAML and its Trainer can name it.

A YAML `model` section then reads:

    model:
      arch: {type: TeleChat2ForCausalLM}
      model_config: {type: TeleChat2Config, hidden_size: 4096, ...}

MindFormers' Trainer wants a `PreTrainedModel` whose `config` is a `PretrainedConfig`, so this module wraps our
plain classes: `TeleChat2MFConfig` carries the YAML keys (architecture plus whatever runtime keys MindFormers adds,
such as parallel_config) and converts to `telechat2.configuration.TeleChat2Config`; `TeleChat2MFForCausalLM` is the same
network as `telechat2.modeling.TeleChat2ForCausalLM` (same parameter names, same construct) with MindFormers' base
class added. MindFormers' own TeleChat2 classes are registered under its new-API names, so ours do not clash.
Importing this module imports MindFormers (several seconds); `telechat2.modeling` does not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.modules.transformer.moe import MoEConfig
from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

import telechat2.tokenizer
from telechat2.configuration import TeleChat2Config
from telechat2.modeling import TeleChat2ForCausalLM
from telechat2.parallel import apply_parallel_plan, semi_auto_parallel_active

MODEL_TYPE_NAME = "TeleChat2ForCausalLM"  # YAML model.arch.type
CONFIG_TYPE_NAME = "TeleChat2Config"  # YAML model.model_config.type
_ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(TeleChat2Config) if f.name != "extra")


class TeleChat2MFConfig(PretrainedConfig):
    """MindFormers view of a TeleChat2 `model_config`: every key is kept as an attribute."""

    model_type = "telechat2"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("type", None)
        architecture = {key: kwargs.pop(key) for key in _ARCHITECTURE_FIELDS if key in kwargs}
        defaults = dataclasses.asdict(TeleChat2Config(**architecture))
        defaults.pop("extra")
        super().__init__(**kwargs)
        for key, value in defaults.items():
            setattr(self, key, value)
        self.use_past = kwargs.get("use_past", False)  # the Trainer refuses to train a model with use_past set

    def __setattr__(self, key: str, value: Any) -> None:
        # The Trainer sets parallel_config/moe_config after construction; MindFormers serialises them with to_dict.
        if key == "parallel_config" and isinstance(value, dict):
            value = TransformerOpParallelConfig(**value)
        elif key == "moe_config" and isinstance(value, dict):
            value = MoEConfig(**value)
        super().__setattr__(key, value)

    def to_architecture(self) -> TeleChat2Config:
        """The architecture dataclass the network is built from (validated there)."""
        values = {key: getattr(self, key) for key in _ARCHITECTURE_FIELDS}
        for key in ("compute_dtype", "param_init_type"):  # MindFormers may have turned these into dtypes
            values[key] = str(values[key]).replace("mindspore.", "").lower()
        return TeleChat2Config(**values)


class TeleChat2MFForCausalLM(TeleChat2ForCausalLM, PreTrainedModel):
    """`TeleChat2ForCausalLM` under MindFormers' `PreTrainedModel`, built from a `TeleChat2MFConfig` (or a dict)."""

    config_class = TeleChat2MFConfig
    base_model_prefix = "model"

    def __init__(self, config: TeleChat2MFConfig | TeleChat2Config | dict[str, Any], **_: Any) -> None:
        if isinstance(config, TeleChat2Config):
            config = TeleChat2MFConfig(**config.to_model_config())
        elif isinstance(config, dict):
            config = TeleChat2MFConfig(**config)
        PreTrainedModel.__init__(self, config)  # nn.Cell and GenerationMixin set-up; not TeleChat2ForCausalLM's
        self._build(config.to_architecture())
        parallel_config = getattr(config, "parallel_config", None)
        if parallel_config is not None and semi_auto_parallel_active():
            # MindFormers' Trainer builds the network here after build_context set the parallel mode: the one
            # place every semi-auto parallel run (finetune through telechat2.finetune, or MindFormers' own scripts)
            # passes through. Data-parallel and stand-alone runs (CPU) skip it.
            apply_parallel_plan(self, parallel_config, offset=getattr(config, "offset", 0) or 0)


def register_with_mindformers() -> None:
    """Register the model, its config and the tokenizer under their YAML type names (`model.arch.type`,
    `model.model_config.type`, `processor.tokenizer.type: TeleChat2Tokenizer`). Safe to call any number of times.
    """
    telechat2.tokenizer.register_with_mindformers()
    for cls, module_type, name in (
        (TeleChat2MFConfig, MindFormerModuleType.CONFIG, CONFIG_TYPE_NAME),
        (TeleChat2MFForCausalLM, MindFormerModuleType.MODELS, MODEL_TYPE_NAME),
    ):
        registered = MindFormerRegister.registry.get(module_type, {}).get(name)
        if registered is not cls:
            MindFormerRegister.register_cls(cls, module_type=module_type, alias=name)
