"""The parallel plan: layer -> stage tables, strategy tuples, validation, and the plan set on a real tiny model.

Semi-auto parallel compiles only on Ascend/GPU, so the plan is checked as data and as the attributes MindSpore 2.7
stores on primitives (`Primitive.shard` -> `attrs["in_strategy"]`) and cells (`pipeline_stage`), without compiling.
"""

from __future__ import annotations

import pytest
from tiny_model import tiny_config

from telechat2 import configs
from telechat2.parallel import (
    ParallelLayout,
    ParallelPlanError,
    apply_parallel_plan,
    layer_stages,
    module_style,
    recompute_layers,
    stage_layer_counts,
    stage_plan,
    style_strategies,
    validate_layout,
)

# -- pipeline stages ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "stages", "offset", "expected_counts"),
    [
        (96, 8, 0, [12] * 8),  # 115B finetune: even
        (64, 4, 0, [16] * 4),  # 35B finetune
        (30, 2, 0, [15, 15]),  # 39B-A12B finetune
        (10, 4, 0, [2, 3, 3, 2]),  # uneven: middle stages take the extra layers
        (7, 2, 0, [4, 3]),  # no middle stage: stage 0 before the last (which holds the head and loss)
        (11, 4, 0, [3, 3, 3, 2]),  # remainder 3: both middle stages, then stage 0
        (9, 3, [1, 0, -1], [4, 3, 2]),  # explicit MindFormers offset
        (5, 1, 0, [5]),
    ],
)
def test_stage_layer_counts(num_layers, stages, offset, expected_counts):
    assert stage_layer_counts(num_layers, stages, offset) == expected_counts


def test_layer_stages_are_consecutive_and_cover_every_layer():
    assert layer_stages(10, 4) == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert layer_stages(96, 8)[11:13] == [0, 1]
    assert layer_stages(96, 8)[-1] == 7


def test_stage_plan_puts_embedding_first_and_head_and_loss_last():
    plan = stage_plan(tiny_config(num_layers=5), ParallelLayout(pipeline_stage=3))
    assert plan == {
        "model.tok_embeddings": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,  # 5 = 1 + 1 + 1, remainder 2: the middle stage, then stage 0
        "model.layers.2": 1,
        "model.layers.3": 1,
        "model.layers.4": 2,
        "model.norm_out": 2,
        "lm_head": 2,
        "loss": 2,
    }


@pytest.mark.parametrize(
    ("num_layers", "stages", "offset", "message"),
    [
        (2, 4, 0, "num_layers 2 cannot fill pipeline_stage 4"),
        (8, 2, [1, 0], r"offset \[1, 0\] gives stages \[5, 4\] layers; .* sum to num_layers 8"),
        (8, 2, [0, 0, 0], "offset lists 3 stages, pipeline_stage is 2"),
        (4, 2, [-2, 2], r"must be >= 1"),
    ],
)
def test_bad_stage_splits_name_the_field(num_layers, stages, offset, message):
    with pytest.raises(ParallelPlanError, match=message):
        stage_layer_counts(num_layers, stages, offset)


def test_recompute_is_all_layers_or_the_first_n_of_each_stage():
    config = tiny_config(num_layers=6)
    assert recompute_layers(config, ParallelLayout(recompute=True)) == [True] * 6
    assert recompute_layers(config, ParallelLayout()) == [False] * 6
    per_stage = ParallelLayout(pipeline_stage=2, recompute=(2, 1))
    assert recompute_layers(config, per_stage) == [True, True, False, True, False, False]
    with pytest.raises(ParallelPlanError, match="recompute asks for 4 layers on stage 1, which holds 3"):
        recompute_layers(config, ParallelLayout(pipeline_stage=2, recompute=(0, 4)))


# -- strategies ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dp", "mp"), [(1, 8), (2, 4), (8, 1), (4, 2)])
def test_linear_strategies_split_outputs_or_inputs_by_mp(dp, mp):
    layout = ParallelLayout(data_parallel=dp, model_parallel=mp, vocab_emb_dp=False)
    assert style_strategies("colwise", layout) == {"matmul": ((dp, 1), (mp, 1))}
    assert style_strategies("rowwise", layout) == {"matmul": ((dp, mp), (1, mp)), "bias_add": ((dp, 1), (1,))}
    assert style_strategies("vocab_embedding", layout) == {"gather": ((mp, 1), (dp, 1))}
    assert style_strategies("lm_head", layout) == {"matmul": ((dp, 1), (mp, 1))}
    assert style_strategies("replicated", layout) == {"matmul": ((dp, 1), (1, 1))}


