"""The one mapping between Hugging Face (torch) TeleChat2 weights and the MindSpore (MindFormers research) layout.

Both directions of conversion, the checks that name missing, unexpected or mis-shaped tensors, and the model's own
parameter names are derived from `conversion_plan`, so a layout change is made here and nowhere else.

Every MindSpore tensor is the concatenation, along axis 0 in C order, of one or more *pieces* taken from Hugging
Face tensors. That covers every case of the layout:
- renames (one piece, copied);
- MoE experts stacked on a new axis 0 (E pieces, one per expert), the expert down bias as [1, E, 1, H];
- qkv_concat: `w_qkv` = Q, then all K heads, then all V heads (the K and V pieces are cut out of the per-head
  interleaved `key_value`), and `w_gate_hidden` = w1 then w3.
Because pieces are concatenated along axis 0, each piece is a contiguous byte range of the MindSpore tensor: the
converter writes them one after another and never holds more than one Hugging Face tensor in memory.

Pure Python (no MindSpore import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from telechat2.configuration import TeleChat2Config

PieceOp = Literal["copy", "k_of_kv", "v_of_kv"]


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor (or its K or V half) that forms a contiguous run of a MindSpore tensor."""

    hf_name: str
    op: PieceOp = "copy"


@dataclass(frozen=True)
class TensorPlan:
    """A MindSpore tensor: its name, shape and the pieces concatenated (axis 0, C order) to form it."""

    ms_name: str
    ms_shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def hf_shapes(config: TeleChat2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face TeleChat2 checkpoint with its shape, in checkpoint order."""
    hidden, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv_rows = 2 * config.n_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"transformer.word_embeddings.weight": (vocab, hidden)}
    for layer in range(config.num_layers):
        p = f"transformer.h.{layer}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attention.query.weight"] = (hidden, hidden)
        shapes[p + "self_attention.key_value.weight"] = (kv_rows, hidden)
        shapes[p + "self_attention.dense.weight"] = (hidden, hidden)
        shapes[p + "self_attention.dense.bias"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        if config.is_moe:
            shapes[p + "mlp.router.weight"] = (config.num_experts, hidden)
            for e in range(config.num_experts):
                q = f"{p}mlp.local_experts.{e}."
                shapes[q + "gate_proj.weight"] = (ffn, hidden)
                shapes[q + "up_proj.weight"] = (ffn, hidden)
                shapes[q + "down_proj.weight"] = (hidden, ffn)
                shapes[q + "down_proj.bias"] = (hidden,)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (ffn, hidden)
            shapes[p + "mlp.up_proj.weight"] = (ffn, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, ffn)
            shapes[p + "mlp.down_proj.bias"] = (hidden,)
    shapes["transformer.ln_f.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def conversion_plan(config: TeleChat2Config, qkv_concat: bool = False) -> list[TensorPlan]:
    """The MindSpore tensors of `config` in checkpoint order, each with the Hugging Face pieces that form it.

    qkv_concat applies to attention (w_qkv) and dense MLPs (w_gate_hidden); MoE experts stay stacked w1/w3/w2
    (the seed's converter concatenates only the dense feed-forward).
    """
    hidden, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv_width = config.n_kv_heads * config.head_dim
    plan = [
        TensorPlan(
            "model.tok_embeddings.embedding_weight", (vocab, hidden), (Piece("transformer.word_embeddings.weight"),)
        )
    ]

    def add(ms_name: str, shape: tuple[int, ...], *pieces: Piece) -> None:
        plan.append(TensorPlan(ms_name, shape, pieces))

    for layer in range(config.num_layers):
        p, m = f"transformer.h.{layer}.", f"model.layers.{layer}."
        add(m + "attention_norm.weight", (hidden,), Piece(p + "input_layernorm.weight"))
        query, key_value = Piece(p + "self_attention.query.weight"), p + "self_attention.key_value.weight"
        if qkv_concat:
            add(
                m + "attention.w_qkv.weight",
                (hidden + 2 * kv_width, hidden),
                query,
                Piece(key_value, "k_of_kv"),
                Piece(key_value, "v_of_kv"),
            )
        else:
            add(m + "attention.wq.weight", (hidden, hidden), query)
            add(m + "attention.wk_v.weight", (2 * kv_width, hidden), Piece(key_value))
        add(m + "attention.wo.weight", (hidden, hidden), Piece(p + "self_attention.dense.weight"))
        add(m + "attention.wo.bias", (hidden,), Piece(p + "self_attention.dense.bias"))
        add(m + "ffn_norm.weight", (hidden,), Piece(p + "post_attention_layernorm.weight"))
        if config.is_moe:
            experts = range(config.num_experts)
            e_prefix = [f"{p}mlp.local_experts.{e}." for e in experts]
            add(m + "feed_forward.router.dense.weight", (config.num_experts, hidden), Piece(p + "mlp.router.weight"))
            n = config.num_experts
            add(m + "feed_forward.ffn.w1.weight", (n, ffn, hidden), *(Piece(q + "gate_proj.weight") for q in e_prefix))
            add(m + "feed_forward.ffn.w3.weight", (n, ffn, hidden), *(Piece(q + "up_proj.weight") for q in e_prefix))
            add(m + "feed_forward.ffn.w2.weight", (n, hidden, ffn), *(Piece(q + "down_proj.weight") for q in e_prefix))
            add(m + "feed_forward.ffn.w2.bias", (1, n, 1, hidden), *(Piece(q + "down_proj.bias") for q in e_prefix))
        else:
            gate, up = Piece(p + "mlp.gate_proj.weight"), Piece(p + "mlp.up_proj.weight")
            if qkv_concat:
                add(m + "feed_forward.w_gate_hidden.weight", (2 * ffn, hidden), gate, up)
            else:
                add(m + "feed_forward.w1.weight", (ffn, hidden), gate)
                add(m + "feed_forward.w3.weight", (ffn, hidden), up)
            add(m + "feed_forward.w2.weight", (hidden, ffn), Piece(p + "mlp.down_proj.weight"))
            add(m + "feed_forward.w2.bias", (hidden,), Piece(p + "mlp.down_proj.bias"))
    add("model.norm_out.weight", (hidden,), Piece("transformer.ln_f.weight"))
    add("lm_head.weight", (vocab, hidden), Piece("lm_head.weight"))
    return plan


def ms_shapes(config: TeleChat2Config, qkv_concat: bool = False) -> dict[str, tuple[int, ...]]:
    """Every parameter of the MindSpore model with its shape (what the model defines and a checkpoint holds)."""
    return {t.ms_name: t.ms_shape for t in conversion_plan(config, qkv_concat)}


def piece_shape(piece: Piece, hf_shape: tuple[int, ...], config: TeleChat2Config) -> tuple[int, ...]:
    """Shape of a piece once cut out of its Hugging Face tensor (K or V half of key_value, else the tensor)."""
    if piece.op == "copy":
        return hf_shape
    return (config.n_kv_heads * config.head_dim, *hf_shape[1:])


def piece_size(piece: Piece, hf_shape: tuple[int, ...], config: TeleChat2Config) -> int:
    return math.prod(piece_shape(piece, hf_shape, config))


def check_plan_shapes(plan: list[TensorPlan], hf: dict[str, tuple[int, ...]], config: TeleChat2Config) -> None:
    """Internal consistency: the pieces of each tensor add up to its size (guards edits of this file)."""
    for tensor in plan:
        total = sum(piece_size(p, hf[p.hf_name], config) for p in tensor.pieces)
        if total != math.prod(tensor.ms_shape):
            raise AssertionError(f"{tensor.ms_name}: pieces hold {total} values, shape {tensor.ms_shape} needs more")


def architecture_from_hf_config(hf_config: dict) -> TeleChat2Config:
    """A TeleChat2Config from a Hugging Face `config.json` (TeleChat2's own keys or the Llama-style aliases)."""

    def pick(*keys: str, default=None):
        for key in keys:
            if key in hf_config and hf_config[key] is not None:
                return hf_config[key]
        if default is not None:
            return default
        raise ValueError(f"config.json has none of the keys {', '.join(keys)}")

    num_heads = int(pick("n_head", "num_attention_heads"))
    return TeleChat2Config(
        vocab_size=int(pick("vocab_size")),
        hidden_size=int(pick("hidden_size", "n_embd")),
        num_layers=int(pick("n_layer", "num_hidden_layers")),
        num_heads=num_heads,
        n_kv_heads=int(pick("num_key_value_heads", "n_kv_heads", default=num_heads)),
        intermediate_size=int(pick("ffn_hidden_size", "intermediate_size")),
        rms_norm_eps=float(pick("layer_norm_epsilon", "rms_norm_eps", default=1e-5)),
        num_experts=int(pick("num_experts", "num_local_experts", "moe_num_experts", "n_experts", default=0) or 0),
        num_experts_per_tok=int(pick("num_experts_per_tok", "moe_topk", default=4)),
    )


# config.json keys the official code reads (Tele-AI/TeleChat2 configuration_telechat2.py `Telechat2Config.__init__`
# and modeling_telechat2.py, which also reads `base_seqlen` and `flash_attn` straight off the config: a file
# without them fails with AttributeError). `auto_map` lets `from_pretrained(..., trust_remote_code=True)` find those
# two files once copied next to the weights; `architectures` is the name vLLM registers for TeleChat2.
HF_AUTO_MAP = {
    "AutoConfig": "configuration_telechat2.Telechat2Config",
    "AutoModelForCausalLM": "modeling_telechat2.Telechat2ForCausalLM",
}
HF_ARCHITECTURE = "TeleChat2ForCausalLM"


def hf_config_dict(config: TeleChat2Config, torch_dtype: str = "float32") -> dict:
    """A Hugging Face `config.json` for `config` that the official TeleChat2 code loads (written by convert-reversed).

    `flash_attn` is on for float16/bfloat16 weights only: the official flash path asserts half precision.
    """
    out = {
        "architectures": [HF_ARCHITECTURE],
        "auto_map": dict(HF_AUTO_MAP),
        "model_type": "telechat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "num_key_value_heads": config.n_kv_heads,
        "ffn_hidden_size": config.intermediate_size,
        "layer_norm_epsilon": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "hidden_act": "silu",
        "apply_residual_connection_post_layernorm": False,
        "embed_layernorm": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "use_cache": True,
        "logn": False,
        "flash_attn": torch_dtype in ("float16", "bfloat16"),
        "unk_token_id": 0,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": False,
        "seq_length": config.seq_length,
        "training_seqlen": config.training_seqlen,
        "base_seqlen": config.max_position_embedding,
        "torch_dtype": torch_dtype,
    }
    if config.is_moe:
        out["num_experts"] = config.num_experts
        out["num_experts_per_tok"] = config.num_experts_per_tok
    return out
