"""TeleChatInference spec parsing: model defaults filled in, every invalid spec named by its field."""

from __future__ import annotations

from typing import Any

import pytest
from telechat_operator.common.spec import SpecError, default_vocab_file
from telechat_operator.inference.spec import (
    ServingDefaults,
    load_serving_defaults,
    merge_env,
    parse_inference,
    resolve_path_checkpoint,
)

from tests.unit.inference_fixtures import inference_body, inference_spec


@pytest.mark.parametrize(
    ("model", "devices", "seq_length"),
    [("telechat2-7b", 1, 8192), ("telechat2-35b", 2, 8192), ("telechat2-115b", 8, 8192), ("telechat2-tiny", 1, 64)],
)
def test_model_defaults_fill_devices_and_lengths(model: str, devices: int, seq_length: int) -> None:
    spec = inference_spec(model=model)
    assert spec.devices_per_replica == devices
    assert spec.seq_length == spec.trained_seq_length == seq_length
    assert spec.max_seq_len == seq_length
    assert spec.max_input_token_len == int(seq_length * 0.75)
    assert not spec.long_context
    assert not spec.multi_node


def test_defaults_come_from_telechat2_configs() -> None:
    from telechat2 import configs

    for model in configs.list_models():
        defaults = load_serving_defaults(model)
        assert defaults.predict_devices == configs.model_defaults(model).predict_devices
        assert defaults.seq_length == configs.model_defaults(model).seq_length


def test_long_context_past_the_trained_length() -> None:
    spec = inference_spec(seqLength=32768, maxSeqLen=20000, maxInputTokenLen=16000)
    assert spec.long_context
    assert (spec.seq_length, spec.trained_seq_length) == (32768, 8192)
    assert (spec.max_seq_len, spec.max_input_token_len) == (20000, 16000)


def test_explicit_values_win() -> None:
    spec = inference_spec(
        replicas=3,
        devicesPerReplica=4,
        nodesPerReplica=2,
        port=9000,
        service={"type": "NodePort", "annotations": {"a": "b"}},
        apiKeySecretRef={"name": "keys", "key": "token"},
        vocabFile="/tok/tokenizer.model",
        nodeSelector={"accelerator-type": "module-910b-8"},
    )
    assert (spec.replicas, spec.devices_per_replica, spec.nodes_per_replica, spec.world_size) == (3, 4, 2, 8)
    assert spec.multi_node
    assert (spec.port, spec.service_type, spec.service_annotations) == (9000, "NodePort", {"a": "b"})
    assert (spec.api_key_secret_name, spec.api_key_secret_key) == ("keys", "token")
    assert resolve_path_checkpoint(spec).vocab_file == "/tok/tokenizer.model"
    assert spec.node_selector == {"accelerator-type": "module-910b-8"}


def test_batch_size_and_warm_up() -> None:
    spec = inference_spec()
    assert spec.max_batch_size is None, "unset: no flag, the server's own default applies"
    assert spec.warm_up is True
    spec = inference_spec(maxBatchSize=1024, warmUp=False)
    assert (spec.max_batch_size, spec.warm_up) == (1024, False)
    # Without warmUp in the body the parser falls back to what the CRD defaults it to.
    assert inference_spec(warmUp=None).warm_up is True


@pytest.mark.parametrize(
    ("path", "vocab"),
    [
        ("/models/7b/telechat2_7b.ckpt", "/models/7b/tokenizer.model"),
        ("/models/7b/model.safetensors", "/models/7b/tokenizer.model"),
        ("/models/7b", "/models/7b/tokenizer.model"),
        ("/models/7b/", "/models/7b/tokenizer.model"),
    ],
)
def test_default_vocab_file_sits_beside_the_checkpoint(path: str, vocab: str) -> None:
    assert default_vocab_file(path) == vocab


def test_user_env_overrides_model_default_by_name() -> None:
    env = merge_env({"A": "1", "B": "2"}, [{"name": "B", "value": "x"}, {"name": "C", "value": "3"}])
    assert [(e["name"], e.get("value")) for e in env] == [("A", "1"), ("B", "x"), ("C", "3")]
    spec = inference_spec(env=[{"name": "GE_NOT_CUT", "value": "0"}])
    assert [e for e in spec.env if e["name"] == "GE_NOT_CUT"] == [{"name": "GE_NOT_CUT", "value": "0"}]


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("both checkpoint sources", {"checkpoint": {"path": "/m", "fromFinetune": "ft"}}, "spec.checkpoint"),
    ("no checkpoint source", {"checkpoint": {}}, "spec.checkpoint"),
    ("relative checkpoint path", {"checkpoint": {"path": "models/x.ckpt"}}, "spec.checkpoint.path"),
    ("3 devices", {"devicesPerReplica": 3}, "spec.devicesPerReplica"),
    ("input not below max", {"maxSeqLen": 4096, "maxInputTokenLen": 4096}, "spec.maxInputTokenLen"),
    ("max past trained length", {"maxSeqLen": 16384}, "spec.maxSeqLen"),
    ("max past seqLength", {"seqLength": 16384, "maxSeqLen": 20000}, "spec.maxSeqLen"),
    ("mindie multi-node", {"backend": "mindie", "nodesPerReplica": 2}, "spec.nodesPerReplica"),
    ("msrun port", {"nodesPerReplica": 2, "port": 8118}, "spec.port"),
    ("reserved env", {"env": [{"name": "TELECHAT_API_KEY", "value": "x"}]}, "spec.env[0].name"),
    ("reserved volume", {"volumes": [{"name": "dshm", "emptyDir": {}}]}, "spec.volumes[0].name"),
    ("mount of no volume", {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, "spec.volumeMounts[0].name"),
    ("NPUs in resources", {"resources": {"limits": {"huawei.com/Ascend910": 8}}}, "spec.resources.limits"),
    ("negative replicas", {"replicas": -1}, "spec.replicas"),
    ("unknown service type", {"service": {"type": "ExternalName"}}, "spec.service.type"),
    ("unknown backend", {"backend": "vllm"}, "spec.backend"),
    ("unknown model", {"model": "telechat2-1t"}, "spec.model"),
    ("zero batch size", {"maxBatchSize": 0}, "spec.maxBatchSize"),
    ("batch size past the maximum", {"maxBatchSize": 1025}, "spec.maxBatchSize"),
    ("batch size not an integer", {"maxBatchSize": "8"}, "spec.maxBatchSize"),
    ("batch size a boolean", {"maxBatchSize": True}, "spec.maxBatchSize"),
    ("warm-up a string", {"warmUp": "true"}, "spec.warmUp"),
    ("warm-up a number", {"warmUp": 1}, "spec.warmUp"),
]


@pytest.mark.parametrize(("case", "spec", "field"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_spec_names_the_field(case: str, spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        inference_spec(**spec)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize(
    ("name", "problem"), [("Bad_Name", "DNS label"), ("x" * 41, "at most 40"), ("9lives", "DNS label")]
)
def test_names_must_fit_group_host_names(name: str, problem: str) -> None:
    with pytest.raises(SpecError, match=problem) as info:
        parse_inference(inference_body(name=name))
    assert info.value.field == "metadata.name"


def test_lookup_is_injectable_for_models_outside_the_catalog() -> None:
    spec = parse_inference(
        inference_body(model="custom"),
        lookup=lambda model: ServingDefaults(predict_devices=16, seq_length=4096, env={}),
    )
    assert (spec.devices_per_replica, spec.seq_length, spec.env) == (16, 4096, ())
