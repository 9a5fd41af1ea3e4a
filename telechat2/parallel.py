"""TeleChat2's tensor, expert and pipeline parallel plan for MindSpore semi-auto parallel, kept apart from the math.

Like Hugging Face's `base_model_tp_plan`, `TP_PLAN` maps module paths (names from `cells_and_names()`, `*` standing
for a layer number) to a style, and `style_strategies` turns a style into shard strategies, as functions of
(dp, mp, ep), for the primitives that module holds (`matmul`, `bias_add`, `gather`, `gate_matmul`, ...; see
`telechat2.modeling`). Strategy shapes follow MindFormers' LLaMA on MindSpore 2.7 (`llama_transformer.py`,
`llama_layer.py`):

| style | primitive: in_strategy |
|---|---|
| colwise (wq, wk_v, w_qkv, w1, w3, w_gate_hidden) | MatMul(transpose_b) ((dp, 1), (mp, 1)): W's rows (outputs) split |
| rowwise (wo, w2) | MatMul ((dp, mp), (1, mp)): W's columns split, then AllReduce; bias Add ((dp, 1), (1,)) |
| vocab_embedding | Gather ((mp, 1), (dp, 1)), or ((1, 1), (dp, 1)) with vocab_emb_dp |
| lm_head | MatMul ((dp, 1), (mp, 1)), or ((dp, 1), (1, 1)) with vocab_emb_dp |
| replicated (MoE router) | MatMul ((dp, 1), (1, 1)) |
| experts | BatchMatMul gate/up ((ep, dp/ep, 1), (ep, mp, 1)), down ((ep, dp/ep, mp), (ep, 1, mp)) |

Ops given no strategy (attention scores, norms, rotary, slicing) get MindSpore's default data-parallel strategy and
the redistribution it implies. The fused `w_qkv` / `w_gate_hidden` outputs are sliced after a column split, which
MindSpore redistributes correctly but at the cost of a gather; kv_concat is the better training layout with mp > 1.

Pipeline: decoder layers are spread over stages in order (`layer_stages`), the embedding on stage 0, the final norm,
the head and the loss on the last stage; `recompute_layers` says which layers recompute activations. Everything
here is pure Python except `apply_parallel_plan`, which sets the plan on a built model's cells and primitives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from telechat2.configuration import TeleChat2Config

Strategy = tuple[tuple[int, ...], ...]

# Module path pattern -> style. `*` matches a layer number. Modules absent from a layout (wq under qkv_concat,
# w1 in a mixture of experts, ...) simply match nothing.
TP_PLAN: dict[str, str] = {
    "model.tok_embeddings": "vocab_embedding",
    "model.layers.*.attention.wq": "colwise",
    "model.layers.*.attention.wk_v": "colwise",
    "model.layers.*.attention.w_qkv": "colwise",
    "model.layers.*.attention.wo": "rowwise",
    "model.layers.*.feed_forward.w1": "colwise",
    "model.layers.*.feed_forward.w3": "colwise",
    "model.layers.*.feed_forward.w_gate_hidden": "colwise",
    "model.layers.*.feed_forward.w2": "rowwise",
    "model.layers.*.feed_forward.router.dense": "replicated",
    "model.layers.*.feed_forward.ffn": "experts",
    "lm_head": "lm_head",
}

_OPTIONAL_PRIMITIVES = frozenset({"bias_add"})  # only layers with a bias have one


class ParallelPlanError(ValueError):
    """A layout the model cannot be split by; the message names the fields."""


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel degrees the plan depends on (MindFormers `parallel_config` names)."""

    data_parallel: int = 1
    model_parallel: int = 1
    expert_parallel: int = 1
    pipeline_stage: int = 1
    context_parallel: int = 1
    vocab_emb_dp: bool = True
    # True/False for every layer, or per stage the number of its first layers that recompute (MindFormers' list).
    recompute: bool | tuple[int, ...] = False
    # Per-stage change to the even share of layers (MindFormers `model_config.offset`); 0 = even split.
    offset: int | tuple[int, ...] = field(default=0)

    @property
    def splits_tensors(self) -> bool:
        """Whether any weight is split across ranks or stages (dp-only layouts need no strategies)."""
        return self.model_parallel > 1 or self.expert_parallel > 1 or self.pipeline_stage > 1

    @classmethod
    def from_config(cls, parallel_config: Any, recompute: Any = None, offset: Any = 0) -> ParallelLayout:
        """From a YAML `parallel_config` mapping or MindFormers' `TransformerOpParallelConfig`.

        `recompute` (a YAML `recompute_config` mapping, a bool or a per-stage list) overrides what parallel_config
        carries; MindFormers' config holds it as `parallel_config.recompute.recompute`.
        """

        def read(name: str, default: Any) -> Any:
            if isinstance(parallel_config, Mapping):
                return parallel_config.get(name, default)
            return getattr(parallel_config, name, default)

        if recompute is None:
            recompute = read("recompute", False)
        return cls(
            data_parallel=int(read("data_parallel", 1)),
            model_parallel=int(read("model_parallel", 1)),
            expert_parallel=int(read("expert_parallel", 1)),
            pipeline_stage=int(read("pipeline_stage", 1)),
            context_parallel=int(read("context_parallel", 1)),
            vocab_emb_dp=bool(read("vocab_emb_dp", True)),
            recompute=_recompute_setting(recompute),
            offset=tuple(int(v) for v in offset) if isinstance(offset, Sequence) else int(offset or 0),
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ParallelLayout:
        """From a whole MindFormers run config: parallel_config, recompute_config and model_config.offset."""
        model_config = (run_config.get("model") or {}).get("model_config") or {}
        return cls.from_config(
            run_config.get("parallel_config") or {},
            recompute=run_config.get("recompute_config") or False,
            offset=model_config.get("offset", 0),
        )


def _recompute_setting(value: Any) -> bool | tuple[int, ...]:
    """bool or per-stage tuple from a bool, a list, a mapping with `recompute` or MindFormers' recompute config."""
    if isinstance(value, Mapping):
        value = value.get("recompute", False)
    elif not isinstance(value, bool | int | Sequence) and hasattr(value, "recompute"):
        value = value.recompute
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(int(v) for v in value)
    return bool(value)


# -- validation ---------------------------------------------------------------------------------------------------


def validate_layout(config: TeleChat2Config, layout: ParallelLayout) -> None:
    """Raise ParallelPlanError naming every architecture field the layout does not divide."""
    problems = []
    for name in ("data_parallel", "model_parallel", "expert_parallel", "pipeline_stage", "context_parallel"):
        value = getattr(layout, name)
        if isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if problems:
        raise ParallelPlanError("invalid parallel layout: " + "; ".join(problems))
    dp, mp, ep = layout.data_parallel, layout.model_parallel, layout.expert_parallel
    if layout.context_parallel != 1:
        problems.append(f"context_parallel {layout.context_parallel} is not supported (use 1)")
    divisible_by_mp = {
        "num_heads": config.num_heads,
        "n_kv_heads": config.n_kv_heads,
        "intermediate_size": config.intermediate_size,
    }
    if not layout.vocab_emb_dp:
        divisible_by_mp["vocab_size"] = config.vocab_size
    for name, value in divisible_by_mp.items():
        if value % mp:
            problems.append(f"{name} {value} is not divisible by model_parallel {mp}")
    if config.is_moe:
        if config.num_experts % ep:
            problems.append(f"num_experts {config.num_experts} is not divisible by expert_parallel {ep}")
        if dp % ep:
            problems.append(f"data_parallel {dp} is not divisible by expert_parallel {ep}")
    elif ep != 1:
        problems.append(f"expert_parallel {ep} needs a mixture-of-experts model (num_experts is 0)")
    try:
        counts = stage_layer_counts(config.num_layers, layout.pipeline_stage, layout.offset)
    except ParallelPlanError as err:
        problems.append(str(err))
    else:
        if isinstance(layout.recompute, tuple):
            problems.extend(_recompute_problems(layout.recompute, counts))
    if problems:
        raise ParallelPlanError("the parallel layout does not fit the model: " + "; ".join(problems))


def _recompute_problems(per_stage: tuple[int, ...], counts: list[int]) -> list[str]:
    if len(per_stage) != len(counts):
        return [f"recompute lists {len(per_stage)} stages, pipeline_stage is {len(counts)}"]
    return [
        f"recompute asks for {wanted} layers on stage {stage}, which holds {held}"
        for stage, (wanted, held) in enumerate(zip(per_stage, counts, strict=True))
        if not 0 <= wanted <= held
    ]


# -- pipeline stages and recompute --------------------------------------------------------------------------------


def stage_layer_counts(num_layers: int, pipeline_stage: int, offset: int | Sequence[int] = 0) -> list[int]:
    """How many decoder layers each pipeline stage holds.

    Even share `num_layers // pipeline_stage` plus the per-stage `offset` when one is given (it must then account for
    every layer). Without an offset the remainder goes one layer each to the middle stages first, then to stage 0,
    then to the last stage: the first and last stages also carry the embedding and the head with the loss.
    """
    if pipeline_stage < 1:
        raise ParallelPlanError(f"pipeline_stage must be a positive integer, got {pipeline_stage}")
    if num_layers < pipeline_stage:
        raise ParallelPlanError(f"num_layers {num_layers} cannot fill pipeline_stage {pipeline_stage} stages")
    base, remainder = divmod(num_layers, pipeline_stage)
    counts = [base] * pipeline_stage
    offsets = [offset] * pipeline_stage if isinstance(offset, int) else list(offset)
    if len(offsets) != pipeline_stage:
        raise ParallelPlanError(f"offset lists {len(offsets)} stages, pipeline_stage is {pipeline_stage}")
    if any(offsets):
        counts = [base + delta for base, delta in zip(counts, offsets, strict=True)]
        if sum(counts) != num_layers or min(counts) < 1:
            raise ParallelPlanError(
                f"offset {list(offsets)} gives stages {counts} layers; they must be >= 1 and sum to num_layers "
                f"{num_layers}"
            )
        return counts
    preference = [*range(1, pipeline_stage - 1), 0, pipeline_stage - 1][:pipeline_stage]
    for stage in preference[:remainder]:
        counts[stage] += 1
    return counts


def layer_stages(num_layers: int, pipeline_stage: int, offset: int | Sequence[int] = 0) -> list[int]:
    """The pipeline stage of each decoder layer, in layer order (stages hold consecutive layers)."""
    counts = stage_layer_counts(num_layers, pipeline_stage, offset)
    return [stage for stage, count in enumerate(counts) for _ in range(count)]


def stage_plan(config: TeleChat2Config, layout: ParallelLayout) -> dict[str, int]:
    """Cell path -> pipeline stage: embedding on 0, layers in order, final norm, head and loss on the last."""
    last = layout.pipeline_stage - 1
    plan = {"model.tok_embeddings": 0}
    stages = layer_stages(config.num_layers, layout.pipeline_stage, layout.offset)
    plan |= {f"model.layers.{layer}": stage for layer, stage in enumerate(stages)}
    return plan | {"model.norm_out": last, "lm_head": last, "loss": last}


def recompute_layers(config: TeleChat2Config, layout: ParallelLayout) -> list[bool]:
    """Whether each decoder layer recomputes its activations in the backward pass."""
    if not isinstance(layout.recompute, tuple):
        return [layout.recompute] * config.num_layers
    counts = stage_layer_counts(config.num_layers, layout.pipeline_stage, layout.offset)
    problems = _recompute_problems(layout.recompute, counts)
    if problems:
        raise ParallelPlanError("; ".join(problems))
    return [index < wanted for wanted, held in zip(layout.recompute, counts, strict=True) for index in range(held)]


# -- shard strategies ---------------------------------------------------------------------------------------------


def style_strategies(style: str, layout: ParallelLayout) -> dict[str, Strategy]:
    """Primitive attribute name -> in_strategy for a module of `style` under `layout`."""
    dp, mp, ep = layout.data_parallel, layout.model_parallel, layout.expert_parallel
    if style == "colwise":
        return {"matmul": ((dp, 1), (mp, 1))}
    if style == "rowwise":
        return {"matmul": ((dp, mp), (1, mp)), "bias_add": ((dp, 1), (1,))}
    if style == "replicated":
        return {"matmul": ((dp, 1), (1, 1))}
    if style == "vocab_embedding":
        return {"gather": ((1, 1), (dp, 1)) if layout.vocab_emb_dp else ((mp, 1), (dp, 1))}
    if style == "lm_head":
        return {"matmul": ((dp, 1), (1, 1)) if layout.vocab_emb_dp else ((dp, 1), (mp, 1))}
    if style == "experts":
        tokens = dp // ep  # the data-parallel ranks that share one expert group
        gate_up = ((ep, tokens, 1), (ep, mp, 1))  # x [E, M, H], W [E, F, H]
        return {
            "gate_matmul": gate_up,
            "up_matmul": gate_up,
            "down_matmul": ((ep, tokens, mp), (ep, 1, mp)),  # h [E, M, F], W [E, H, F]
            "bias_add": ((ep, tokens, 1), (ep, 1, 1)),  # out [E, M, H], bias [E, 1, H]
        }
    raise ParallelPlanError(f"unknown parallel style {style!r}")


def _pattern(path_pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(path_pattern).replace(r"\*", r"\d+") + "$")


_TP_PATTERNS = [(_pattern(path), style) for path, style in TP_PLAN.items()]


def module_style(path: str) -> str | None:
    """The TP_PLAN style of a cell path, or None when the plan does not name it."""
    for pattern, style in _TP_PATTERNS:
        if pattern.match(path):
            return style
    return None


def shard_plan(cell_paths: Sequence[str], layout: ParallelLayout) -> dict[str, dict[str, Strategy]]:
    """Cell path -> {primitive attribute: in_strategy} for the given cells (those the plan names)."""
    plan = {}
    for path in cell_paths:
        style = module_style(path)
        if style is not None:
            plan[path] = style_strategies(style, layout)
    return plan


# -- applying the plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppliedPlan:
    """What `apply_parallel_plan` set, for logs and tests."""

    layout: ParallelLayout
    strategies: dict[str, dict[str, Strategy]]
    stages: dict[str, int]
    recomputed_layers: list[int]


def semi_auto_parallel_active() -> bool:
    """Whether MindSpore's parallel context shards operators (semi-auto or auto parallel: Ascend/GPU only)."""
    import mindspore as ms

    return ms.get_auto_parallel_context("parallel_mode") in ("semi_auto_parallel", "auto_parallel")


def apply_parallel_plan(model, parallel_config: Any, offset: Any = 0) -> AppliedPlan | None:
    """Set shard strategies, pipeline stages and recompute on a built TeleChat2ForCausalLM.

    `parallel_config` is a ParallelLayout, a YAML `parallel_config` mapping or MindFormers'
    TransformerOpParallelConfig. Returns None, changing nothing, when the layout neither splits a tensor nor asks for
    recompute (data parallel only). Strategies only take effect in semi-auto/auto parallel mode, where MindSpore
    reads them at compile time; setting them does not compile anything.
    """
    if isinstance(parallel_config, ParallelLayout):
        layout = parallel_config
    else:
        layout = ParallelLayout.from_config(parallel_config, offset=offset)
    config: TeleChat2Config = model.architecture
    validate_layout(config, layout)
    recompute = recompute_layers(config, layout)
    if not layout.splits_tensors and not any(recompute):
        return None
    cells = dict(model.cells_and_names())
    strategies: dict[str, dict[str, Strategy]] = {}
    stages: dict[str, int] = {}
    if layout.splits_tensors:
        strategies = shard_plan(list(cells), layout)
        for path, primitives in strategies.items():
            for attribute, strategy in primitives.items():
                primitive = getattr(cells[path], attribute, None)
                if primitive is None:
                    if attribute in _OPTIONAL_PRIMITIVES:
                        continue
                    raise ParallelPlanError(f"{path} has no primitive {attribute!r} for its parallel plan")
                primitive.shard(strategy)
    if layout.pipeline_stage > 1:
        stages = stage_plan(config, layout)
        for path, stage in stages.items():
            cells[path].pipeline_stage = stage
    recomputed = [layer for layer, flag in enumerate(recompute) if flag]
    for layer in recomputed:
        cells[f"model.layers.{layer}"].recompute()
    return AppliedPlan(layout, strategies, stages, recomputed)
