"""MindFormers registration: a YAML model section naming TeleChat2 builds our network through MindFormers."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from tiny_model import TINY_ARCHITECTURE, build_tiny_model


@pytest.fixture(autouse=True)
def _pynative_mode():
    """Eager execution, whatever mode an earlier test left behind (generation refuses graph mode)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


pytest.importorskip("mindformers")


def _model_section(**overrides) -> dict:
    model_config = {"type": "TeleChat2Config", **TINY_ARCHITECTURE, "use_past": False, **overrides}
    return {"arch": {"type": "TeleChat2ForCausalLM"}, "model_config": model_config}


def test_registration_is_idempotent_and_does_not_displace_mindformers_models():
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    from telechat2.register import TeleChat2MFConfig, TeleChat2MFForCausalLM, register_with_mindformers

    register_with_mindformers()
    models_before = dict(MindFormerRegister.registry[MindFormerModuleType.MODELS])
    register_with_mindformers()
    assert MindFormerRegister.registry[MindFormerModuleType.MODELS] == models_before
    assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "TeleChat2ForCausalLM") is TeleChat2MFForCausalLM
    assert MindFormerRegister.get_cls(MindFormerModuleType.CONFIG, "TeleChat2Config") is TeleChat2MFConfig
    assert MindFormerRegister.get_cls(MindFormerModuleType.MODELS, "LlamaForCausalLM").__name__ == "LlamaForCausalLM"


def test_build_network_from_a_yaml_model_section_builds_our_model():
    from mindformers.models.build_model import build_network
    from mindformers.models.modeling_utils import PreTrainedModel
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    from mindformers.tools.register import MindFormerConfig

    from telechat2.register import register_with_mindformers

    register_with_mindformers()
    section = MindFormerConfig(**_model_section(extend_method="None", checkpoint_name_or_path=None))
    # what MindFormers' Trainer passes when it builds the network for training
    network = build_network(
        section, default_args={"parallel_config": TransformerOpParallelConfig(), "batch_size": 2, "moe_config": {}}
    )
    assert isinstance(network, PreTrainedModel)
    assert network.architecture.num_layers == 2 and network.architecture.n_kv_heads == 2
    assert network.config.batch_size == 2  # runtime keys stay on the MindFormers config

    reference = build_tiny_model(seed=41)
    assert [n for n, _ in network.parameters_and_names()] == [n for n, _ in reference.parameters_and_names()]
    for (_, mine), (_, theirs) in zip(network.parameters_and_names(), reference.parameters_and_names(), strict=True):
        mine.set_data(theirs.data)
    ids = ms.Tensor(np.random.default_rng(42).integers(4, 512, (1, 9)), ms.int32)
    network.set_train(False)
    np.testing.assert_allclose(network(ids).asnumpy(), reference(ids).asnumpy(), rtol=1e-6, atol=1e-6)
    assert float(network(ids, ids).asnumpy()) == pytest.approx(float(reference(ids, ids).asnumpy()), rel=1e-6)


def test_bad_architecture_in_yaml_fails_with_the_field_named():
    from mindformers.models.build_model import build_network
    from mindformers.tools.register import MindFormerConfig

    from telechat2.register import register_with_mindformers

    register_with_mindformers()
    section = MindFormerConfig(**_model_section(num_heads=5))
    with pytest.raises(ValueError, match="num_heads 5"):
        build_network(section)


def test_registration_also_makes_the_yaml_tokenizer_type_resolvable():
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    from telechat2.register import register_with_mindformers
    from telechat2.tokenizer import TeleChat2Tokenizer

    tokenizers = MindFormerRegister.registry.setdefault(MindFormerModuleType.TOKENIZER, {})
    tokenizers.pop("TeleChat2Tokenizer", None)  # as in a process that has not imported telechat2.tokenizer yet
    register_with_mindformers()
    # what `processor.tokenizer.type: TeleChat2Tokenizer` resolves through
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "TeleChat2Tokenizer") is TeleChat2Tokenizer


def test_semi_auto_parallel_build_applies_the_parallel_plan():
    """In semi-auto parallel mode (set by MindFormers' build_context on Ascend) the built network carries the plan."""
    from mindformers.models.build_model import build_network
    from mindformers.modules.transformer.transformer import TransformerOpParallelConfig
    from mindformers.tools.register import MindFormerConfig

    from telechat2.register import register_with_mindformers

    register_with_mindformers()
    layout = TransformerOpParallelConfig(data_parallel=1, model_parallel=2, pipeline_stage=2, vocab_emb_dp=False)
    section = MindFormerConfig(**_model_section(checkpoint_name_or_path=None))
    ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel", device_num=4, pipeline_stages=2)
    try:
        network = build_network(section, default_args={"parallel_config": layout, "moe_config": {}})
    finally:
        ms.reset_auto_parallel_context()
    cells = dict(network.cells_and_names())
    assert cells["model.layers.1.attention.wo"].matmul.attrs["in_strategy"] == ((1, 2), (1, 2))
    assert cells["model.tok_embeddings"].gather.attrs["in_strategy"] == ((2, 1), (1, 1))
    assert (cells["model.layers.0"].pipeline_stage, cells["lm_head"].pipeline_stage) == (0, 1)
    stand_alone = build_network(section, default_args={"parallel_config": layout, "moe_config": {}})
    assert "in_strategy" not in dict(stand_alone.cells_and_names())["lm_head"].matmul.attrs  # CPU runs: untouched
