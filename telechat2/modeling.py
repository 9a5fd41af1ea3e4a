"""TeleChat2 on MindSpore, in one file: norm, rotary embedding, attention, MLP, mixture of experts, decoder layer,
causal LM.

Submodule names equal the MindFormers research checkpoint keys (`model.layers.N.attention.wk_v.weight`, ...), so a
converted checkpoint loads with `mindspore.load_param_into_net` and no renaming. Shapes are commented as
B = batch, S = new tokens, T = cached + new tokens, H = hidden, N = heads, K = KV heads, D = head_dim, E = experts.

Portable MindSpore ops run everywhere (CPU included); the Ascend fused kernels (flash attention, fused RMSNorm) are
used only when `use_flash_attention` / `use_fused_rms_norm` ask for them. `construct(input_ids, labels)` is the
graph-mode friendly training entry; `forward(input_ids, past_key_values, start_pos)` runs a prompt (or any chunk)
against a growing cache in PyNative mode, and `static_decoder()` gives the compiled one-token step with fixed-size
caches that `telechat2.generation` uses after the prompt.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer

from telechat2.configuration import TeleChat2Config

_MASKED = -1e9  # additive attention mask value: finite, so a fully masked row stays NaN-free
_SCORES_MATMUL = ops.BatchMatMul(transpose_b=True)  # queries [..., n, D] x keys [..., L, D] -> scores [..., n, L]

# One layer's cache: key and value before the GQA repeat, each [B, K, T, D].
LayerCache = tuple[Tensor, Tensor]


def _dtype(name: str) -> ms.dtype:
    """MindSpore dtype from its YAML name (`float32`, `float16`, `bfloat16`)."""
    dtypes = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding and dynamic NTK: pure numpy helpers.
#
# The official TeleChat2 model (Tele-AI/TeleChat2 modeling_telechat*.py, `RotaryEmbedding.forward`) recomputes the
# rotary table on every forward pass from the current total length L (cached + new tokens), floored at
# training_seqlen, and always (its NTK branch is `if True:`). So a sequence's rotary depends on its own length, not
# on the deployment's seq_length, and in decoding each new token is rotated with the alpha and mscale of the length
# reached so far (cached keys keep the rotation they were computed with).
# ---------------------------------------------------------------------------------------------------------------


def dynamic_ntk_alpha(seq_len: int, config: TeleChat2Config) -> int:
    """NTK alpha for a sequence of `seq_len` tokens: max(2^ceil(log2(L / base_seqlen) + 1) - 1, 1).

    L = max(seq_len, training_seqlen); base_seqlen is `max_position_embedding`. `math.log(x, 2)`, as the official
    code writes it (it differs from `math.log2` in the last bit for some x, which can move a ceil).
    """
    length = max(seq_len, config.training_seqlen)
    return max(2 ** math.ceil(math.log(length / config.max_position_embedding, 2) + 1) - 1, 1)


def dynamic_ntk_base_and_mscale(seq_len: int, config: TeleChat2Config) -> tuple[float, float]:
    """Rotary base and cos/sin scale for a sequence whose current total length is `seq_len` (facts file, section 8).

    base' = rope_theta * alpha^(D / (D - 2)); mscale = 1 + 0.1 * ln(L / training_seqlen) past the trained length,
    else 1. Always on, as in the official model, whatever `extend_method` says (within training_seqlen and with
    base_seqlen = training_seqlen this is plain RoPE).
    """
    length = max(seq_len, config.training_seqlen)
    alpha = dynamic_ntk_alpha(seq_len, config)
    dim = config.head_dim
    base = config.rope_theta * alpha ** (dim / (dim - 2))
    scale = length / config.training_seqlen
    mscale = 1.0 + 0.1 * math.log(scale) if scale > 1 else 1.0
    return float(base), float(mscale)


def rotary_cos_sin(
    seq_len: int, head_dim: int, base: float, mscale: float = 1.0, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [seq_len - start, head_dim] of positions start..seq_len-1 for GPT-NeoX rotate-half RoPE: angles
    are cat(freqs, freqs)."""
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [D/2]
    freqs = np.outer(np.arange(start, seq_len, dtype=np.float64), inv_freq)  # [S, D/2]
    angles = np.concatenate([freqs, freqs], axis=-1)  # [S, D]
    return (np.cos(angles) * mscale).astype(np.float32), (np.sin(angles) * mscale).astype(np.float32)


