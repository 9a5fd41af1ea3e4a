"""The ConfigMap holding the MindFormers YAML every rank reads (rendered by `telechat2.configs`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.finetune import names
from telechat_operator.finetune.names import metadata
from telechat_operator.finetune.spec import FinetuneSpec

Renderer = Callable[[FinetuneSpec], str]


def render_finetune_config(spec: FinetuneSpec) -> str:
    """Render the finetune YAML for the spec's model, layout and overrides (pure Python, lazy import)."""
    from telechat2 import configs

    overrides = configs.finetune_overrides(
        dataset_path=spec.dataset_path,
        load_checkpoint=spec.load_checkpoint,
        output_dir=spec.output_path,
        parallel=spec.parallel.as_config(),
        epochs=spec.training.epochs,
        learning_rate=spec.training.learning_rate,
        seq_length=spec.training.seq_length,
        batch_size=spec.training.batch_size,
        save_steps=spec.training.save_steps,
        resume=False,  # resuming is per attempt: the rank command adds --resume, the config stays the same
    )
    return configs.render_config(spec.model, "finetune", overrides)


def build_config_map(spec: FinetuneSpec, render: Renderer = render_finetune_config) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(spec, names.config_map(spec.name)),
        "data": {c.CONFIG_KEY: render(spec)},
    }
