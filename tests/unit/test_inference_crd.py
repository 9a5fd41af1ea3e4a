"""The TeleChatInference CRD agrees with the operator's constants and telechat2's configs, and documents itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from telechat_operator.common import constants as c
from telechat_operator.inference import constants as ic

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / ic.INFERENCE_CRD_FILE


def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def version() -> dict[str, Any]:
    (only,) = crd()["spec"]["versions"]
    return only


def schema() -> dict[str, Any]:
    return version()["schema"]["openAPIV3Schema"]


def spec_props() -> dict[str, Any]:
    return schema()["properties"]["spec"]["properties"]


def rules(node: dict[str, Any]) -> list[str]:
    return [rule["rule"] for rule in node.get("x-kubernetes-validations") or []]


def quoted_names(rule: str) -> list[str]:
    return re.findall(r"'([^']+)'", rule)


def test_identity_and_subresources() -> None:
    body = crd()
    assert body["metadata"]["name"] == f"{ic.INFERENCE_PLURAL}.{c.GROUP}"
    assert body["spec"]["names"]["kind"] == ic.INFERENCE_KIND
    assert body["spec"]["names"]["shortNames"] == ["tcinf"]
    assert body["spec"]["scope"] == "Namespaced"
    assert version()["name"] == c.VERSION
    assert version()["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = {col["name"]: col["jsonPath"] for col in version()["additionalPrinterColumns"]}
    assert {"Model", "Replicas", "Ready", "Endpoint", "Age"} <= set(columns)
    assert columns["Endpoint"] == ".status.endpoint"


def test_model_enum_is_telechat2s_catalog() -> None:
    from telechat2 import configs

    assert spec_props()["model"]["enum"] == configs.list_models()


def test_enums_and_defaults_match_the_operator() -> None:
    props = spec_props()
    assert tuple(props["devicesPerReplica"]["enum"]) == c.ALLOWED_DEVICES_PER_NODE
    assert props["port"]["default"] == ic.DEFAULT_PORT
    assert props["replicas"]["default"] == 1 and props["replicas"]["minimum"] == 0
    assert props["nodesPerReplica"]["default"] == 1
    assert props["backend"]["enum"] == ["telechat2", "mindie"] and props["backend"]["default"] == "telechat2"
    assert props["service"]["properties"]["type"]["enum"] == ["ClusterIP", "NodePort", "LoadBalancer"]


def test_batch_size_and_warm_up_fields() -> None:
    props = spec_props()
    batch = props["maxBatchSize"]
    assert (batch["type"], batch["format"]) == ("integer", "int32")
    assert (batch["minimum"], batch["maximum"]) == (1, ic.MAX_BATCH_SIZE)
    assert "default" not in batch, "unset means the server's own default: no flag"
    assert "8" in batch["description"] and str(ic.MINDIE_MAX_BATCH_SIZE) in batch["description"]
    warm_up = props["warmUp"]
    assert (warm_up["type"], warm_up["default"]) == ("boolean", True)
    assert "mindie" in warm_up["description"]


def test_reserved_names_match_the_operator() -> None:
    props = spec_props()
    (env_rule,) = rules(props["env"])
    assert quoted_names(env_rule) == list(ic.INFERENCE_RESERVED_ENV_NAMES)
    (volume_rule,) = rules(props["volumes"])
    assert quoted_names(volume_rule) == list(ic.RESERVED_VOLUME_NAMES)
    assert f"size(self.metadata.name) <= {ic.MAX_INFERENCE_NAME}" in rules(schema())


def test_checkpoint_is_exactly_one_of_path_or_from_finetune() -> None:
    assert rules(spec_props()["checkpoint"]) == ["has(self.path) != has(self.fromFinetune)"]


def test_every_rule_message_names_a_field() -> None:
    def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
        found = list(node.get("x-kubernetes-validations") or [])
        for child in (node.get("properties") or {}).values():
            found += walk(child)
        if isinstance(node.get("items"), dict):
            found += walk(node["items"])
        return found

    validations = walk(schema())
    assert len(validations) >= 10
    for validation in validations:
        assert re.match(r"^(spec\.|metadata\.name)", validation["message"]), validation


def test_every_field_is_described() -> None:
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if path.count(".") > 0 and not node.get("description") and path not in ("$.metadata",):
            missing.append(path)
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(schema(), "$")
    assert missing == []


def test_status_has_no_kopf_field() -> None:
    """kopf keeps its state in annotations (settings.persistence); a status.kopf would only invite writes."""
    status = schema()["properties"]["status"]
    assert "kopf" not in status["properties"]
    assert not status.get("x-kubernetes-preserve-unknown-fields")
