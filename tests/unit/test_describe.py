"""`telechat2 describe`: exact parameter counts and the per-device memory estimate."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest

from telechat2 import configs, describe
from telechat2.cli import main

# Size of the Hugging Face TeleChat2-115B safetensors (fp32), from the facts file: 4 bytes per parameter.
HF_115B_BYTES = 453_131_665_408


def hand_count(v: int, h: int, layers: int, heads: int, kv: int, f: int, experts: int = 0) -> int:
    """Written out from the facts file's weight table, independently of describe.py."""
    hd = h // heads
    attention = h * h + (2 * kv * hd) * h + (h * h + h)  # wq, wk_v, wo + bias
    norms = 2 * h
    dense_mlp = f * h + f * h + (h * f + h)  # w1, w3, w2 + bias
    moe_mlp = experts * h + experts * (f * h + f * h + h * f) + experts * h  # router, w1 w3 w2, w2 bias [1,E,1,H]
    mlp = moe_mlp if experts else dense_mlp
    return v * h + layers * (attention + norms + mlp) + h + v * h  # embedding, layers, norm_out, lm_head


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        ("telechat2-7b", (131072, 4096, 30, 32, 32, 12288)),
        ("telechat2-35b", (131072, 6144, 64, 48, 48, 20480)),
        ("telechat2-115b", (131072, 8192, 96, 64, 8, 40960)),
        ("telechat2-39b-a12b", (131072, 4096, 30, 32, 32, 6144, 16)),
        ("telechat2-tiny", (512, 64, 2, 4, 2, 128)),
        ("telechat2-tiny-moe", (512, 64, 2, 4, 2, 64, 4)),
    ],
)
def test_exact_parameter_count(model: str, shape: tuple[int, ...]) -> None:
    assert describe.count_parameters(configs.architecture(model)) == hand_count(*shape)


def test_115b_matches_the_released_checkpoint_size() -> None:
    parameters = describe.count_parameters(configs.architecture("telechat2-115b"))
    assert parameters * 4 == HF_115B_BYTES
    assert parameters == pytest.approx(115e9, rel=0.02)


def test_moe_total_and_active() -> None:
    arch = configs.architecture("telechat2-39b-a12b")
    assert describe.count_parameters(arch) == pytest.approx(39e9, rel=0.02)
    assert describe.active_parameters(arch) == pytest.approx(12e9, rel=0.02)
    dense = configs.architecture("telechat2-7b")
    assert describe.active_parameters(dense) == describe.count_parameters(dense)


@pytest.mark.skipif(importlib.util.find_spec("telechat2.modeling") is None, reason="telechat2.modeling not written yet")
@pytest.mark.parametrize("model", ["telechat2-tiny", "telechat2-tiny-moe"])
@pytest.mark.parametrize("qkv_concat", [False, True])
def test_count_equals_the_real_model(model: str, qkv_concat: bool) -> None:
    from telechat2.modeling import TeleChat2ForCausalLM

    arch = dataclasses.replace(configs.architecture(model), qkv_concat=qkv_concat)
    network = TeleChat2ForCausalLM(arch)
    total = sum(int(param.size) for param in network.get_parameters())
    assert total == describe.count_parameters(arch)


def test_memory_components_single_device() -> None:
    """Without parallelism: fp32 weights 4P, fp32 gradients 4P, AdamW moments 8P."""
    arch = configs.architecture("telechat2-tiny")
    parameters = describe.count_parameters(arch)
    layout = describe.Layout(seq_length=64, batch_size=2, recompute=False, parallel_optimizer=False)
    memory = describe.estimate_memory(arch, layout)
    assert (memory.weights, memory.gradients, memory.optimizer) == (4 * parameters, 4 * parameters, 8 * parameters)
    assert memory.activations >= 2 * 4 * 2 * 64 * arch.vocab_size  # at least the fp32 logits and their gradient
    assert memory.stage == "only" and memory.fits


def test_parallel_optimizer_shards_weights_and_moments() -> None:
    arch = configs.architecture("telechat2-7b")
    plain = describe.estimate_memory(arch, describe.Layout(data_parallel=8, parallel_optimizer=False))
    sharded = describe.estimate_memory(arch, describe.Layout(data_parallel=8, parallel_optimizer=True))
    assert sharded.weights == pytest.approx(plain.weights / 8, rel=1e-6)
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8, rel=1e-6)
    assert sharded.gradients == plain.gradients


def test_more_parallelism_and_recompute_need_less_memory() -> None:
    arch = configs.architecture("telechat2-115b")
    base = describe.Layout(model_parallel=8, pipeline_stage=8, micro_batch_num=8, recompute=False)
    totals = [describe.estimate_memory(arch, dataclasses.replace(base, model_parallel=mp)).total for mp in (2, 4, 8)]
    assert totals == sorted(totals, reverse=True)
    with_recompute = describe.estimate_memory(arch, dataclasses.replace(base, recompute=True))
    assert with_recompute.activations < describe.estimate_memory(arch, base).activations


@pytest.mark.parametrize("model", ["telechat2-7b", "telechat2-35b", "telechat2-115b", "telechat2-39b-a12b"])
def test_shipped_layouts_fit_a_64gb_npu(model: str) -> None:
    report = describe.describe(model)
    assert report["memory"]["fits"], report["memory"]
    assert report["layout"]["devices"] == configs.model_defaults(model).devices


