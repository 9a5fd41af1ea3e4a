"""Deterministic child names and labels: the same job, rank and attempt always give the same name.

That is what makes the operator idempotent: a restarted operator re-creating attempt 2's rank 0 gets a 409,
not a second pod.
"""

from __future__ import annotations

from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.objects import child_labels, child_metadata
from telechat_operator.finetune.spec import FinetuneSpec


def config_map(job: str) -> str:
    return f"{job}-config"


def service(job: str) -> str:
    """Headless Service giving every rank a DNS name `<host>.<service>.<ns>.svc`."""
    return f"{job}-ranks"


def rank_host(job: str, rank: int) -> str:
    """Pod host name: stable across attempts so the master address never changes."""
    return f"{job}{c.RANK_HOST_INFIX}{rank}"


def rank_pod(job: str, attempt: int, rank: int) -> str:
    return f"{job}-a{attempt}{c.RANK_HOST_INFIX}{rank}"


def merge_pod(job: str, merge_attempt: int) -> str:
    return f"{job}-merge-{merge_attempt}"


def init_pod(job: str) -> str:
    """One initializer pod per job: its commands skip work whose output is already complete."""
    return f"{job}-init"


def pod_group(job: str) -> str:
    return job


def master_address(job: str, namespace: str) -> str:
    """Rank 0's fully qualified DNS name, resolvable from every rank through the headless Service."""
    return f"{rank_host(job, 0)}.{service(job)}.{namespace}.svc"


def job_labels(spec: FinetuneSpec) -> dict[str, str]:
    """Labels on every child: select a job's objects, and let the pod watch filter server-side."""
    return child_labels(c.FINETUNE_KIND, c.LABEL_JOB_NAME, spec.name)


def metadata(spec: FinetuneSpec, name: str, **extra_labels: str) -> dict[str, Any]:
    return child_metadata(spec.namespace, name, {**job_labels(spec), **extra_labels}, spec.owner_reference())
