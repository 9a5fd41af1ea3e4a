"""Tensor-parallel TeleChat2 for inference under msrun: each of N ranks holds 1/N of the model (Megatron style).

MindSpore's semi-auto parallel (`telechat2.parallel`) needs graph mode, and generation runs in PyNative mode (a new
shape each step), so inference splits the network by hand, as vLLM-MindSpore and MindFormers' parallel_core do:

| part | split | communication |
|---|---|---|
| attention wq, wk_v (or w_qkv) | column-parallel over heads: rank r holds query heads and KV heads r*N/n.. | none |
| attention wo | row-parallel (its input columns) | AllReduce, then the bias once |
| MLP w1, w3 (or w_gate_hidden) | column-parallel over the FFN width | none |
| MLP w2 | row-parallel | AllReduce, then the bias once |
| MoE experts | each expert's FFN split like the MLP; router replicated | AllReduce of the combined output, + biases |
| embedding | vocabulary-parallel (rows); replicated if the vocabulary does not divide | AllReduce |
| lm_head | column-parallel over the vocabulary (replicated if it does not divide) | AllGather of the logits |
| norms, rotary tables | replicated | none |

So attention runs on the rank's own heads (the KV cache holds local heads only) and every rank ends each step
with the same full logits. Parameter names equal the single-device model's, and
`telechat2.loading.load_sharded_checkpoint` cuts a rank's slices out of the full (merged) checkpoint one tensor at a
time, so a merged finetune checkpoint serves as is.

`wk_v` interleaves K and V per KV head ([K_h0, V_h0, K_h1, V_h1, ...] rows), so a rank's KV heads are one
contiguous block of rows; `w_qkv` = [Q; K_all; V_all] and `w_gate_hidden` = [w1; w3] are split segment by segment.

The slicing rules (`shard_of`, `take_shard`, `read_shard`) are pure numpy; running the network needs an initialised
communication group (`initialize()`, possible under msrun). The collectives are the `ops.AllReduce` / `ops.AllGather`
primitives: they run in PyNative mode and inside the compiled static-cache decode step on CPU (MindSpore's MCCL,
tested with real msrun processes) and map to HCCL on Ascend (not run here); `mindspore.communication.comm_func`
has no CPU kernels.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from telechat2.checkpoint_io import CkptReader
from telechat2.configuration import TeleChat2Config
from telechat2.modeling import (
    TeleChat2Attention,
    TeleChat2CausalLMLoss,
    TeleChat2DecoderLayer,
    TeleChat2Embedding,
    TeleChat2Experts,
    TeleChat2ForCausalLM,
    TeleChat2Linear,
    TeleChat2MLP,
    TeleChat2Model,
    TeleChat2MoE,
    TeleChat2RMSNorm,
    TeleChat2Router,
    _dtype,
    load_balancing_loss,
)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside 0..{self.size - 1}")


def initialize() -> TensorParallel:
    """Join msrun's communication group (blocks until every rank has joined) and return this rank's place."""
    from mindspore.communication import get_group_size, get_rank, init

    init()
    return TensorParallel(rank=get_rank(), size=get_group_size())


def shared_seed() -> int:
    """A random seed drawn by rank 0 and given to every rank (sampling must pick the same tokens on all ranks).

    Sent as float32 (the only AllReduce type on CPU besides float16), so it stays below 2**24 to be exact.
    """
    from mindspore.communication import get_rank

    drawn = int(np.random.default_rng().integers(1, 2**24)) if get_rank() == 0 else 0
    return int(ops.AllReduce()(Tensor(np.asarray([drawn], np.float32))).asnumpy()[0])


# ---------------------------------------------------------------------------------------------------------------
# Which tensor is split how: numpy only (no device, no communication)
# ---------------------------------------------------------------------------------------------------------------


def check_divisible(config: TeleChat2Config, size: int) -> None:
    """Refuse a model that cannot be split over `size` ranks, naming the fields."""
    problems = []
    if config.n_kv_heads % size:
        problems.append(f"n_kv_heads {config.n_kv_heads} is not divisible by model_parallel {size}")
    if config.num_heads % size:
        problems.append(f"num_heads {config.num_heads} is not divisible by model_parallel {size}")
    if config.intermediate_size % size:
        problems.append(f"intermediate_size {config.intermediate_size} is not divisible by model_parallel {size}")
    if problems:
        raise ValueError("cannot split the model over model_parallel ranks: " + "; ".join(problems))


def vocab_parallel(config: TeleChat2Config, size: int) -> bool:
    """Embedding and lm_head are split over the vocabulary when it divides evenly, else replicated."""
    return config.vocab_size % size == 0


@dataclass(frozen=True)
class Shard:
    """How one parameter is split: along `axis` (None = replicated), each of `segments` (lengths along that axis,
    concatenated in the full tensor) cut into `size` equal parts and rank r's parts concatenated again."""

    axis: int | None
    segments: tuple[int, ...] = ()