def sequence_rotary(start_pos: int, total_length: int, config: TeleChat2Config) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [total_length - start_pos, D] for the new tokens of a sequence now `total_length` long (official)."""
    base, mscale = dynamic_ntk_base_and_mscale(total_length, config)
    return rotary_cos_sin(total_length, config.head_dim, base, mscale, start=start_pos)


@ms.constexpr
def _rotary_constant(
    start_pos: int, key_len: int, head_dim: int, rope_theta: float, training_seqlen: int, base_seqlen: int
) -> Tensor:
    """`sequence_rotary` as one float32 tensor [2 (cos, sin), S, D]; a compile-time constant in graph mode (the
    lengths are static there), plain numpy in PyNative."""
    config = SimpleNamespace(
        head_dim=head_dim, rope_theta=rope_theta, training_seqlen=training_seqlen, max_position_embedding=base_seqlen
    )
    return Tensor(np.stack(sequence_rotary(start_pos, key_len, config)))


def decode_rotary(positions: np.ndarray, config: TeleChat2Config) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [B, D] for one decoding step of B sequences, row b being the token at positions[b] (its sequence is
    then positions[b] + 1 long, which sets that row's alpha and mscale). For batched decoders."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    rows = [sequence_rotary(int(p), int(p) + 1, config) for p in positions]
    return np.concatenate([c for c, _ in rows]), np.concatenate([s for _, s in rows])


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the last axis, halves not interleaved."""
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), axis=-1)


def apply_rotary_pos_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, N, S, D] by the positions whose cos/sin [S, D] are given."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, K, T, D] -> [B, K * n_rep, T, D]: each KV head serves n_rep query heads (grouped-query attention)."""
    if n_rep == 1:
        return x
    batch, kv_heads, length, dim = x.shape
    x = ops.broadcast_to(x.expand_dims(2), (batch, kv_heads, n_rep, length, dim))
    return x.reshape(batch, kv_heads * n_rep, length, dim)


def causal_mask(query_len: int, key_len: int, start_pos: int) -> Tensor:
    """Boolean [S, T], True where query i (absolute position start_pos + i) must not see key j (j > start_pos + i)."""
    query_pos = ops.arange(query_len, dtype=ms.int32) + start_pos
    key_pos = ops.arange(key_len, dtype=ms.int32)
    return key_pos.expand_dims(0) > query_pos.expand_dims(1)


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------


class TeleChat2Linear(nn.Cell):
    """y = x W^T (+ b) with W [out, in] stored in `param_init_type` and multiplied in `compute_dtype`.

    `dtype` overrides both, for layers that must stay in one precision (the float32 MoE router). The product is a
    2-D `MatMul` primitive (and the bias an `Add`) held as attributes, so `telechat2.parallel` can give them shard
    strategies: column-parallel splits W's rows, row-parallel its columns.
    """

    def __init__(
        self, in_features: int, out_features: int, has_bias: bool, config: TeleChat2Config, dtype=None
    ) -> None:
        super().__init__()
        param_dtype = dtype or _dtype(config.param_init_type)
        self.compute_dtype = dtype or _dtype(config.compute_dtype)
        self.out_features = out_features
        self.weight = Parameter(
            initializer(Normal(sigma=config.initializer_range), (out_features, in_features), param_dtype), name="weight"
        )
        self.matmul = ops.MatMul(transpose_b=True)
        self.has_bias = has_bias
        if has_bias:
            self.bias = Parameter(initializer(Zero(), (out_features,), param_dtype), name="bias")
            self.bias_add = ops.Add()

    def construct(self, x: Tensor) -> Tensor:
        leading = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).astype(self.compute_dtype)  # [M, in]
        y = self.matmul(x, self.weight.astype(self.compute_dtype))  # [M, out]
        if self.has_bias:
            y = self.bias_add(y, self.bias.astype(self.compute_dtype))
        return y.reshape(leading + (self.out_features,))  # noqa: RUF005 (graph mode)


class TeleChat2Embedding(nn.Cell):
    """Token embedding whose parameter is named `embedding_weight`, as in MindFormers checkpoints."""

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        self.compute_dtype = _dtype(config.compute_dtype)
        self.embedding_weight = Parameter(
            initializer(
                Normal(sigma=config.initializer_range),
                (config.vocab_size, config.hidden_size),
                _dtype(config.param_init_type),
            ),
            name="embedding_weight",
        )
        self.gather = ops.Gather()  # a primitive attribute, so the parallel plan can split the vocabulary

    def construct(self, input_ids: Tensor) -> Tensor:
        return self.gather(self.embedding_weight, input_ids, 0).astype(self.compute_dtype)  # [B, S, H]


