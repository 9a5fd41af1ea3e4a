"""Metadata shared by every child object."""

from __future__ import annotations

from typing import Any

from telechat_operator import constants as c
from telechat_operator.spec import FinetuneSpec


def job_labels(spec: FinetuneSpec) -> dict[str, str]:
    """Labels on every child: select a job's objects, and let the pod watch filter server-side."""
    return {
        c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE,
        c.LABEL_OWNER_KIND: c.FINETUNE_KIND,
        c.LABEL_JOB_NAME: spec.name,
    }


def metadata(spec: FinetuneSpec, name: str, **extra_labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": spec.namespace,
        "labels": {**job_labels(spec), **extra_labels},
        "ownerReferences": [spec.owner_reference()],
    }