REPLICATED = Shard(None)

# Parameter-name suffix -> (axis, segment kind). Matched on the name after `model.layers.N.`.
_LAYER_RULES: dict[str, tuple[int | None, str]] = {
    "attention_norm.weight": (None, ""),
    "ffn_norm.weight": (None, ""),
    "attention.wq.weight": (0, ""),
    "attention.wk_v.weight": (0, ""),  # per-KV-head interleaved: a rank's heads are contiguous rows
    "attention.w_qkv.weight": (0, "qkv"),
    "attention.wo.weight": (1, ""),
    "attention.wo.bias": (None, ""),
    "feed_forward.w1.weight": (0, ""),
    "feed_forward.w3.weight": (0, ""),
    "feed_forward.w_gate_hidden.weight": (0, "gate_up"),
    "feed_forward.w2.weight": (1, ""),
    "feed_forward.w2.bias": (None, ""),
    "feed_forward.router.dense.weight": (None, ""),
    "feed_forward.ffn.w1.weight": (1, ""),  # [E, F, H]: each expert's FFN rows
    "feed_forward.ffn.w3.weight": (1, ""),
    "feed_forward.ffn.w2.weight": (2, ""),  # [E, H, F]
    "feed_forward.ffn.w2.bias": (None, ""),
}
_LAYER_NAME = re.compile(r"^model\.layers\.\d+\.(.+)$")


def shard_of(name: str, full_shape: tuple[int, ...], config: TeleChat2Config, size: int) -> Shard:
    """The split of parameter `name` (full shape `full_shape`) over `size` ranks."""
    if name in ("model.tok_embeddings.embedding_weight", "lm_head.weight"):
        return Shard(0, (full_shape[0],)) if vocab_parallel(config, size) else REPLICATED
    if name == "model.norm_out.weight":
        return REPLICATED
    match = _LAYER_NAME.match(name)
    rule = _LAYER_RULES.get(match.group(1)) if match else None
    if rule is None:
        raise ValueError(f"no tensor-parallel rule for parameter {name}")
    axis, kind = rule
    if axis is None:
        return REPLICATED
    if kind == "qkv":
        kv_width = config.n_kv_heads * config.head_dim
        return Shard(0, (config.num_heads * config.head_dim, kv_width, kv_width))
    if kind == "gate_up":
        return Shard(0, (config.intermediate_size, config.intermediate_size))
    return Shard(axis, (full_shape[axis],))


def local_shape(full_shape: tuple[int, ...], shard: Shard, size: int) -> tuple[int, ...]:
    if shard.axis is None:
        return tuple(full_shape)
    shape = list(full_shape)
    shape[shard.axis] //= size
    return tuple(shape)


def _ranges(shard: Shard, rank: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) along the shard axis of each piece rank `rank` keeps, in order."""
    ranges, offset = [], 0
    for length in shard.segments:
        if length % size:
            raise ValueError(f"a segment of {length} rows does not split over {size} ranks")
        part = length // size
        ranges.append((offset + rank * part, offset + (rank + 1) * part))
        offset += length
    return ranges


def take_shard(full: np.ndarray, shard: Shard, rank: int, size: int) -> np.ndarray:
    """Rank `rank`'s slice of the full tensor `full` (a copy when split, the array itself when replicated)."""
    if shard.axis is None:
        return full
    index = [slice(None)] * full.ndim
    pieces = []
    for start, stop in _ranges(shard, rank, size):
        index[shard.axis] = slice(start, stop)
        pieces.append(full[tuple(index)])
    return np.ascontiguousarray(np.concatenate(pieces, axis=shard.axis))


def read_shard(reader: CkptReader, name: str, shard: Shard, rank: int, size: int) -> np.ndarray:
    """Rank `rank`'s slice of tensor `name` read from a .ckpt, without holding more than one full tensor.

    Row splits (axis 0) read only the rank's rows; splits along a later axis of a stacked tensor ([E, ...]) read
    one sub-tensor at a time; a 2-D column split reads the tensor whole, then slices it.
    """
    entry = reader.entries[name]
    shape = entry.shape
    if shard.axis is None:
        return reader.read(name)
    if shard.axis == 0:
        row = math.prod(shape[1:])
        pieces = [
            reader.read_flat(name, start * row, (stop - start) * row) for start, stop in _ranges(shard, rank, size)
        ]
        return np.concatenate(pieces).reshape(local_shape(shape, shard, size))
    if len(shape) >= 3:
        inner, block = Shard(shard.axis - 1, (shape[shard.axis],)), math.prod(shape[1:])
        parts = [
            take_shard(reader.read_flat(name, i * block, block).reshape(shape[1:]), inner, rank, size)
            for i in range(shape[0])
        ]
        return np.stack(parts)
    return take_shard(reader.read(name), shard, rank, size)


