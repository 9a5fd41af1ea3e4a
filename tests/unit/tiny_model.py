"""Tiny random TeleChat2 models and checkpoints for tests (shared by the model, train, convert and server tests).

Weights come from a seeded numpy generator, not MindSpore's initialiser, so the same seed gives the same model in
every process. They are larger than the real init std (0.0048) on purpose: tiny random models with realistic
weights produce nearly flat logits, and tests of greedy decoding need clear winners.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from telechat2.configuration import TeleChat2Config

TINY_ARCHITECTURE: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "n_kv_heads": 2,
    "intermediate_size": 128,
    "seq_length": 64,
    "max_position_embedding": 64,
    "training_seqlen": 64,
}


def tiny_config(**overrides: Any) -> TeleChat2Config:
    """The `telechat2-tiny` architecture (2 layers, hidden 64, 4 heads, 2 KV heads, FFN 128, vocab 512)."""
    return TeleChat2Config(**{**TINY_ARCHITECTURE, **overrides})


def random_weights(model, seed: int = 0, std: float = 0.08, bias_std: float = 0.05) -> dict[str, np.ndarray]:
    """Draw every parameter of `model` from a seeded generator (norm weights around 1); returns them by name."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in model.parameters_and_names():
        shape = param.shape
        if name.endswith("norm.weight") or name.endswith("norm_out.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = bias_std * rng.standard_normal(shape)
        else:
            value = std * rng.standard_normal(shape)
        weights[name] = value.astype(np.float32)
        param.set_data(ms.Tensor(weights[name], param.dtype))
    return weights


def build_tiny_model(seed: int = 0, **overrides: Any):
    """A TeleChat2ForCausalLM with the tiny architecture (plus overrides) and seeded random weights."""
    from telechat2.modeling import TeleChat2ForCausalLM

    model = TeleChat2ForCausalLM(tiny_config(**overrides))
    random_weights(model, seed)
    model.set_train(False)
    return model


def save_tiny_checkpoint(path: str | Path, seed: int = 0, **overrides: Any) -> tuple[TeleChat2Config, Path]:
    """Write a tiny model's checkpoint (MindSpore .ckpt, research-layout names) and return its config and path."""
    import mindspore as ms

    model = build_tiny_model(seed, **overrides)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save_checkpoint(model, str(path))
    return model.architecture, path
