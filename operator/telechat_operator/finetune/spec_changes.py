"""Which edits of a running job's spec wait for the next restart (pure).

A rank pod's command, environment, volumes and rendered config are fixed when the pod is created, so an edit of a
mutable field reaches the training only when the group is next created (a retryable failure, or suspend then
resume). The status records a short hash per field for the attempt that is running (`status.podSpecHashes`); a
later spec whose hashes differ names the fields still waiting. The immutable fields (CEL `self == oldSelf` in the
CRD: model, nodes, devicesPerNode, parallel, output.path) cannot change, and runPolicy and merge act on the job
itself (suspend, deadlines and the TTL take effect at once; merge settings when the merge pod is created).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from telechat_operator.finetune.spec import FinetuneSpec

# CRD field -> FinetuneSpec attribute(s), for every mutable field a rank pod or its rendered config is built from.
POD_SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "imagePullPolicy": ("image_pull_policy",),
    "imagePullSecrets": ("image_pull_secrets",),
    "serviceAccountName": ("service_account_name",),
    "dataset": ("dataset_path",),
    "checkpoint": ("load_checkpoint",),
    "training": ("training",),
    "env": ("env",),
    "volumes": ("volumes",),
    "volumeMounts": ("volume_mounts",),
    "resources": ("resources",),
    "nodeSelector": ("node_selector",),
    "tolerations": ("tolerations",),
    "affinity": ("affinity",),
    "priorityClassName": ("priority_class_name",),
    "schedulerName": ("scheduler_name",),
    "launcher": ("master_port", "cluster_timeout"),
}


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def spec_field_hashes(spec: FinetuneSpec) -> dict[str, str]:
    """A short hash per pod-affecting field: two specs differ in a field exactly when its hashes differ."""
    hashes = {}
    for field, attributes in POD_SPEC_FIELDS.items():
        value = [_plain(getattr(spec, name)) for name in attributes]
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
        hashes[field] = hashlib.sha256(text.encode()).hexdigest()[:12]
    return hashes


def changed_fields(applied: Mapping[str, str] | None, current: Mapping[str, str]) -> list[str]:
    """`spec.<field>` names whose current value differs from what the running pods were built from."""
    if not applied:
        return []
    return [f"spec.{field}" for field, digest in current.items() if field in applied and applied[field] != digest]