def parameter_bytes(model: Any) -> int:
    """Bytes of the parameters `model` holds (this rank's share under tensor parallelism)."""
    return sum(math.prod(p.shape) * p.data.itemsize for p in model.get_parameters())


# ---------------------------------------------------------------------------------------------------------------
# The network: subclasses of `telechat2.modeling` layers holding one rank's slices
# ---------------------------------------------------------------------------------------------------------------


class RowParallelLinear(TeleChat2Linear):
    """y = AllReduce(x_r W_r^T) + b: W's input columns split; the bias added once, after the sum."""

    def __init__(self, local_in: int, out_features: int, has_bias: bool, config: TeleChat2Config) -> None:
        super().__init__(local_in, out_features, has_bias, config)
        self.all_reduce = ops.AllReduce()

    def construct(self, x: Tensor) -> Tensor:
        leading = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).astype(self.compute_dtype)
        y = self.all_reduce(self.matmul(x, self.weight.astype(self.compute_dtype)))  # [M, out]
        if self.has_bias:
            y = self.bias_add(y, self.bias.astype(self.compute_dtype))
        return y.reshape(leading + (self.out_features,))  # noqa: RUF005 (graph mode)


class VocabParallelLMHead(TeleChat2Linear):
    """Logits for this rank's vocabulary rows, gathered from every rank into the full [..., V]."""

    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        super().__init__(config.hidden_size, config.vocab_size // tp.size, False, config)
        self.size = tp.size
        self.vocab_size = config.vocab_size
        self.all_gather = ops.AllGather()  # concatenates along axis 0

    def construct(self, x: Tensor) -> Tensor:
        leading = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).astype(self.compute_dtype)
        y = self.matmul(x, self.weight.astype(self.compute_dtype))  # [M, V/n]
        gathered = self.all_gather(y)  # [n * M, V/n], rank-major
        rows = y.shape[0]
        y = gathered.reshape(self.size, rows, self.out_features).transpose(1, 0, 2).reshape(rows, self.vocab_size)
        return y.reshape(leading + (self.vocab_size,))  # noqa: RUF005 (graph mode)


class VocabParallelEmbedding(TeleChat2Embedding):
    """This rank's vocabulary rows; ids outside them contribute zeros, and the AllReduce fills every row."""

    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        nn.Cell.__init__(self)
        self.compute_dtype = _dtype(config.compute_dtype)
        self.local_vocab = config.vocab_size // tp.size
        self.vocab_start = tp.rank * self.local_vocab
        self.embedding_weight = Parameter(
            initializer(
                Normal(sigma=config.initializer_range),
                (self.local_vocab, config.hidden_size),
                _dtype(config.param_init_type),
            ),
            name="embedding_weight",
        )
        self.gather = ops.Gather()
        self.all_reduce = ops.AllReduce()

    def construct(self, input_ids: Tensor) -> Tensor:
        local_ids = input_ids - self.vocab_start
        inside = ops.logical_and(local_ids >= 0, local_ids < self.local_vocab)
        local_ids = ops.select(inside, local_ids, ops.zeros_like(local_ids))
        rows = self.gather(self.embedding_weight, local_ids, 0).astype(self.compute_dtype)  # [B, S, H]
        return self.all_reduce(rows * inside.expand_dims(-1).astype(self.compute_dtype))


class TensorParallelAttention(TeleChat2Attention):
    """This rank's query and KV heads; `wo` row-parallel. The parent's math runs on the local head counts."""

    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        nn.Cell.__init__(self)
        self.num_heads = config.num_heads // tp.size
        self.n_kv_heads = config.n_kv_heads // tp.size
        self.head_dim = config.head_dim
        self.n_rep = self.num_heads // self.n_kv_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv_concat = config.qkv_concat
        self.use_flash_attention = config.use_flash_attention
        hidden = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.qkv_concat:
            self.w_qkv = TeleChat2Linear(hidden, q_width + 2 * kv_width, False, config)
        else:
            self.wq = TeleChat2Linear(hidden, q_width, False, config)
            self.wk_v = TeleChat2Linear(hidden, 2 * kv_width, False, config)
        self.wo = RowParallelLinear(q_width, hidden, True, config)


