"""Deferred edits (issue 10 item 6): every spec field of the CRD is classified, and the docs list the immutable ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from operator_factories import make_spec
from telechat_operator.finetune.spec_changes import POD_SPEC_FIELDS, changed_fields, spec_field_hashes

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "telechat.io_telechatfinetunes.yaml"
# Fields that act on the job itself (suspend, deadlines, TTL, restart policy; the merge pod is built when merging).
JOB_LEVEL_FIELDS = {"runPolicy", "merge", "initializer"}  # merge and init pods take settings when created


def immutable_fields(node: dict[str, Any], path: str) -> list[str]:
    """`spec.x.y` for every schema node with the CEL rule `self == oldSelf`, read from the CRD."""
    found = []
    if any(rule.get("rule") == "self == oldSelf" for rule in node.get("x-kubernetes-validations") or []):
        found.append(path)
    for name, child in (node.get("properties") or {}).items():
        found += immutable_fields(child, f"{path}.{name}")
    return found


def spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_every_spec_field_is_immutable_deferred_or_job_level() -> None:
    schema = spec_schema()
    immutable = immutable_fields(schema, "spec")
    assert immutable == ["spec.model", "spec.nodes", "spec.devicesPerNode", "spec.parallel", "spec.output.path"]
    top_immutable = {path.split(".")[1] for path in immutable if path.count(".") == 1}
    for field in schema["properties"]:
        kinds = [field in top_immutable, field in POD_SPEC_FIELDS, field in JOB_LEVEL_FIELDS, field == "output"]
        assert sum(kinds) == 1, f"spec.{field}: classify it in telechat_operator.finetune.spec_changes.POD_SPEC_FIELDS"


def test_the_docs_note_lists_every_immutable_field() -> None:
    note = (REPO / "docs" / "finetune.md").read_text()
    for path in immutable_fields(spec_schema(), "spec"):
        assert f"`{path}`" in note, path


def test_field_hashes_change_exactly_with_the_field() -> None:
    base = spec_field_hashes(make_spec())
    assert base == spec_field_hashes(make_spec())
    edited = spec_field_hashes(make_spec(training={"learningRate": 1e-4}, launcher={"clusterTimeout": 600}))
    assert changed_fields(base, edited) == ["spec.training", "spec.launcher"]
    assert changed_fields(base, spec_field_hashes(make_spec(runPolicy={"suspend": True}))) == []
    assert changed_fields(None, edited) == []  # a job from before hashes were recorded: nothing to say
