"""TeleChatFinetune spec parsing: defaults from the model, and every rule the operator re-checks, naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import fake_lookup, job_body, make_spec
from telechat_operator.common import constants as c
from telechat_operator.finetune.spec import SpecError, load_model_defaults, merge_env, parse


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
        # An omitted layout the model's default does not fit is completed (see test_omitted_layout_is_planned);
        # what no split of the devices can satisfy still names the field.
        (
            {"nodes": 3, "parallel": {"modelParallel": 2}},
            "spec.parallel",
            "must equal nodes x devicesPerNode = 3 x 1 = 3",
        ),
        (
            {"nodes": 4, "parallel": {"pipelineStage": 4, "microBatchNum": 4}},
            "spec.parallel.pipelineStage",
            "exceeds the model's 2 layers",
        ),
        (
            {"parallel": {"modelParallel": 3, "dataParallel": 1}, "nodes": 3},
            "spec.parallel.modelParallel",
            "must divide 2",
        ),
        ({"dataset": {"path": "/d.mindrecord", "jsonl": "/d.jsonl"}}, "spec.dataset.tokenizer", "is required"),
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


def test_omitted_layout_is_planned_for_the_node_count() -> None:
    """The fake tiny default is 1 device; on 2 nodes the operator completes the layout instead of failing."""
    spec = parse(job_body(parallel=None), fake_lookup)
    assert (spec.parallel.data_parallel, spec.parallel.model_parallel, spec.parallel.pipeline_stage) == (2, 1, 1)
    assert spec.parallel.source == "Planned"
    status = spec.parallel.status()
    assert status["source"] == "Planned" and status["dataParallel"] == 2 and status["deviceMemory"] == "64Gi"


def test_a_layout_given_in_full_is_kept_and_the_model_default_is_preferred() -> None:
    assert make_spec().parallel.source == "Spec"
    spec = make_spec(model="telechat2-7b", nodes=None, devicesPerNode=None, parallel=None)
    assert spec.parallel.source == "ModelDefault" and spec.parallel.data_parallel == 8


def test_partial_layout_is_completed_to_fit_npu_memory() -> None:
    """7B at 32k tokens does not fit 8-way data parallel (the default); tensor parallelism within the node does."""
    from telechat2 import configs, describe

    spec = make_spec(
        model="telechat2-7b",
        nodes=1,
        devicesPerNode=8,
        parallel={"dataParallel": None, "modelParallel": None, "pipelineStage": None},  # microBatchNum 1 stays
        training={"seqLength": 32768},
    )
    assert spec.parallel.source == "Planned"
    assert spec.parallel.model_parallel > 1 and spec.parallel.devices == 8
    layout = describe.Layout(
        **{**describe.dataclasses.asdict(describe.base_layout("telechat2-7b", seq_length=32768)),
           "data_parallel": spec.parallel.data_parallel, "model_parallel": spec.parallel.model_parallel}
    )  # fmt: skip
    memory = describe.estimate_memory(configs.architecture("telechat2-7b"), layout)
    assert memory.fits and spec.parallel.memory_bytes == memory.total
    default = describe.estimate_memory(
        configs.architecture("telechat2-7b"), describe.base_layout("telechat2-7b", seq_length=32768)
    )
    assert not default.fits  # the model's own layout would have run out of memory


def test_a_model_that_fits_no_layout_of_the_nodes_is_invalid_naming_the_memory() -> None:
    with pytest.raises(SpecError) as caught:
        parse(job_body(model="telechat2-115b", nodes=2, devicesPerNode=8, parallel=None))
    assert caught.value.field == "spec.parallel (model default)"
    assert "fits 64 GiB per NPU" in caught.value.message and "add nodes" in caught.value.message


def test_moe_expert_parallel_follows_data_parallel_so_the_config_renders() -> None:
    """39B-A12B's default expert_parallel 2 cannot split dataParallel 3: it is lowered (before, rendering failed)."""
    from telechat_operator.finetune.configmap import render_finetune_config

    layout = {"dataParallel": 3, "modelParallel": 8, "pipelineStage": 1, "microBatchNum": 1}
    spec = parse(job_body(model="telechat2-39b-a12b", nodes=3, devicesPerNode=8, parallel=layout))
    assert spec.parallel.expert_parallel == 1 and spec.parallel.as_config()["expert_parallel"] == 1
    assert "expert_parallel: 1" in render_finetune_config(spec)
    planned = parse(job_body(model="telechat2-39b-a12b", nodes=3, devicesPerNode=8, parallel=None))
    assert planned.parallel.devices == 24 and planned.parallel.data_parallel % planned.parallel.expert_parallel == 0
    render_finetune_config(planned)


def test_rank_and_helper_pods_get_the_models_host_requests_and_the_users_win() -> None:
    from telechat2 import configs

    spec = parse(job_body(model="telechat2-7b", nodes=1, devicesPerNode=8, parallel=None))
    defaults = configs.model_defaults("telechat2-7b")
    assert (
        spec.resources == {"requests": defaults.trainer_requests(8)} == {"requests": {"cpu": "64", "memory": "512Gi"}}
    )
    assert spec.merge_resources == {"requests": defaults.helper_requests}
    user = parse(
        job_body(
            model="telechat2-7b", nodes=1, devicesPerNode=8, parallel=None,
            resources={"requests": {"cpu": "10"}, "limits": {"memory": "100Gi"}},
            merge={"resources": {"requests": {"memory": "1Gi"}}},
        )
    )  # fmt: skip
    # cpu: the user's request; memory: the user's limit alone (a default request above it would be invalid).
    assert user.resources == {"requests": {"cpu": "10"}, "limits": {"memory": "100Gi"}}
    assert user.merge_resources == {"requests": {"cpu": defaults.helper_requests["cpu"], "memory": "1Gi"}}
    assert parse(job_body()).resources == {"requests": {"cpu": "1", "memory": "2Gi"}}
    per_device = parse(job_body(devicesPerNode=2, parallel=None)).resources  # scaled by the pod's NPUs
    assert per_device == {"requests": {"cpu": "2", "memory": "4Gi"}}


def test_initializers_default_the_converted_checkpoint_and_pack_to_the_sequence_length() -> None:
    spec = make_spec(
        dataset={"path": "/d/train.mindrecord", "jsonl": "/d/train.jsonl", "tokenizer": "/d/tokenizer.model"},
        checkpoint={"huggingface": "/models/hf"},
        training={"seqLength": 128},
    )
    init = spec.initializers
    assert init.enabled and init.dataset_jsonl == "/d/train.jsonl" and init.max_length == 128
    assert spec.load_checkpoint == "/out/run1/converted/telechat2-tiny.ckpt"
    assert make_spec(checkpoint={"huggingface": "/hf", "load": "/ck/x.ckpt"}).load_checkpoint == "/ck/x.ckpt"
    assert not make_spec().initializers.enabled
    assert make_spec(dataset={"path": "/d", "jsonl": "/j", "tokenizer": "/t"}).initializers.max_length == 64