def test_an_undersized_layout_does_not_fit(capsys) -> None:
    assert main(["describe", "telechat2-115b", "--pp", "2", "--mp", "8", "--no-recompute"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT a 64 GiB NPU" in out
    report = describe.describe("telechat2-115b", {"parallel_config": {"pipeline_stage": 1, "model_parallel": 1}})
    assert not report["memory"]["fits"]


def test_cli_json(capsys) -> None:
    assert main(["describe", "telechat2-39b-a12b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == describe.count_parameters(configs.architecture("telechat2-39b-a12b"))
    assert report["active_parameters"] < report["parameters"]
    assert report["layout"]["expert_parallel"] == 2
    assert set(report["memory"]) >= {"weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes"}


def test_cli_layout_flags(capsys) -> None:
    argv = ["describe", "telechat2-7b", "--json", "--dp", "2", "--mp", "4", "--seq-length", "4096"]
    assert main([*argv, "--batch-size", "2", "--no-recompute"]) == 0
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert (layout["data_parallel"], layout["model_parallel"], layout["devices"]) == (2, 4, 8)
    assert (layout["seq_length"], layout["batch_size"], layout["recompute"]) == (4096, 2, False)


def test_cli_text_mentions_both_moe_counts(capsys) -> None:
    assert main(["describe", "telechat2-39b-a12b"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 39,330,099,200" in out and "active parameters per token: 12,149,534,720" in out


def test_cli_rejects_an_impossible_layout(capsys) -> None:
    assert main(["describe", "telechat2-7b", "--mp", "3"]) == 2
    assert "model_parallel 3 does not divide num_heads 32" in capsys.readouterr().err


def test_describe_does_not_import_mindspore() -> None:
    code = (
        "import sys\nfrom telechat2.cli import main\nmain(['describe', 'telechat2-115b', '--json'])\n"
        "assert 'mindspore' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out)["parameters"] * 4 == HF_115B_BYTES


def _plan(model: str, devices: int, per_node: int = 8, fixed=None, seq_length=None) -> describe.LayoutPlan:
    return describe.plan_layout(
        configs.architecture(model), describe.base_layout(model, seq_length), devices, per_node, fixed
    )


@pytest.mark.parametrize("model", configs.list_models())
def test_planner_keeps_every_models_default_layout_on_its_default_nodes(model: str) -> None:
    defaults = configs.model_defaults(model)
    plan = _plan(model, defaults.devices, defaults.devices_per_node)
    assert plan.source == "ModelDefault" and plan.memory.fits
    assert plan.layout == describe.layout_from_config(configs.load_config(model, "finetune"))


def test_planner_completes_a_layout_that_fits_memory_and_suits_the_architecture() -> None:
    plan = _plan("telechat2-35b", 64)  # the default layout is for 16 devices
    layout = plan.layout
    assert plan.source == "Planned" and layout.devices == 64
    assert plan.memory.total <= describe.PLAN_FIT_FRACTION * plan.memory.device_bytes
    assert describe.layout_problems(configs.architecture("telechat2-35b"), layout) == []
    assert layout.model_parallel <= 8  # tensor parallelism within one node
    # The least sharded split that fits: every split with less mp x pp runs out of memory.
    arch = configs.architecture("telechat2-35b")
    base = describe.base_layout("telechat2-35b")
    for mp in (1, 2, 4, 8, 16):
        for pp in (1, 2, 4, 8, 16, 32, 64):
            if mp * pp < layout.model_parallel * layout.pipeline_stage and 64 % (mp * pp) == 0:
                smaller = describe._completed(base, arch, 64 // (mp * pp), mp, pp, None)
                estimate = describe.estimate_memory(arch, smaller)
                fits = estimate.total <= describe.PLAN_FIT_FRACTION * estimate.device_bytes
                assert not fits or describe.layout_problems(arch, smaller) or mp > 8, (mp, pp)


def test_planner_keeps_fixed_degrees_and_says_why_nothing_fits() -> None:
    plan = _plan("telechat2-7b", 16, fixed={"model_parallel": 2})
    assert plan.layout.model_parallel == 2 and plan.layout.devices == 16
    with pytest.raises(configs.ConfigError, match="fits 64 GiB per NPU.*smallest estimate"):
        _plan("telechat2-115b", 16)
    with pytest.raises(configs.ConfigError, match="pipeline_stage at most 2"):
        _plan("telechat2-tiny", 4, 1, fixed={"pipeline_stage": 4})
    full = _plan("telechat2-tiny", 2, 1, fixed={"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 1})
    assert full.source == "Spec" and full.layout.model_parallel == 2


def test_layout_problems_name_each_broken_rule() -> None:
    arch = configs.architecture("telechat2-tiny")
    problems = describe.layout_problems(arch, describe.Layout(model_parallel=3, pipeline_stage=3, micro_batch_num=1))
    assert any("model_parallel 3 does not divide num_heads 4" in p for p in problems)
    assert any("pipeline_stage 3 exceeds num_layers 2" in p for p in problems)
    assert any("micro_batch_num 1 must be >= pipeline_stage 3" in p for p in problems)
