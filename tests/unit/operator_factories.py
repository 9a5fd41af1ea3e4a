"""Fluent fixtures for the operator's unit tests: TeleChatFinetune bodies and pod views, minimal by default."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.finetune.spec import FinetuneSpec, ModelDefaults, parse
from telechat_operator.finetune.status import PodView

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

# A stand-in defaults table so spec tests do not depend on the shipped configs' exact numbers.
FAKE_DEFAULTS = {
    "telechat2-tiny": ModelDefaults(
        nodes=1,
        devices_per_node=1,
        parallel={
            "data_parallel": 1,
            "model_parallel": 1,
            "pipeline_stage": 1,
            "micro_batch_num": 1,
            "vocab_emb_dp": True,
            "gradient_aggregation_group": 4,
        },
        env={},
        num_layers=2,
        model_parallel_divisor=2,
    ),
    "telechat2-7b": ModelDefaults(
        nodes=1,
        devices_per_node=8,
        parallel={
            "data_parallel": 8,
            "model_parallel": 1,
            "pipeline_stage": 1,
            "micro_batch_num": 1,
            "vocab_emb_dp": True,
            "gradient_aggregation_group": 4,
        },
        env={"ENABLE_CELL_REUSE": "1", "GE_NOT_CUT": "1"},
        num_layers=30,
        model_parallel_divisor=32,
    ),
    "telechat2-39b-a12b": ModelDefaults(
        nodes=2,
        devices_per_node=8,
        parallel={
            "data_parallel": 2,
            "model_parallel": 4,
            "pipeline_stage": 2,
            "micro_batch_num": 4,
            "vocab_emb_dp": False,
            "gradient_aggregation_group": 4,
            "expert_parallel": 2,
        },
        env={},
        num_layers=30,
        model_parallel_divisor=32,
    ),
}


def fake_lookup(model: str) -> ModelDefaults:
    return FAKE_DEFAULTS[model]


def job_body(name: str = "ft", namespace: str = "ns", generation: int = 1, **spec: Any) -> dict[str, Any]:
    """A TeleChatFinetune as the apiserver stores it (with the CRD's defaults applied)."""
    base: dict[str, Any] = {
        "model": "telechat2-tiny",
        "image": "telechat-runtime:test",
        "nodes": 2,
        "devicesPerNode": 1,
        "parallel": {"dataParallel": 2, "modelParallel": 1, "pipelineStage": 1, "microBatchNum": 1},
        "dataset": {"path": "/data/train.mindrecord"},
        "output": {"path": "/out/run1"},
        "launcher": {"masterPort": 8118, "clusterTimeout": 300},
        "runPolicy": {"backoffLimit": 3, "restartPolicy": "ExitCode", "suspend": False},
        "merge": {"enabled": True, "prefix": "telechat2"},
    }
    for key, value in spec.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merged = {**base[key], **value}
            base[key] = {k: v for k, v in merged.items() if v is not None}
        else:
            base[key] = copy.deepcopy(value)
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.FINETUNE_KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": "uid-1", "generation": generation},
        "spec": base,
    }


def make_spec(**spec: Any) -> FinetuneSpec:
    name = spec.pop("name", "ft")
    return parse(job_body(name=name, **spec), fake_lookup)


def worker(rank: int, attempt: int = 1, phase: str = "Running", job: str = "ft", **extra: Any) -> PodView:
    return PodView(
        name=f"{job}-a{attempt}-rank-{rank}", role=c.ROLE_WORKER, attempt=attempt, rank=rank, phase=phase, **extra
    )


def init_pod(phase: str = "Running", job: str = "ft", **extra: Any) -> PodView:
    return PodView(name=f"{job}-init", role=c.ROLE_INITIALIZER, attempt=1, rank=None, phase=phase, **extra)


def merge_pod(index: int = 1, phase: str = "Running", job: str = "ft", **extra: Any) -> PodView:
    return PodView(name=f"{job}-merge-{index}", role=c.ROLE_MERGE, attempt=index, rank=None, phase=phase, **extra)
