"""Headless Service: gives rank 0 the stable DNS name every rank uses as msrun's master address."""

from __future__ import annotations

from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.finetune import names
from telechat_operator.finetune.names import metadata
from telechat_operator.finetune.spec import FinetuneSpec


def build_service(spec: FinetuneSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(spec, names.service(spec.name)),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other while starting, before any readiness signal exists.
            "publishNotReadyAddresses": True,
            "selector": {c.LABEL_JOB_NAME: spec.name, c.LABEL_ROLE: c.ROLE_WORKER},
            "ports": [{"name": c.MASTER_PORT_NAME, "port": spec.master_port, "targetPort": spec.master_port}],
        },
    }
