"""The real pipeline's manifests and host stand-ins (tests/cluster/real_sample.py), without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
from telechat_operator.common import constants as c
from telechat_operator.finetune.pods import build_rank_pod
from telechat_operator.finetune.spec import parse
from telechat_operator.inference.spec import parse_inference

from tests.cluster import real_sample


def test_driver_stand_ins_cover_exactly_the_paths_the_pods_mount() -> None:
    assert tuple((path, kind) for _, path, kind in c.ASCEND_DRIVER_MOUNTS) == real_sample.DRIVER_PATHS


def test_stand_ins_are_made_only_where_missing_and_removed_deepest_first(tmp_path: Path) -> None:
    existing = tmp_path / "etc"
    existing.mkdir()
    paths = [(str(tmp_path / "usr/local/Ascend/driver"), "Directory"), (str(existing / "info"), "File")]
    made = real_sample.make_driver_stand_ins(paths)
    assert (tmp_path / "usr/local/Ascend/driver").is_dir() and (existing / "info").is_file()
    assert made == [
        tmp_path / "usr/local/Ascend/driver",
        tmp_path / "usr/local/Ascend",
        tmp_path / "usr/local",
        tmp_path / "usr",
        existing / "info",
    ]
    assert real_sample.make_driver_stand_ins(paths) == []  # present now: nothing made, nothing to remove
    real_sample.remove_stand_ins(made)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etc"] and not list(existing.iterdir())


def test_sample_finetune_parses_and_its_rank_pods_land_on_real_nodes_with_the_shared_dir(tmp_path: Path) -> None:
    body = real_sample.finetune_manifest("job", "localhost/telechat-runtime:abc", tmp_path, save_steps=5)
    body["metadata"]["namespace"] = "ns"
    spec = parse(body)
    assert (spec.nodes, spec.devices_per_node, spec.world_size) == (2, 1, 2)
    pod = build_rank_pod(spec, rank=1, attempt=2)
    assert pod["spec"]["nodeSelector"] == {"type": "real"}
    container = pod["spec"]["containers"][0]
    assert container["imagePullPolicy"] == "Never" and container["image"] == "localhost/telechat-runtime:abc"
    assert {"name": "shared", "hostPath": {"path": str(tmp_path), "type": "Directory"}} in pod["spec"]["volumes"]
    assert container["command"][-1] == "--resume"
    assert container["command"][container["command"].index("--master_addr") + 1].startswith(f"job{c.RANK_HOST_INFIX}0.")


def test_sample_inference_serves_the_finetune_with_the_datasets_tokenizer() -> None:
    body = real_sample.inference_manifest("chat", "job", "localhost/telechat-runtime:abc")
    body["metadata"]["namespace"] = "ns"
    spec = parse_inference(body)
    assert spec.from_finetune == "job"
    assert spec.vocab_file == f"{real_sample.MOUNT}/data/tokenizer.model"
    assert spec.node_selector == {"type": "real"}


def test_the_operator_values_allow_exactly_the_shared_dir_and_the_chart_passes_them_on(tmp_path: Path) -> None:
    from telechat_operator.common.settings import OperatorConfig
    from telechat_operator.common.spec import SpecError, check_host_paths

    from tests.cluster import images

    values = images.operator_chart_values("localhost/telechat-operator:abc", real_sample.operator_values([tmp_path]))
    assert values["hostPaths"] == {"allowed": [str(tmp_path)]}
    assert values["nodeSelector"]["type"] == "real" and values["image"]["pullPolicy"] == "Never"
    env = {"TELECHAT_OPERATOR_ALLOWED_HOSTPATHS": ",".join(values["hostPaths"]["allowed"])}
    allowed = OperatorConfig.from_env(env).allowed_host_paths
    body = real_sample.finetune_manifest("job", "img", tmp_path)
    check_host_paths(body["spec"]["volumes"], allowed)  # admitted
    with pytest.raises(SpecError):
        check_host_paths(real_sample.finetune_manifest("job", "img", tmp_path.parent)["spec"]["volumes"], allowed)
