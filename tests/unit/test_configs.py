"""Configs: one source of truth per model, MindFormers-loadable, rendered with overrides for the operator."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from telechat2 import configs
from telechat2.configuration import TeleChat2Config

SEED_ENV = {
    "ENABLE_CELL_REUSE": "1",
    "MS_DEV_SIDE_EFFECT_LOAD_ELIM": "3",
    "MS_MEMORY_POOL_RECYCLE": "1",
    "GE_NOT_CUT": "1",
}
# Facts file, section 1: hidden, layers, heads, kv heads, ffn, experts.
ARCHITECTURES = {
    "telechat2-7b": (4096, 30, 32, 32, 12288, 0),
    "telechat2-35b": (6144, 64, 48, 48, 20480, 0),
    "telechat2-115b": (8192, 96, 64, 8, 40960, 0),
    "telechat2-39b-a12b": (4096, 30, 32, 32, 6144, 16),
    "telechat2-tiny": (64, 2, 4, 2, 128, 0),
}
ARCH_KEYS = ("hidden_size", "num_layers", "num_heads", "n_kv_heads", "intermediate_size", "num_experts")
ALL = [(model, phase) for model in configs.MODELS for phase in configs.PHASES]


def test_models_and_phases() -> None:
    assert configs.list_models() == list(configs.MODELS)
    assert set(ARCHITECTURES) <= set(configs.MODELS)
    assert "telechat2-tiny-moe" in configs.MODELS
    assert configs.PHASES == ("finetune", "predict", "predict_parallel")


@pytest.mark.parametrize("model", list(ARCHITECTURES))
def test_architecture_matches_the_facts(model: str) -> None:
    arch = configs.architecture(model)
    assert tuple(getattr(arch, key) for key in ARCH_KEYS) == ARCHITECTURES[model]
    assert arch.vocab_size == (512 if model == "telechat2-tiny" else 131072)
    assert arch.head_dim == (16 if model == "telechat2-tiny" else 128)
    if arch.is_moe:
        assert (arch.num_experts_per_tok, arch.norm_topk_prob, arch.aux_loss_factor) == (4, True, 0.01)


def test_tiny_moe_is_tiny_with_experts() -> None:
    tiny, moe = configs.architecture("telechat2-tiny"), configs.architecture("telechat2-tiny-moe")
    assert moe.is_moe and moe.num_experts_per_tok <= moe.num_experts
    assert (moe.hidden_size, moe.num_layers, moe.n_kv_heads, moe.vocab_size) == (
        tiny.hidden_size,
        tiny.num_layers,
        tiny.n_kv_heads,
        tiny.vocab_size,
    )


def test_architecture_is_written_once_per_model() -> None:
    """Phase YAMLs inherit the architecture; no size number is repeated outside <model>/model.yaml."""
    key_re = re.compile(r"^\s*(" + "|".join(ARCH_KEYS) + r")\s*:", re.MULTILINE)
    for model, phase in ALL:
        text = configs.config_path(model, phase).read_text()
        assert not key_re.search(text), f"{model}/{phase}.yaml repeats an architecture key"
        assert "model.yaml" in text
    for path in (configs.CONFIG_DIR / "common").glob("*.yaml"):
        assert not key_re.search(path.read_text()), path


@pytest.mark.parametrize(("model", "phase"), ALL)
def test_model_config_keys_are_telechat2config_fields(model: str, phase: str) -> None:
    model_config = configs.load_config(model, phase)["model"]["model_config"]
    unknown = set(model_config) - configs.model_config_fields() - configs.RUNTIME_MODEL_KEYS
    assert not unknown, f"keys that are neither TeleChat2Config fields nor runtime keys: {unknown}"
    arch = TeleChat2Config.from_model_config(model_config)
    assert set(arch.extra) <= configs.RUNTIME_MODEL_KEYS
    assert configs.architecture(model).hidden_size == arch.hidden_size


@pytest.mark.parametrize(("model", "phase"), ALL)
def test_every_config_validates(model: str, phase: str) -> None:
    config = configs.load_config(model, phase)
    configs.validate_config(config, phase)
    assert config["run_mode"] == ("finetune" if phase == "finetune" else "predict")
    assert "base_config" not in config


def test_mindformers_loads_every_config_the_same_way(tmp_path) -> None:
    config_module = pytest.importorskip("mindformers.tools.register.config")
    mf_config = config_module.MindFormerConfig
    for model, phase in ALL:
        path = str(configs.config_path(model, phase))
        assert dict(mf_config._file2dict(path)) == configs.load_config(model, phase), (model, phase)
        loaded = mf_config(path)  # applies MindFormers' template: rejects unknown parallel_config keys
        assert loaded.model.model_config.hidden_size == configs.architecture(model).hidden_size
        expected_parallel = configs.load_config(model, phase)["parallel_config"]
        assert {k: loaded.parallel_config[k] for k in expected_parallel} == expected_parallel
        rendered = tmp_path / f"{model}-{phase}.yaml"
        rendered.write_text(configs.render_config(model, phase))
        assert mf_config(str(rendered)).model.model_config.num_layers == configs.architecture(model).num_layers


def test_seed_layouts() -> None:
    finetune_115b = configs.load_config("telechat2-115b", "finetune")["parallel_config"]
    assert {k: finetune_115b[k] for k in configs.model_defaults("telechat2-115b").parallel} == {
        "data_parallel": 1,
        "model_parallel": 8,
        "pipeline_stage": 8,
        "micro_batch_num": 8,
        "vocab_emb_dp": True,
        "gradient_aggregation_group": 4,
        "use_seq_parallel": True,
    }
    predict_mp = {"telechat2-7b": 1, "telechat2-35b": 2, "telechat2-115b": 8, "telechat2-39b-a12b": 2}
    for model, mp in predict_mp.items():
        for phase in ("predict", "predict_parallel"):
            assert configs.load_config(model, phase)["parallel_config"]["model_parallel"] == mp
            assert configs.load_config(model, phase)["model"]["model_config"]["use_past"] is True
        assert configs.model_defaults(model).predict_devices == mp
    assert configs.load_config("telechat2-39b-a12b", "predict")["model"]["model_config"]["capacity_factor"] == 1.8
    assert configs.load_config("telechat2-39b-a12b", "finetune")["model"]["model_config"]["capacity_factor"] == 1.2
    for model in ARCHITECTURES:
        assert configs.load_config(model, "finetune")["model"]["model_config"]["seq_length"] == (
            64 if model == "telechat2-tiny" else 8192
        )


@pytest.mark.parametrize(
    ("model", "devices", "nodes"),
    [
        ("telechat2-7b", 8, 1),
        ("telechat2-35b", 16, 2),
        ("telechat2-115b", 64, 8),
        ("telechat2-39b-a12b", 16, 2),
        ("telechat2-tiny", 1, 1),
    ],
)
def test_model_defaults(model: str, devices: int, nodes: int) -> None:
    defaults = configs.model_defaults(model)
    assert (defaults.devices, defaults.nodes) == (devices, nodes)
    assert defaults.devices == configs.parallel_devices(defaults.parallel)
    assert set(defaults.parallel) <= set(configs.PARALLEL_KEYS)
    assert defaults.env == ({} if model == "telechat2-tiny" else SEED_ENV)
    assert defaults.devices_per_node == (1 if model == "telechat2-tiny" else 8)
    finetune = configs.load_config(model, "finetune")
    assert defaults.epochs == finetune["runner_config"]["epochs"]
    assert defaults.learning_rate == finetune["lr_schedule"]["learning_rate"]
    assert defaults.save_steps > 0 and defaults.batch_size > 0
    if model == "telechat2-39b-a12b":
        assert defaults.parallel["expert_parallel"] == 2
    with pytest.raises(AttributeError):
        defaults.nodes = 3  # frozen


def test_finetune_overrides_land_on_mindformers_keys() -> None:
    overrides = configs.finetune_overrides(
        dataset_path="/data/train.mindrecord",
        load_checkpoint="/ckpt/telechat2.ckpt",
        output_dir="/out",
        parallel={"data_parallel": 2, "model_parallel": 4},
        epochs=3,
        learning_rate=2e-5,
        seq_length=4096,
        batch_size=2,
        save_steps=100,
        resume=True,
    )
    config = yaml.safe_load(configs.render_config("telechat2-7b", "finetune", overrides))
    assert config["train_dataset"]["data_loader"]["dataset_dir"] == "/data/train.mindrecord"
    assert config["train_dataset"]["data_loader"]["type"] == "MindDataset"  # siblings kept
    assert config["load_checkpoint"] == "/ckpt/telechat2.ckpt"
    assert config["output_dir"] == "/out"
    assert (config["parallel_config"]["data_parallel"], config["parallel_config"]["model_parallel"]) == (2, 4)
    assert config["parallel_config"]["pipeline_stage"] == 1
    assert config["runner_config"]["epochs"] == 3 and config["runner_config"]["batch_size"] == 2
    assert config["lr_schedule"]["learning_rate"] == 2e-5
    assert config["lr_schedule"]["lr_end"] == pytest.approx(2e-6)
    assert config["model"]["model_config"]["seq_length"] == 4096
    assert config["model"]["model_config"]["hidden_size"] == 4096
    monitor = next(c for c in config["callbacks"] if c["type"] == "CheckpointMonitor")
    assert monitor["save_checkpoint_steps"] == 100
    assert monitor["prefix"] == "telechat2"  # merged by type, not replaced
    assert [c["type"] for c in config["callbacks"]] == ["MFLossMonitor", "CheckpointMonitor"]
    assert config["resume_training"] is True


def test_none_means_default() -> None:
    assert configs.finetune_overrides() == {}
    assert configs.render_config("telechat2-7b", "finetune", {}) == configs.render_config("telechat2-7b", "finetune")


def test_render_is_deterministic_and_self_contained() -> None:
    a = {"output_dir": "/o", "parallel_config": {"data_parallel": 4}}
    b = {"parallel_config": {"data_parallel": 4}, "output_dir": "/o"}
    first = configs.render_config("telechat2-35b", "finetune", a)
    assert first == configs.render_config("telechat2-35b", "finetune", a)
    assert first == configs.render_config("telechat2-35b", "finetune", b)
    assert first.startswith("# TeleChat2 MindFormers config: model telechat2-35b, phase finetune.")
    assert "base_config" not in yaml.safe_load(first)
    assert not re.search(r"[&*]id\d+", first)  # no YAML anchors or aliases
    assert yaml.safe_load(first)["parallel_config"]["data_parallel"] == 4


def test_dotted_override_keys() -> None:
    rendered = configs.render_config("telechat2-tiny", "finetune", {"parallel_config.data_parallel": 2})
    assert yaml.safe_load(rendered)["parallel_config"]["data_parallel"] == 2


@pytest.mark.parametrize(
    ("model", "overrides", "error"),
    [
        ("telechat2-7b", {"no_such_key": 1}, "no_such_key"),
        ("telechat2-7b", {"parallel_config": {"model_parallel": 3}}, "model_parallel 3 does not divide num_heads"),
        ("telechat2-115b", {"parallel_config": {"micro_batch_num": 4}}, "micro_batch_num 4 must be >= pipeline_stage"),
        ("telechat2-7b", {"parallel_config": {"expert_parallel": 2, "data_parallel": 8}}, "mixture-of-experts"),
        ("telechat2-39b-a12b", {"parallel_config": {"expert_parallel": 3}}, "does not divide num_experts"),
        ("telechat2-39b-a12b", {"parallel_config": {"data_parallel": 1}}, "must divide data_parallel"),
        ("telechat2-7b", {"parallel_config": {"data_parallel": 0}}, "parallel_config.data_parallel"),
        ("telechat2-7b", {"parallel_config": {"dp": 2}}, "unknown key"),
        ("telechat2-tiny", {"model": {"model_config": {"num_heads": 3}}}, "num_heads"),
    ],
)
def test_render_rejects_bad_overrides_by_name(model, overrides, error) -> None:
    with pytest.raises(configs.ConfigError, match=error):
        configs.render_config(model, "finetune", overrides)


def test_bad_names_and_values() -> None:
    with pytest.raises(configs.ConfigError, match="unknown model 'telechat3'"):
        configs.config_path("telechat3", "finetune")
    with pytest.raises(configs.ConfigError, match="unknown phase 'train'"):
        configs.load_config("telechat2-7b", "train")
    with pytest.raises(configs.ConfigError, match="epochs"):
        configs.finetune_overrides(epochs=0)
    with pytest.raises(configs.ConfigError, match="learning_rate"):
        configs.finetune_overrides(learning_rate=-1.0)
    with pytest.raises(configs.ConfigError, match="unknown parallel key"):
        configs.finetune_overrides(parallel={"tensor_parallel": 2})


def test_load_config_returns_a_copy() -> None:
    configs.load_config("telechat2-7b", "finetune")["parallel_config"]["data_parallel"] = 99
    assert configs.load_config("telechat2-7b", "finetune")["parallel_config"]["data_parallel"] == 8


def test_configs_api_does_not_import_mindspore() -> None:
    code = (
        "import sys\n"
        "from telechat2 import configs\n"
        "configs.render_config('telechat2-115b', 'finetune', configs.finetune_overrides(epochs=1))\n"
        "configs.model_defaults('telechat2-39b-a12b'); configs.architecture('telechat2-7b')\n"
        "bad = [m for m in ('mindspore', 'mindformers', 'sentencepiece') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
