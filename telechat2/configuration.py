"""TeleChat2 architecture as a plain dataclass: what the weights look like, nothing about runtime.

Pure Python (no MindSpore import) so the operator, `telechat2 describe` and the charts' docs can read model
sizes. The values of each size live once, in `telechat2/configs/<model>/*.yaml` (`model.model_config`);
`TeleChat2Config.from_model_config` reads them from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TeleChat2Config:
    """Architecture of one TeleChat2 model; field names follow MindFormers' `model_config` keys."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    num_layers: int = 30
    num_heads: int = 32
    n_kv_heads: int | None = None  # None = num_heads (no grouped-query attention)
    intermediate_size: int = 12288  # FFN width; per expert for MoE
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    seq_length: int = 8192  # longest sequence this run handles (rotary follows each sequence's own length)
    max_position_embedding: int = 8192  # base_seqlen of dynamic NTK
    training_seqlen: int = 8192
    # "None" or "DYNAMIC_NTK", kept for MindFormers YAML: dynamic NTK applies either way, per sequence length, as in
    # the official model (telechat2.modeling.dynamic_ntk_base_and_mscale).
    extend_method: str = "None"
    initializer_range: float = 0.0048
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    ignore_token_id: int = -100
    # Mixture of experts (39B-A12B); num_experts 0 = dense.
    num_experts: int = 0
    num_experts_per_tok: int = 4
    norm_topk_prob: bool = True
    capacity_factor: float = 1.2
    aux_loss_factor: float = 0.01
    # Kernel choices: portable ops on CPU, Ascend fused kernels when asked.
    use_flash_attention: bool = False
    use_fused_rms_norm: bool = False
    qkv_concat: bool = False
    compute_dtype: str = "float32"
    param_init_type: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown YAML keys, kept for round trips

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.num_heads
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.n_kv_heads:
            problems.append(f"num_heads {self.num_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}")
        if self.extend_method not in ("None", "DYNAMIC_NTK"):
            problems.append(f"extend_method {self.extend_method!r} must be 'None' or 'DYNAMIC_NTK'")
        if problems:
            raise ValueError("invalid TeleChat2 config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_model_config(cls, model_config: dict[str, Any]) -> TeleChat2Config:
        """Build from a MindFormers `model.model_config` mapping; unknown keys go to `extra`."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in model_config.items() if k in known}
        extra = {k: v for k, v in model_config.items() if k not in known}
        return cls(**values, extra=extra)

    def to_model_config(self) -> dict[str, Any]:
        """The inverse of `from_model_config`."""
        values = dataclasses.asdict(self)
        extra = values.pop("extra")
        return {**extra, **values}