def test_vocab_emb_dp_keeps_embedding_and_head_whole():
    layout = ParallelLayout(data_parallel=2, model_parallel=4, vocab_emb_dp=True)
    assert style_strategies("vocab_embedding", layout) == {"gather": ((1, 1), (2, 1))}
    assert style_strategies("lm_head", layout) == {"matmul": ((2, 1), (1, 1))}


def test_expert_strategies_split_experts_by_ep_and_each_ffn_by_mp():
    strategies = style_strategies("experts", ParallelLayout(data_parallel=4, model_parallel=2, expert_parallel=2))
    assert strategies == {
        "gate_matmul": ((2, 2, 1), (2, 2, 1)),
        "up_matmul": ((2, 2, 1), (2, 2, 1)),
        "down_matmul": ((2, 2, 2), (2, 1, 2)),
        "bias_add": ((2, 2, 1), (2, 1, 1)),
    }


def test_plan_names_every_parameterised_module():
    assert module_style("model.layers.17.attention.wk_v") == "colwise"
    assert module_style("model.layers.3.attention.w_qkv") == "colwise"
    assert module_style("model.layers.3.feed_forward.w_gate_hidden") == "colwise"
    assert module_style("model.layers.3.attention.wo") == "rowwise"
    assert module_style("model.layers.3.feed_forward.w2") == "rowwise"
    assert module_style("model.layers.3.feed_forward.ffn") == "experts"
    assert module_style("model.layers.3.feed_forward.ffn.w2") is None  # a weight holder, not an op
    assert module_style("model.layers.x.attention.wo") is None


# -- validation -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "layout", "message"),
    [
        ({"num_heads": 4, "n_kv_heads": 2}, {"model_parallel": 4}, "n_kv_heads 2 is not divisible by model_parallel 4"),
        ({"hidden_size": 96, "num_heads": 6, "n_kv_heads": 6}, {"model_parallel": 4}, "num_heads 6 is not divisible"),
        ({"intermediate_size": 100}, {"model_parallel": 8}, "intermediate_size 100 is not divisible by model_paral"),
        ({"vocab_size": 510}, {"model_parallel": 4, "vocab_emb_dp": False}, "vocab_size 510 is not divisible"),
        ({"num_experts": 6, "num_experts_per_tok": 2}, {"data_parallel": 4, "expert_parallel": 4}, "num_experts 6"),
        ({"num_experts": 4}, {"data_parallel": 2, "expert_parallel": 4}, "data_parallel 2 is not divisible by expe"),
        ({}, {"expert_parallel": 2, "data_parallel": 2}, "expert_parallel 2 needs a mixture-of-experts model"),
        ({}, {"context_parallel": 2}, "context_parallel 2 is not supported"),
        ({}, {"model_parallel": 0}, "model_parallel must be a positive integer"),
        ({}, {"pipeline_stage": 3}, "num_layers 2 cannot fill pipeline_stage 3"),
    ],
)
def test_layouts_that_do_not_divide_the_model_name_the_field(overrides, layout, message):
    with pytest.raises(ParallelPlanError, match=message):
        validate_layout(tiny_config(**overrides), ParallelLayout(**layout))


def test_vocab_need_not_divide_when_the_embedding_is_data_parallel():
    validate_layout(tiny_config(vocab_size=510), ParallelLayout(model_parallel=2, vocab_emb_dp=True))


def test_every_shipped_layout_fits_its_model():
    """The seed's layouts in telechat2/configs split the real architectures (no config/plan drift)."""
    checked = 0
    for model in configs.list_models():
        architecture = configs.architecture(model)
        for phase in configs.PHASES:
            layout = ParallelLayout.from_run_config(configs.load_config(model, phase))
            validate_layout(architecture, layout)
            checked += 1
    assert checked == 3 * len(configs.list_models())
    big = ParallelLayout.from_run_config(configs.load_config("telechat2-115b", "finetune"))
    assert (big.data_parallel, big.model_parallel, big.pipeline_stage, big.vocab_emb_dp) == (1, 8, 8, True)
    assert big.recompute is True  # recompute_config.recompute of the shared finetune YAML
    assert configs.architecture("telechat2-115b").n_kv_heads % big.model_parallel == 0
    assert stage_layer_counts(96, big.pipeline_stage) == [12] * 8
    moe = ParallelLayout.from_run_config(configs.load_config("telechat2-39b-a12b", "finetune"))
    assert moe.expert_parallel == 2 and configs.architecture("telechat2-39b-a12b").num_experts % 2 == 0


