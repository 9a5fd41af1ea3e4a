"""The CRD YAML agrees with the operator's constants and the shipped configs, and documents every field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from telechat_operator.common import constants as c

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "telechat.io_telechatfinetunes.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_identity(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == f"{c.FINETUNE_PLURAL}.{c.GROUP}"
    assert crd["spec"]["group"] == c.GROUP and crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == c.FINETUNE_KIND and "tcft" in crd["spec"]["names"]["shortNames"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == c.VERSION and version["subresources"] == {"status": {}}
    columns = [col["name"] for col in version["additionalPrinterColumns"] if col.get("priority", 0) == 0]
    # Step, Loss and ETA (issue 10 item 8: training progress) sit between Restarts and Age.
    assert columns == ["Model", "Nodes", "NPUs", "State", "Restarts", "Step", "Loss", "ETA", "Age"]
    paths = {col["name"]: (col["type"], col["jsonPath"]) for col in version["additionalPrinterColumns"]}
    assert paths["Step"] == ("integer", ".status.progress.step")
    assert paths["Loss"] == ("number", ".status.progress.loss")
    assert paths["ETA"] == ("string", ".status.progress.eta")


def test_model_enum_is_the_shipped_model_list(schema: dict[str, Any]) -> None:
    from telechat2 import configs

    assert schema["properties"]["spec"]["properties"]["model"]["enum"] == configs.list_models()
    assert "telechat2-tiny-moe" in configs.list_models()


def test_enums_and_defaults_match_the_constants(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert tuple(spec["devicesPerNode"]["enum"]) == c.ALLOWED_DEVICES_PER_NODE
    assert spec["nodes"]["maximum"] == c.MAX_NODES
    policy = spec["runPolicy"]["properties"]
    assert tuple(policy["restartPolicy"]["enum"]) == c.RESTART_POLICIES
    assert policy["restartPolicy"]["default"] == c.RESTART_POLICY_EXIT_CODE
    assert policy["backoffLimit"]["default"] == c.DEFAULT_BACKOFF_LIMIT
    assert spec["launcher"]["properties"]["masterPort"]["default"] == c.DEFAULT_MASTER_PORT
    assert spec["launcher"]["properties"]["clusterTimeout"]["default"] == c.DEFAULT_CLUSTER_TIMEOUT
    assert spec["merge"]["properties"]["prefix"]["default"] == c.DEFAULT_MERGE_PREFIX
    assert spec["merge"]["properties"]["enabled"]["default"] is True
    status = schema["properties"]["status"]["properties"]
    assert set(status["state"]["enum"]) == {
        c.STATE_PENDING, c.STATE_RUNNING, c.STATE_RESTARTING, c.STATE_MERGING,
        c.STATE_SUCCEEDED, c.STATE_FAILED, c.STATE_SUSPENDED, c.STATE_INITIALIZING,
    }  # fmt: skip


def test_reserved_env_names_in_cel_are_the_operators(schema: dict[str, Any]) -> None:
    (rule,) = schema["properties"]["spec"]["properties"]["env"]["x-kubernetes-validations"]
    assert tuple(re.findall(r"'([A-Z_]+)'", rule["rule"])) == c.RESERVED_ENV_NAMES


def test_reserved_volume_names_and_mount_paths_are_the_builders(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    (volume_rule,) = spec["volumes"]["x-kubernetes-validations"]
    own_volumes = {c.CONFIG_VOLUME, c.SHM_VOLUME, *(name for name, _, _ in c.ASCEND_DRIVER_MOUNTS)}
    assert set(re.findall(r"'([a-z-]+)'", volume_rule["rule"])) == own_volumes
    (mount_rule,) = spec["volumeMounts"]["x-kubernetes-validations"]
    own_paths = {c.CONFIG_MOUNT_DIR, c.SHM_MOUNT_PATH, *(path for _, path, _ in c.ASCEND_DRIVER_MOUNTS)}
    assert set(re.findall(r"'(/[^']+)'", mount_rule["rule"])) == own_paths


def test_name_length_rule_matches_the_operator_limit(schema: dict[str, Any]) -> None:
    rules = " ".join(rule["rule"] for rule in schema["x-kubernetes-validations"])
    assert f"<= {c.DNS_LABEL_MAX}" in rules and f"size(self.metadata.name) <= {c.MAX_JOB_NAME}" in rules
    assert len(c.RANK_HOST_INFIX) == 6 and "+ 6 +" in rules


def _undocumented(node: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, child in (node.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        if name not in ("apiVersion", "kind", "metadata") and not child.get("description"):
            missing.append(child_path)
        missing += _undocumented(child, child_path)
        if "items" in child:
            missing += _undocumented(child["items"], child_path + "[]")
    return missing


def test_every_field_has_a_description_for_kubectl_explain(schema: dict[str, Any]) -> None:
    assert schema["description"]
    assert _undocumented(schema, "") == []


def test_status_has_no_kopf_field(schema: dict[str, Any]) -> None:
    """kopf keeps its (little) state in annotations (settings.persistence), never in status: the schema says so."""
    status = schema["properties"]["status"]
    assert "kopf" not in status["properties"]
    assert not status.get("x-kubernetes-preserve-unknown-fields")


def test_sample_job_is_a_valid_finetune() -> None:
    from telechat_operator.finetune.spec import parse

    sample = Path(__file__).resolve().parents[2] / "operator" / "deploy" / "samples" / "telechatfinetune-tiny.yaml"
    body = yaml.safe_load(sample.read_text())
    body["metadata"].update(namespace="default", uid="u", generation=1)
    spec = parse(body)
    assert (spec.model, spec.nodes, spec.devices_per_node) == ("telechat2-tiny", 2, 1)


def test_the_status_schema_keeps_every_field_the_state_machine_writes(schema: dict[str, Any]) -> None:
    """A field missing from the schema would be pruned by the apiserver: progress, podSpecHashes."""
    status = schema["properties"]["status"]["properties"]
    progress = status["progress"]["properties"]
    for field in ("step", "totalSteps", "loss", "tokensPerSecond", "stepSeconds", "eta", "etaSeconds", "updateTime"):
        assert field in progress, field
    assert set(progress["checkpoint"]["properties"]) == {"step", "ranks", "newer"}
    assert status["podSpecHashes"]["additionalProperties"] == {"type": "string"}


def test_generated_blocks_are_current_with_the_configs() -> None:
    """The CEL layout rules and the resources description come from telechat2/configs (crd_rules.py)."""
    from telechat_operator import crd_rules

    text = CRD_PATH.read_text()
    assert "# BEGIN generated: layout-rules" in text and "# BEGIN generated: resources-description" in text
    assert crd_rules.regenerate(text) == text, "run: python -m telechat_operator.crd_rules"
    assert crd_rules.main(["--check"]) == 0


def _cel_map(rule: str) -> dict[str, int]:
    (literal,) = re.findall(r"\{([^}]*)\}\[self\.model\]", rule)
    return {model: int(value) for model, value in re.findall(r"'([a-z0-9-]+)': (\d+)", literal)}


def test_cel_layout_rules_agree_with_the_model_configs(schema: dict[str, Any]) -> None:
    """Read back from the CRD (not from the generator): every model's layers and heads, per the configs."""
    from telechat2 import configs

    rules = {r.get("fieldPath"): r for r in schema["properties"]["spec"]["x-kubernetes-validations"]}
    layers = _cel_map(rules[".parallel.pipelineStage"]["rule"])
    divisors = _cel_map(rules[".parallel.modelParallel"]["rule"])
    assert list(layers) == list(divisors) == configs.list_models()
    for model in configs.list_models():
        arch = configs.architecture(model)
        assert layers[model] == arch.num_layers, model
        valid = [mp for mp in range(1, 65) if divisors[model] % mp == 0]
        expected = [
            mp for mp in range(1, 65)
            if not (arch.num_heads % mp or arch.n_kv_heads % mp or arch.intermediate_size % mp or arch.vocab_size % mp)
        ]  # fmt: skip
        assert valid == expected, model
    assert "spec.parallel.pipelineStage" in rules[".parallel.pipelineStage"]["message"]


def test_resources_description_lists_every_models_default_requests(schema: dict[str, Any]) -> None:
    from telechat2 import configs

    text = schema["properties"]["spec"]["properties"]["resources"]["description"]
    for model in configs.list_models():
        requests = configs.model_defaults(model).trainer_requests_per_device
        assert f"{model} {requests['cpu']} CPU and {requests['memory']} per NPU" in text


def test_status_layout_sources_match_the_planner(schema: dict[str, Any]) -> None:
    from telechat2 import describe

    layout = schema["properties"]["status"]["properties"]["layout"]["properties"]
    assert tuple(layout["source"]["enum"]) == describe.LAYOUT_SOURCES
