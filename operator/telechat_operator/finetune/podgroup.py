"""Volcano PodGroup: all ranks are scheduled together or not at all (gang scheduling)."""

from __future__ import annotations

from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.finetune import names
from telechat_operator.finetune.names import metadata
from telechat_operator.finetune.spec import FinetuneSpec


def build_pod_group(spec: FinetuneSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{c.VOLCANO_API_GROUP}/{c.VOLCANO_API_VERSION}",
        "kind": "PodGroup",
        "metadata": metadata(spec, names.pod_group(spec.name)),
        "spec": {
            "minMember": spec.nodes,
            "minResources": {c.ASCEND_RESOURCE: str(spec.world_size)},
        },
    }
    if spec.priority_class_name:
        body["spec"]["priorityClassName"] = spec.priority_class_name
    return body