class TensorParallelMLP(TeleChat2MLP):
    """SwiGLU on this rank's share of the FFN width; w2 row-parallel."""

    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        super().__init__(dataclasses.replace(config, intermediate_size=config.intermediate_size // tp.size))
        self.w2 = RowParallelLinear(self.ffn, config.hidden_size, True, config)


class TensorParallelExperts(TeleChat2Experts):
    """Every expert on this rank's share of its FFN width; outputs are partial sums, without the bias."""

    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        super().__init__(dataclasses.replace(config, intermediate_size=config.intermediate_size // tp.size))

    def construct(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype
        tokens, hidden = x.shape
        x = ops.broadcast_to(x.astype(dtype).expand_dims(0), (self.num_experts, tokens, hidden))  # [E, M, H]
        gate = self.gate_matmul(x, self.w1.weight.astype(dtype))  # [E, M, F/n]
        up = self.up_matmul(x, self.w3.weight.astype(dtype))
        return self.down_matmul(ops.silu(gate) * up, self.w2.weight.astype(dtype))  # [E, M, H] partial


class TensorParallelMoE(TeleChat2MoE):
    """Router replicated (every rank picks the same experts); expert outputs combined, summed over ranks,
    then each token's routed biases added once."""

    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        nn.Cell.__init__(self)
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router = TeleChat2Router(config)
        self.ffn = TensorParallelExperts(config, tp)
        self.all_reduce = ops.AllReduce()

    def construct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, length, hidden = x.shape
        tokens = x.reshape(-1, hidden)  # [M, H]
        probs = ops.softmax(self.router(tokens), axis=-1)  # [M, E] float32
        top_probs, top_experts = ops.topk(probs, self.top_k)
        if self.norm_topk_prob:
            top_probs = top_probs / top_probs.sum(axis=-1, keepdims=True)
        chosen = ops.one_hot(top_experts, self.num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        combine = (chosen * top_probs.expand_dims(-1)).sum(axis=1)  # [M, E]
        partial = (self.ffn(tokens).astype(ms.float32) * combine.T.expand_dims(-1)).sum(axis=0)  # [M, H]
        bias = self.ffn.w2.bias.astype(ms.float32).reshape(self.num_experts, hidden)  # [E, H]
        out = self.all_reduce(partial) + ops.matmul(combine, bias)
        aux_loss = load_balancing_loss(probs, chosen.sum(axis=1))
        return out.astype(x.dtype).reshape(batch, length, hidden), aux_loss


class TensorParallelDecoderLayer(TeleChat2DecoderLayer):
    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        nn.Cell.__init__(self)
        self.is_moe = config.is_moe
        self.attention_norm = TeleChat2RMSNorm(config.hidden_size, config)
        self.attention = TensorParallelAttention(config, tp)
        self.ffn_norm = TeleChat2RMSNorm(config.hidden_size, config)
        self.feed_forward = TensorParallelMoE(config, tp) if config.is_moe else TensorParallelMLP(config, tp)


class TensorParallelModel(TeleChat2Model):
    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        nn.Cell.__init__(self)
        split_vocab = vocab_parallel(config, tp.size)
        self.tok_embeddings = VocabParallelEmbedding(config, tp) if split_vocab else TeleChat2Embedding(config)
        self.layers = nn.CellList([TensorParallelDecoderLayer(config, tp) for _ in range(config.num_layers)])
        self.norm_out = TeleChat2RMSNorm(config.hidden_size, config)
        self._init_rotary(config)  # per-length dynamic NTK, as the single-device model


class TensorParallelForCausalLM(TeleChat2ForCausalLM):
    """`TeleChat2ForCausalLM` whose layers hold this rank's slices; `forward` and `static_decoder` are the
    parent's and return the full logits on every rank. Inference only (no training loss across ranks)."""

    def __init__(self, config: TeleChat2Config, tp: TensorParallel) -> None:
        nn.Cell.__init__(self)
        self.tensor_parallel = tp
        self._build(config)

    def _build(self, config: TeleChat2Config) -> None:
        tp = self.tensor_parallel
        self.architecture = config
        self.pad_token_id = config.pad_token_id
        self.ignore_token_id = config.ignore_token_id
        self.aux_loss_factor = config.aux_loss_factor if config.is_moe else 0.0
        self.model = TensorParallelModel(config, tp)
        if vocab_parallel(config, tp.size):
            self.lm_head = VocabParallelLMHead(config, tp)
        else:
            self.lm_head = TeleChat2Linear(config.hidden_size, config.vocab_size, False, config)
        self.loss = TeleChat2CausalLMLoss(config)


def build_model(config: TeleChat2Config, tp: TensorParallel) -> TensorParallelForCausalLM:
    """TeleChat2ForCausalLM split over `tp.size` ranks (this rank's slices, random until a checkpoint is loaded)."""
    check_divisible(config, tp.size)
    return TensorParallelForCausalLM(config, tp)
