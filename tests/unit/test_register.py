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
