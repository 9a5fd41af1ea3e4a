"""TeleChatFinetune spec parsing: defaults from the model, and every rule the operator re-checks, naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import fake_lookup, job_body, make_spec
from telechat_operator import constants as c
from telechat_operator.spec import SpecError, load_model_defaults, merge_env, parse


def test_defaults_come_from_the_model_when_the_spec_omits_them() -> None:
    spec = parse(job_body(model="telechat2-7b", nodes=None, devicesPerNode=None, parallel=None), fake_lookup)
    assert (spec.nodes, spec.devices_per_node, spec.world_size) == (1, 8, 8)
    assert spec.parallel.data_parallel == 8 and spec.parallel.devices == 8
    assert [e["name"] for e in spec.env] == ["ENABLE_CELL_REUSE", "GE_NOT_CUT"]
    assert spec.run_policy.restart_policy == c.RESTART_POLICY_EXIT_CODE
    assert spec.merge_enabled and spec.merge_prefix == "telechat2"


def test_partial_parallel_overrides_keep_the_model_defaults_for_the_rest() -> None:
    spec = make_spec(
        model="telechat2-7b", nodes=2, devicesPerNode=8, parallel={"dataParallel": 16, "microBatchNum": None}
    )
    assert spec.parallel.data_parallel == 16
    assert spec.parallel.micro_batch_num == 1  # from the model
    assert spec.parallel.gradient_aggregation_group == 4


def test_the_shipped_configs_give_every_model_a_fitting_default_layout() -> None:
    from telechat2 import configs

    for model in configs.list_models():
        defaults = load_model_defaults(model)
        body = job_body(model=model, nodes=None, devicesPerNode=None, parallel=None)
        spec = parse(body)
        assert spec.world_size == defaults.nodes * defaults.devices_per_node, model
        assert spec.parallel.devices == spec.world_size, model


def test_user_env_overrides_model_defaults_by_name_without_duplicates() -> None:
    env = merge_env({"A": "1", "B": "2"}, [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
    assert env == ({"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"})


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"parallel": None}, "spec.parallel (model default)", "must equal nodes x devicesPerNode = 2 x 1 = 2"),
        ({"parallel": {"dataParallel": 3}}, "spec.parallel", "= 3 must equal"),
        (
            {"nodes": 1, "parallel": {"dataParallel": 1, "pipelineStage": 1, "microBatchNum": 1}, "devicesPerNode": 1},
            None,
            None,
        ),
        (
            {"nodes": 4, "parallel": {"dataParallel": 1, "pipelineStage": 4, "microBatchNum": 2}},
            "spec.parallel.microBatchNum",
            "at least pipelineStage (4)",
        ),
        ({"devicesPerNode": 3, "parallel": {"dataParallel": 6}}, "spec.devicesPerNode", "must be one of"),
        ({"nodes": 0}, "spec.nodes", "at least 1"),
        ({"nodes": 2000}, "spec.nodes", "at most 1024"),
        ({"env": [{"name": "MS_SCHED_HOST", "value": "x"}]}, "spec.env[0].name", "reserved"),
        ({"resources": {"limits": {c.ASCEND_RESOURCE: "8"}}}, "spec.resources.limits", "use spec.devicesPerNode"),
        ({"dataset": {"path": ""}}, "spec.dataset.path", "non-empty"),
        ({"image": None}, "spec.image", "non-empty"),
        ({"runPolicy": {"restartPolicy": "Always"}}, "spec.runPolicy.restartPolicy", "must be one of"),
        ({"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit", "at least 0"),
    ],
)
def test_invalid_specs_name_the_field(overrides: dict[str, Any], field: str | None, fragment: str | None) -> None:
    body = job_body(**overrides)
    if field is None:
        parse(body, fake_lookup)
        return
    with pytest.raises(SpecError) as caught:
        parse(body, fake_lookup)
    assert caught.value.field == field
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("name", "nodes", "ok"),
    [
        ("a" * 56, 2, True),  # a...a-rank-1 is exactly 63 characters
        ("a" * 57, 2, False),
        ("a" * 55, 11, True),  # a...a-rank-10 is 63
        ("a" * 56, 11, False),
        ("Upper", 1, False),
        ("dotted.name", 1, False),
        ("9starts-with-digit", 1, False),
    ],
)
def test_job_names_must_leave_room_for_pod_host_names(name: str, nodes: int, ok: bool) -> None:
    parallel = {"dataParallel": nodes, "modelParallel": 1, "pipelineStage": 1, "microBatchNum": 1}
    body = job_body(name=name, nodes=nodes, parallel=parallel)
    if ok:
        assert parse(body, fake_lookup).name == name
    else:
        with pytest.raises(SpecError) as caught:
            parse(body, fake_lookup)
        assert caught.value.field == "metadata.name"


def test_unknown_model_is_reported_on_spec_model() -> None:
    with pytest.raises(SpecError) as caught:
        load_model_defaults("telechat2-1t")
    assert caught.value.field == "spec.model"


def test_moe_layout_shards_parameters_even_with_data_parallel_only_fields() -> None:
    spec = make_spec(model="telechat2-39b-a12b", nodes=2, devicesPerNode=8, parallel=None)
    assert spec.parallel.expert_parallel == 2 and spec.parallel.shards_parameters
    assert "expert_parallel" not in spec.parallel.as_config()
    assert not make_spec().parallel.shards_parameters