def test_from_config_reads_mindformers_parallel_config():
    mindformers = pytest.importorskip("mindformers.modules.transformer.transformer")
    native = mindformers.TransformerOpParallelConfig(
        data_parallel=2, model_parallel=4, expert_parallel=2, pipeline_stage=2, vocab_emb_dp=False,
        recompute={"recompute": [1, 0]},
    )  # fmt: skip
    layout = ParallelLayout.from_config(native)
    assert layout == ParallelLayout(2, 4, 2, 2, 1, False, (1, 0))


# -- applied to the tiny model (attributes only, no compile) ----------------------------------------------------------


def _cells(model) -> dict:
    return dict(model.cells_and_names())


def test_apply_sets_strategies_and_stages_on_the_tiny_model_with_mp2_pp2():
    from telechat2.modeling import TeleChat2ForCausalLM

    model = TeleChat2ForCausalLM(tiny_config())
    layout = {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 2, "vocab_emb_dp": False}
    applied = apply_parallel_plan(model, layout)
    cells = _cells(model)
    for layer in (0, 1):
        prefix = f"model.layers.{layer}."
        for column in ("attention.wq", "attention.wk_v", "feed_forward.w1", "feed_forward.w3"):
            assert cells[prefix + column].matmul.attrs["in_strategy"] == ((1, 1), (2, 1)), column
        for row in ("attention.wo", "feed_forward.w2"):
            assert cells[prefix + row].matmul.attrs["in_strategy"] == ((1, 2), (1, 2)), row
            assert cells[prefix + row].bias_add.attrs["in_strategy"] == ((1, 1), (1,)), row
        assert cells[f"model.layers.{layer}"].pipeline_stage == layer
    assert cells["model.tok_embeddings"].gather.attrs["in_strategy"] == ((2, 1), (1, 1))
    assert cells["lm_head"].matmul.attrs["in_strategy"] == ((1, 1), (2, 1))
    assert [cells[p].pipeline_stage for p in ("model.tok_embeddings", "model.norm_out", "lm_head", "loss")] == [
        0,
        1,
        1,
        1,
    ]
    assert applied.recomputed_layers == [] and len(applied.strategies) == 2 * 6 + 2


def test_apply_covers_qkv_concat_and_experts():
    from telechat2.modeling import TeleChat2ForCausalLM

    model = TeleChat2ForCausalLM(tiny_config(qkv_concat=True, num_experts=4, num_experts_per_tok=2))
    apply_parallel_plan(model, ParallelLayout(data_parallel=2, model_parallel=2, expert_parallel=2, recompute=True))
    cells = _cells(model)
    assert cells["model.layers.1.attention.w_qkv"].matmul.attrs["in_strategy"] == ((2, 1), (2, 1))
    experts = cells["model.layers.1.feed_forward.ffn"]
    assert experts.gate_matmul.attrs["in_strategy"] == ((2, 1, 1), (2, 2, 1))
    assert experts.down_matmul.attrs["in_strategy"] == ((2, 1, 2), (2, 1, 2))
    assert cells["model.layers.1.feed_forward.router.dense"].matmul.attrs["in_strategy"] == ((2, 1), (1, 1))
    assert cells["model.layers.0"]._has_config_recompute  # Cell.recompute() was called
    dense_qkv = TeleChat2ForCausalLM(tiny_config(qkv_concat=True))
    apply_parallel_plan(dense_qkv, ParallelLayout(model_parallel=2))
    assert _cells(dense_qkv)["model.layers.0.feed_forward.w_gate_hidden"].matmul.attrs["in_strategy"] == (
        (1, 1),
        (2, 1),
    )


def test_data_parallel_only_is_a_no_op():
    from telechat2.modeling import TeleChat2ForCausalLM

    model = TeleChat2ForCausalLM(tiny_config())
    assert apply_parallel_plan(model, configs.load_config("telechat2-tiny", "finetune")["parallel_config"]) is None
    cells = _cells(model)
    assert "in_strategy" not in cells["model.layers.0.attention.wq"].matmul.attrs
    assert "_pipeline_stage" not in cells["model.layers.1"].__dict__  # never set


def test_apply_refuses_a_layout_the_model_cannot_take():
    from telechat2.modeling import TeleChat2ForCausalLM

    model = TeleChat2ForCausalLM(tiny_config())
    with pytest.raises(ParallelPlanError, match="n_kv_heads 2 is not divisible by model_parallel 4"):
        apply_parallel_plan(model, {"model_parallel": 4})
    assert "in_strategy" not in _cells(model)["model.layers.0.attention.wq"].matmul.attrs  # nothing half-applied