class TeleChat2RMSNorm(nn.Cell):
    """RMSNorm with a weight only, computed in float32 whatever the compute dtype."""

    def __init__(self, hidden_size: int, config: TeleChat2Config) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.use_fused = config.use_fused_rms_norm
        self.weight = Parameter(initializer(One(), (hidden_size,), ms.float32), name="weight")

    def construct(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.astype(ms.float32)
        if self.use_fused:  # Ascend fused kernel
            return ops.rms_norm(x, self.weight, self.eps)[0].astype(dtype)
        variance = ops.mean(x * x, -1, keep_dims=True)
        return (x * ops.rsqrt(variance + self.eps) * self.weight).astype(dtype)


class TeleChat2Attention(nn.Cell):
    """Multi-head attention with fused, per-KV-head interleaved key_value ([K_h0, V_h0, K_h1, V_h1, ...] rows).

    `qkv_concat` stores one `w_qkv` = concat(Q, K_all, V_all) instead, the layout of the seed's parallel inference.
    Only the output projection `wo` has a bias.
    """

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.n_rep = self.num_heads // self.n_kv_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv_concat = config.qkv_concat
        self.use_flash_attention = config.use_flash_attention
        hidden, kv_width = config.hidden_size, self.n_kv_heads * self.head_dim
        if self.qkv_concat:
            self.w_qkv = TeleChat2Linear(hidden, hidden + 2 * kv_width, False, config)
        else:
            self.wq = TeleChat2Linear(hidden, hidden, False, config)
            self.wk_v = TeleChat2Linear(hidden, 2 * kv_width, False, config)
        self.wo = TeleChat2Linear(hidden, hidden, True, config)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, S, H] -> q [B, N, S, D], k and v [B, K, S, D]."""
        batch, length, _ = x.shape
        if self.qkv_concat:
            qkv = self.w_qkv(x)  # [B, S, H + 2*K*D]
            q_width, kv_width = self.num_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q = qkv[..., :q_width]
            k = qkv[..., q_width : q_width + kv_width].reshape(batch, length, self.n_kv_heads, self.head_dim)
            v = qkv[..., q_width + kv_width :].reshape(batch, length, self.n_kv_heads, self.head_dim)
        else:
            q = self.wq(x)  # [B, S, H]
            kv = self.wk_v(x).reshape(batch, length, self.n_kv_heads, 2 * self.head_dim)  # per head: K then V
            k, v = kv[..., : self.head_dim], kv[..., self.head_dim :]  # [B, S, K, D] each
        q = q.reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def construct(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        past_key: Tensor | None = None,
        past_value: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, S, H], cos/sin [S, D], mask bool [B or 1, 1, S, T] (True = hidden; None = see all) -> (out, k, v).

        k and v [B, K, T, D] include the past ones, so the caller can keep them as the cache.
        """
        batch, length, _ = x.shape
        q, k, v = self._project(x)
        q = apply_rotary_pos_emb(q, cos, sin)
        k = apply_rotary_pos_emb(k, cos, sin)
        if past_key is not None:
            k = ops.cat((past_key, k), axis=2)  # [B, K, T, D]
            v = ops.cat((past_value, v), axis=2)
        if self.use_flash_attention:  # Ascend kernel; takes K heads directly (GQA) and a uint8 mask, 1 = hidden
            fa_mask = None if mask is None else ops.broadcast_to(mask, (batch, 1, length, k.shape[2])).astype(ms.uint8)
            context = ops.flash_attention_score(
                q, k, v, self.num_heads, attn_mask=fa_mask, scalar_value=self.scale, input_layout="BNSD"
            )
        else:
            scores = ops.matmul(q, repeat_kv(k, self.n_rep).swapaxes(-1, -2)).astype(ms.float32) * self.scale
            if mask is not None:
                scores = ops.masked_fill(scores, mask, _MASKED)  # [B, N, S, T]
            probs = ops.softmax(scores, axis=-1).astype(v.dtype)
            context = ops.matmul(probs, repeat_kv(v, self.n_rep))  # [B, N, S, D]
        # heads * head_dim, not x's width: equal on one device, this rank's heads under tensor parallelism
        context = context.transpose(0, 2, 1, 3).reshape(batch, length, self.num_heads * self.head_dim)
        return self.wo(context), k, v

    def decode_static(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        slot: Tensor,
        hidden_keys: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        write_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One new token against fixed-size caches [B, K, L, D] (see `TeleChat2StaticCacheDecoder`).

        slot [1, 1, L, 1] is 1 at the token's position (its K and V are written there), hidden_keys [1, 1, 1, L]
        is True past it. `write_index` [B, K, 3] ((row, kv head, position) per new K/V row), when given, writes
        them by scatter instead of the slot blend. Portable ops only: one query row needs no flash attention.
        """
        batch = x.shape[0]
        q, k, v = self._project(x)
        q = apply_rotary_pos_emb(q, cos, sin)
        k = apply_rotary_pos_emb(k, cos, sin)
        if write_index is None:  # exact: each entry keeps its value or takes the new one
            key_cache = key_cache * (1 - slot) + k * slot
            value_cache = value_cache * (1 - slot) + v * slot
        else:  # the new rows scattered in: one copy of the cache at most, not a blend of four passes over it
            key_cache = ops.tensor_scatter_update(key_cache, write_index, k.reshape(write_index.shape[:-1] + (-1,)))
            value_cache = ops.tensor_scatter_update(value_cache, write_index, v.reshape(write_index.shape[:-1] + (-1,)))
        # the n_rep query heads of a KV head ride in one matmul against the cache as stored ([B, K, n_rep, D] @
        # [B, K, D, L]) instead of a copy of the cache n_rep times wider (repeat_kv)
        kv_heads = key_cache.shape[1]
        grouped = q.reshape(batch, kv_heads, self.n_rep, self.head_dim)  # query head h = kv * n_rep + r
        # [B, K, n_rep, L]; the cache is read transposed in the product, not copied transposed (a copy of the whole
        # cache per layer was a tenth of a 32-row step on CPU)
        scores = _SCORES_MATMUL(grouped, key_cache).astype(ms.float32) * self.scale
        scores = scores.reshape(batch, self.num_heads, 1, -1)
        probs = ops.softmax(ops.masked_fill(scores, hidden_keys, _MASKED), axis=-1).astype(value_cache.dtype)
        probs = probs.reshape(batch, kv_heads, self.n_rep, -1)
        context = ops.matmul(probs, value_cache)  # [B, K, n_rep, D]: head order kv * n_rep + r, as repeat_kv's
        context = context.reshape(batch, 1, self.num_heads * self.head_dim)
        return self.wo(context), key_cache, value_cache


class TeleChat2MLP(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x) + b2; w1 = gate, w3 = up, w2 = down (the only one with a bias).

    `qkv_concat` stores gate and up as one `w_gate_hidden` = concat(w1, w3) [2F, H] instead (the seed's
    parallel-inference layout, written by `telechat2 convert --qkv_concat`).
    """

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        hidden, ffn = config.hidden_size, config.intermediate_size
        self.ffn = ffn
        self.qkv_concat = config.qkv_concat
        if self.qkv_concat:
            self.w_gate_hidden = TeleChat2Linear(hidden, 2 * ffn, False, config)
        else:
            self.w1 = TeleChat2Linear(hidden, ffn, False, config)
            self.w3 = TeleChat2Linear(hidden, ffn, False, config)
        self.w2 = TeleChat2Linear(ffn, hidden, True, config)

    def construct(self, x: Tensor) -> Tensor:
        if self.qkv_concat:
            gate_up = self.w_gate_hidden(x)  # [B, S, 2F]: gate rows first, then up rows
            gate, up = gate_up[..., : self.ffn], gate_up[..., self.ffn :]
        else:
            gate, up = self.w1(x), self.w3(x)  # [B, S, F] each
        return self.w2(ops.silu(gate) * up)


class TeleChat2Router(nn.Cell):
    """Expert scores: a bias-free dense layer in float32 (checkpoint key `router.dense.weight`)."""

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        self.dense = TeleChat2Linear(config.hidden_size, config.num_experts, False, config, dtype=ms.float32)

    def construct(self, x: Tensor) -> Tensor:
        return self.dense(x.astype(ms.float32))


class TeleChat2Experts(nn.Cell):
    """E SwiGLU experts stacked on axis 0: w1/w3 [E, F, H], w2 [E, H, F], w2.bias [1, E, 1, H].

    The three products are `BatchMatMul` primitives over the expert axis (attributes, so the parallel plan can split
    the experts across expert-parallel ranks and each expert's FFN across model-parallel ones).
    """

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        experts, hidden, ffn = config.num_experts, config.hidden_size, config.intermediate_size
        param_dtype, std = _dtype(config.param_init_type), config.initializer_range
        self.num_experts = experts
        self.compute_dtype = _dtype(config.compute_dtype)
        self.w1 = _StackedWeight((experts, ffn, hidden), std, param_dtype)
        self.w3 = _StackedWeight((experts, ffn, hidden), std, param_dtype)
        self.w2 = _StackedWeight((experts, hidden, ffn), std, param_dtype, bias_shape=(1, experts, 1, hidden))
        self.gate_matmul = ops.BatchMatMul(transpose_b=True)
        self.up_matmul = ops.BatchMatMul(transpose_b=True)
        self.down_matmul = ops.BatchMatMul(transpose_b=True)
        self.bias_add = ops.Add()

    def construct(self, x: Tensor) -> Tensor:
        """x [M, H] -> every expert's output [E, M, H] (dense dispatch: simple and exact, E times the FLOPs)."""
        dtype = self.compute_dtype
        tokens, hidden = x.shape
        x = ops.broadcast_to(x.astype(dtype).expand_dims(0), (self.num_experts, tokens, hidden))  # [E, M, H]
        gate = self.gate_matmul(x, self.w1.weight.astype(dtype))  # [E, M, F]
        up = self.up_matmul(x, self.w3.weight.astype(dtype))  # [E, M, F]
        out = self.down_matmul(ops.silu(gate) * up, self.w2.weight.astype(dtype))  # [E, M, H]
        return self.bias_add(out, self.w2.bias.astype(dtype)[0])  # bias [E, 1, H]


class _StackedWeight(nn.Cell):
    """Holder so stacked expert tensors are named `ffn.w1.weight`, `ffn.w2.bias` like the checkpoint."""

    def __init__(self, shape: tuple[int, ...], std: float, dtype, bias_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.weight = Parameter(initializer(Normal(sigma=std), shape, dtype), name="weight")
        if bias_shape is not None:
            self.bias = Parameter(initializer(Zero(), bias_shape, dtype), name="bias")


def load_balancing_loss(router_probs: Tensor, expert_mask: Tensor) -> Tensor:
    """Switch-style auxiliary loss E * sum_e(f_e * P_e).

    router_probs [M, E] are the softmax scores, expert_mask [M, E] is 1 where a token chose the expert (top-k);
    f_e is the share of the M*k choices that went to expert e and P_e its mean score. Equals 1 when balanced.
    """
    num_experts = router_probs.shape[-1]
    choices = expert_mask.sum(axis=0) / expert_mask.sum()  # f_e [E]
    mean_probs = router_probs.mean(axis=0)  # P_e [E]
    return num_experts * (choices * mean_probs).sum()


def expert_capacity(tokens: int, top_k: int, capacity_factor: float, num_experts: int) -> int:
    """Choices one expert takes per forward pass: min(ceil(k * tokens * capacity_factor / E), tokens), as
    MindFormers' `calculate_expert_capacity_v2` (without model-parallel rounding)."""
    return min(math.ceil(top_k * tokens * capacity_factor / num_experts), tokens)


_expert_capacity = ms.constexpr(expert_capacity)  # shapes are static in graph mode: a compile-time int


def capacity_keep_mask(top_experts: Tensor, num_experts: int, capacity: int) -> Tensor:
    """float32 [M, k], 1 where token m's choice j fits within its expert's capacity (MindFormers TopkRouterV2 with
    enable_sdrop False, "kdrop"): every token's first choice is served before any second choice, and within one
    round earlier tokens first; an expert takes its first `capacity` choices in that order, the rest are dropped."""
    tokens, top_k = top_experts.shape
    order = top_experts.T.reshape(-1)  # [k*M], choice-major
    chosen = ops.one_hot(order, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))  # [kM, E]
    position = (ops.cumsum(chosen, axis=0) * chosen).sum(axis=-1)  # 1-based place in its expert's queue
    return (position <= capacity).astype(ms.float32).reshape(top_k, tokens).T


class TeleChat2MoE(nn.Cell):
    """Top-k mixture of experts (39B-A12B: 16 experts, top 4, no shared expert).

    Scores = softmax(router(x)) in float32; each token keeps its top-k experts, their weights renormalised to sum
    to 1 (norm_topk_prob). In training (`set_train(True)`), with capacity_factor > 0, choices over an expert's
    capacity are dropped as MindFormers' TopkRouterV2 does (`capacity_keep_mask`; the kept weights are not
    renormalised, a token that loses every choice passes through the residual only); inference drops nothing.
    Dense dispatch: every expert runs on every token and the combine weights select, so dropping is exact.
    """

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        self.router = TeleChat2Router(config)
        self.ffn = TeleChat2Experts(config)

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, S, H] -> (out [B, S, H], auxiliary load-balancing loss, a float32 scalar)."""
        batch, length, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # [M, H]
        probs = ops.softmax(self.router(tokens), axis=-1)  # [M, E] float32
        top_probs, top_experts = ops.topk(probs, self.top_k)  # [M, k]
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(axis=-1, keepdims=True)
        chosen = ops.one_hot(top_experts, self.num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        weights = top_probs
        if self.training and self.capacity_factor > 0:
            capacity = _expert_capacity(batch * length, self.top_k, self.capacity_factor, self.num_experts)
            weights = top_probs * capacity_keep_mask(top_experts, self.num_experts, capacity)
        combine = (chosen * weights.expand_dims(-1)).sum(axis=1)  # [M, E], zero outside the (kept) top-k
        expert_out = self.ffn(tokens)  # [E, M, H]
        out = (expert_out.astype(ms.float32) * combine.T.expand_dims(-1)).sum(axis=0)  # [M, H]
        aux_loss = load_balancing_loss(probs, chosen.sum(axis=1))
        return out.astype(x.dtype).reshape(batch, length, hidden), aux_loss


class TeleChat2DecoderLayer(nn.Cell):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        self.is_moe = config.is_moe
        self.attention_norm = TeleChat2RMSNorm(config.hidden_size, config)
        self.attention = TeleChat2Attention(config)
        self.ffn_norm = TeleChat2RMSNorm(config.hidden_size, config)
        self.feed_forward = TeleChat2MoE(config) if config.is_moe else TeleChat2MLP(config)

    def construct(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        past_key: Tensor | None = None,
        past_value: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (hidden [B, S, H], key [B, K, T, D], value [B, K, T, D], MoE auxiliary loss (0 when dense))."""
        attn_out, key, value = self.attention(self.attention_norm(x), cos, sin, mask, past_key, past_value)
        x = x + attn_out
        if self.is_moe:
            ffn_out, aux_loss = self.feed_forward(self.ffn_norm(x))
        else:
            ffn_out, aux_loss = self.feed_forward(self.ffn_norm(x)), Tensor(0.0, ms.float32)
        return x + ffn_out, key, value, aux_loss

    def decode_static(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        slot: Tensor,
        hidden_keys: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        write_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`construct` for one token with fixed-size caches -> (hidden [B, 1, H], key_cache, value_cache)."""
        attn_out, key_cache, value_cache = self.attention.decode_static(
            self.attention_norm(x), cos, sin, slot, hidden_keys, key_cache, value_cache, write_index
        )
        x = x + attn_out
        ffn_out = self.feed_forward(self.ffn_norm(x))
        if self.is_moe:
            ffn_out = ffn_out[0]
        return x + ffn_out, key_cache, value_cache


class TeleChat2Model(nn.Cell):
    """Embedding, decoder layers, final norm; rotary from each sequence's current length (official dynamic NTK).

    `rope_cos`/`rope_sin` [seq_length, D] hold the table of every sequence of up to training_seqlen tokens (alpha
    and mscale do not change there); a longer sequence gets its own from `sequence_rotary` (`rotary`).
    """

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        self.tok_embeddings = TeleChat2Embedding(config)
        self.layers = nn.CellList([TeleChat2DecoderLayer(config) for _ in range(config.num_layers)])
        self.norm_out = TeleChat2RMSNorm(config.hidden_size, config)
        self._init_rotary(config)

    def _init_rotary(self, config: TeleChat2Config) -> None:
        """The table shared by every sequence of up to training_seqlen tokens, and what longer ones need."""
        base, mscale = dynamic_ntk_base_and_mscale(0, config)  # any length up to training_seqlen
        cos, sin = rotary_cos_sin(config.seq_length, config.head_dim, base, mscale)
        compute_dtype = _dtype(config.compute_dtype)
        self.rope_cos = Tensor(cos, compute_dtype)  # [seq_length, D], a constant, not a parameter
        self.rope_sin = Tensor(sin, compute_dtype)
        self.training_seqlen = config.training_seqlen
        # what the official rotary depends on, as constants (graph mode)
        theta, base_seqlen = float(config.rope_theta), config.max_position_embedding
        self.rotary_key = (config.head_dim, theta, self.training_seqlen, base_seqlen)

    def rotary(self, start_pos: int, key_len: int) -> tuple[Tensor, Tensor]:
        """cos/sin [key_len - start_pos, D] for the new tokens of a sequence that is now key_len tokens long."""
        if key_len <= self.training_seqlen:
            return self.rope_cos[start_pos:key_len], self.rope_sin[start_pos:key_len]
        table = _rotary_constant(start_pos, key_len, *self.rotary_key).astype(self.rope_cos.dtype)  # [2, S, D]
        return table[0], table[1]

    def construct(
        self,
        input_ids: Tensor,
        past_key_values: tuple[LayerCache, ...] | None = None,
        start_pos: int = 0,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[LayerCache, ...], Tensor]:
        """input_ids [B, S] at positions start_pos.. -> (hidden [B, S, H], new cache per layer, summed aux loss).

        attention_mask [B, T] (1 = real token, 0 = padding) optionally hides padded keys.
        """
        length = input_ids.shape[1]
        key_len = start_pos + length
        x = self.tok_embeddings(input_ids)
        cos, sin = self.rotary(start_pos, key_len)
        mask = None  # one new token sees every cached one: nothing to hide
        if length > 1:
            mask = causal_mask(length, key_len, start_pos).reshape(1, 1, length, key_len)
        if attention_mask is not None:
            mask = ops.zeros((1, 1, length, key_len), ms.bool_) if mask is None else mask
            mask = ops.logical_or(mask, (attention_mask == 0).reshape(-1, 1, 1, key_len))
        aux_loss = Tensor(0.0, ms.float32)
        new_cache = ()
        for index, layer in enumerate(self.layers):
            if past_key_values is None:
                x, key, value, layer_aux = layer(x, cos, sin, mask)
            else:
                past_key, past_value = past_key_values[index]
                x, key, value, layer_aux = layer(x, cos, sin, mask, past_key, past_value)
            new_cache = new_cache + ((key, value),)  # noqa: RUF005 (tuple concatenation compiles in graph mode)
            aux_loss = aux_loss + layer_aux
        return self.norm_out(x), new_cache, aux_loss


class TeleChat2CausalLMLoss(nn.Cell):
    """Mean cross entropy over tokens that are not padding and whose label is not `ignore_token_id`.

    A cell of its own (no parameters) so a pipeline-parallel plan can place it on the last stage with the head.
    """

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        self.pad_token_id = config.pad_token_id
        self.ignore_token_id = config.ignore_token_id

    def construct(self, logits: Tensor, tokens: Tensor, targets: Tensor) -> Tensor:
        """logits [B, S, V] float32 predicting targets [B, S] from tokens [B, S] -> scalar loss."""
        mask = ops.logical_and(tokens != self.pad_token_id, targets != self.ignore_token_id).astype(ms.float32)
        safe_targets = ops.select(targets == self.ignore_token_id, ops.zeros_like(targets), targets)
        log_probs = ops.log_softmax(logits, axis=-1)
        token_loss = -ops.gather_elements(log_probs, -1, safe_targets.astype(ms.int32).expand_dims(-1)).squeeze(-1)
        return (token_loss * mask).sum() / (mask.sum() + 1e-8)


class TeleChat2ForCausalLM(nn.Cell):
    """TeleChat2 with its (untied, bias-free) language-model head.

    - `construct(input_ids)` -> float32 logits [B, S, V].
    - `construct(input_ids, labels)` -> training loss: mean cross entropy of input_ids[:, :-1] predicting
      labels[:, 1:] over tokens that are not padding and not labelled -100, plus aux_loss_factor * MoE aux loss.
    - `forward(input_ids, past_key_values, start_pos)` -> (logits, cache): incremental decoding (PyNative).
    """

    def __init__(self, config: TeleChat2Config) -> None:
        super().__init__()
        self._build(config)

    def _build(self, config: TeleChat2Config) -> None:
        """Create the submodules; separate from __init__ so the MindFormers subclass can reuse it."""
        self.architecture = config
        self.pad_token_id = config.pad_token_id
        self.ignore_token_id = config.ignore_token_id
        self.aux_loss_factor = config.aux_loss_factor if config.is_moe else 0.0
        self.model = TeleChat2Model(config)
        self.lm_head = TeleChat2Linear(config.hidden_size, config.vocab_size, False, config)
        self.loss = TeleChat2CausalLMLoss(config)

    def construct(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            hidden, _, _ = self.model(input_ids)
            return self.lm_head(hidden).astype(ms.float32)
        tokens = input_ids[:, :-1]
        hidden, _, aux_loss = self.model(tokens)
        logits = self.lm_head(hidden).astype(ms.float32)  # [B, S-1, V]
        return self.loss(logits, tokens, labels[:, 1:]) + self.aux_loss_factor * aux_loss

    def forward(
        self,
        input_ids: Tensor,
        past_key_values: tuple[LayerCache, ...] | None = None,
        start_pos: int = 0,
        attention_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, tuple[LayerCache, ...]]:
        """Logits [B, S, V] (float32) for input_ids at positions start_pos.., and the cache extended by them.

        `last_only` computes the head for the last position only ([B, 1, V]), all that decoding needs.
        """
        if start_pos + input_ids.shape[1] > self.architecture.seq_length:
            raise ValueError(
                f"sequence of {start_pos + input_ids.shape[1]} tokens exceeds seq_length "
                f"{self.architecture.seq_length}; load the model with a larger seq_length"
            )
        hidden, cache, _ = self.model(input_ids, past_key_values, start_pos, attention_mask)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden).astype(ms.float32), cache

    def static_decoder(self) -> TeleChat2StaticCacheDecoder:
        """The compiled one-token decoder over this model's weights (built on first use, then reused)."""
        decoder = self.__dict__.get("_static_decoder")
        if decoder is None:
            decoder = TeleChat2StaticCacheDecoder(self)
            object.__setattr__(self, "_static_decoder", decoder)  # a plain reference, not a child cell
        return decoder


class TeleChat2StaticCacheDecoder(nn.Cell):
    """One decoding step compiled once (`mindspore.jit`), with caches of fixed length L = seq_length.

    PyNative runs an operator at a time, and on CPU its per-operator cost dwarfs a small model's arithmetic; a
    compiled step is tens of times faster. Compiling needs fixed shapes, so the caches hold L positions, the new
    token's K and V are blended in at its position and later positions are masked. Same numbers as
    `TeleChat2ForCausalLM.forward` with a growing cache (tested).
    """

    def __init__(self, lm: TeleChat2ForCausalLM) -> None:
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.lm = lm
        self.max_length = lm.architecture.seq_length

    def empty_cache(self, prefill_cache: tuple[LayerCache, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Fixed-size (keys, values) per layer holding a prefill's cache [B, K, T, D] at positions 0..T-1."""
        keys, values = (), ()
        for key, value in prefill_cache:
            batch, kv_heads, length, dim = key.shape
            padding = ops.zeros((batch, kv_heads, self.max_length - length, dim), key.dtype)
            keys += (ops.cat((key, padding), axis=2),)
            values += (ops.cat((value, padding), axis=2),)
        return keys, values

    def step(
        self, token_id: int, position: int, keys: tuple[Tensor, ...], values: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Decode `token_id` at `position` for a batch of one; the caches are marked mutable so the step compiles
        once (a plain tuple of tensors would be a constant, recompiled whenever its values change).

        The token's rotary row comes in as a tensor, computed for the sequence's new length position + 1 (official
        dynamic NTK: alpha and mscale may change from one step to the next), so one compiled step serves every length.
        """
        token = Tensor([[token_id]], ms.int32)
        cos, sin = decode_rotary(np.asarray([position]), self.lm.architecture)
        dtype = self.lm.model.rope_cos.dtype
        rotary = Tensor(cos, dtype), Tensor(sin, dtype)
        return self(token, Tensor(position, ms.int32), *rotary, ms.mutable(keys), ms.mutable(values))

    @ms.jit
    def construct(
        self,
        token: Tensor,
        position: Tensor,
        cos: Tensor,
        sin: Tensor,
        keys: tuple[Tensor, ...],
        values: tuple[Tensor, ...],
    ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """token [B, 1] at `position` (int32 scalar tensor), its rotary cos/sin [1, D] -> (float32 logits [B, 1, V],
        keys, values)."""
        model = self.lm.model
        x = model.tok_embeddings(token)
        key_pos = ops.arange(self.max_length, dtype=ms.int32)
        slot = (key_pos == position).astype(x.dtype).reshape(1, 1, self.max_length, 1)
        hidden_keys = (key_pos > position).reshape(1, 1, 1, self.max_length)
        new_keys, new_values = (), ()
        for index, layer in enumerate(model.layers):
            x, key_cache, value_cache = layer.decode_static(x, cos, sin, slot, hidden_keys, keys[index], values[index])
            new_keys = new_keys + (key_cache,)  # noqa: RUF005 (graph mode)
            new_values = new_values + (value_cache,)  # noqa: RUF005
        return self.lm.lm_head(model.norm_out(x)).astype(ms.float32), new_keys, new_values
