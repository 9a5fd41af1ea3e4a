"""TeleChatInference status: conditions from observed counts, the fromFinetune gate, transition Events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from telechat_operator.inference import constants as ic
from telechat_operator.inference.spec import ResolvedCheckpoint
from telechat_operator.inference.status import (
    Gate,
    WorkloadView,
    compute_status,
    deployment_view,
    finetune_of,
    invalid_spec_status,
    resolve_finetune_checkpoint,
    transition_events,
)

from tests.unit.inference_fixtures import inference_body, inference_spec

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SELECTOR = "telechat.io/inference-name=tc7b,telechat.io/serving=true"
ENDPOINT = "http://tc7b.serving.svc:1025"


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {cond["type"]: (cond["status"], cond["reason"]) for cond in status["conditions"]}


def status_for(workload: WorkloadView, old: dict[str, Any] | None = None, now: datetime = T0) -> dict[str, Any]:
    return compute_status(
        old or {},
        generation=3,
        now=now,
        selector=SELECTOR,
        endpoint=ENDPOINT,
        checkpoint="/m/x.ckpt",
        workload=workload,
    )


@pytest.mark.parametrize(
    ("workload", "expected"),
    [
        (
            WorkloadView(desired=2, replicas=0, ready=0, updated=0, observed=False),
            {"Available": ("False", "NoReplicasAvailable"), "Progressing": ("True", "Creating"),
             "Ready": ("False", "ReplicasNotReady")},
        ),
        (
            WorkloadView(desired=2, replicas=2, ready=1, updated=2),
            {"Available": ("True", "MinimumReplicasAvailable"), "Progressing": ("True", "Creating"),
             "Ready": ("False", "ReplicasNotReady")},
        ),
        (
            WorkloadView(desired=2, replicas=2, ready=2, updated=2),
            {"Available": ("True", "MinimumReplicasAvailable"), "Progressing": ("False", "RolloutComplete"),
             "Ready": ("True", "AllReplicasReady")},
        ),
        (
            WorkloadView(desired=2, replicas=3, ready=2, updated=1),
            {"Available": ("True", "MinimumReplicasAvailable"), "Progressing": ("True", "RollingUpdate"),
             "Ready": ("False", "ReplicasNotReady")},
        ),
        (
            WorkloadView(desired=2, replicas=2, ready=2, updated=2, observed=False),
            {"Available": ("True", "MinimumReplicasAvailable"), "Progressing": ("True", "RollingUpdate"),
             "Ready": ("False", "ReplicasNotReady")},
        ),
        (
            WorkloadView(desired=1, replicas=2, ready=2, updated=2),
            {"Available": ("True", "MinimumReplicasAvailable"), "Progressing": ("True", "Scaling"),
             "Ready": ("False", "ReplicasNotReady")},
        ),
        (
            WorkloadView(desired=2, replicas=2, ready=1, updated=1, recreating=True, message="group 1: pod failed"),
            {"Available": ("True", "MinimumReplicasAvailable"), "Progressing": ("True", "RecreatingGroup"),
             "Ready": ("False", "ReplicasNotReady")},
        ),
        (
            WorkloadView(desired=0, replicas=0, ready=0, updated=0),
            {"Available": ("True", "ScaledToZero"), "Progressing": ("False", "RolloutComplete"),
             "Ready": ("True", "AllReplicasReady")},
        ),
    ],
)  # fmt: skip
def test_conditions_from_counts(workload: WorkloadView, expected: dict[str, tuple[str, str]]) -> None:
    status = status_for(workload)
    assert conditions(status) == expected
    assert (status["replicas"], status["readyReplicas"], status["updatedReplicas"]) == (
        workload.replicas,
        workload.ready,
        workload.updated,
    )
    assert status["observedGeneration"] == 3
    assert all(cond["observedGeneration"] == 3 for cond in status["conditions"])
    assert (status["selector"], status["endpoint"], status["checkpoint"]) == (SELECTOR, ENDPOINT, "/m/x.ckpt")


def test_last_transition_time_moves_only_on_a_flip() -> None:
    first = status_for(WorkloadView(1, 1, 0, 1))
    later = status_for(WorkloadView(1, 1, 0, 1), old=first, now=T0 + timedelta(minutes=1))
    assert later["conditions"] == first["conditions"]
    ready = status_for(WorkloadView(1, 1, 1, 1), old=later, now=T0 + timedelta(minutes=2))
    times = {cond["type"]: cond["lastTransitionTime"] for cond in ready["conditions"]}
    assert times["Ready"] == "2026-11-25T12:02:00Z"
    assert first["conditions"][0]["lastTransitionTime"] == "2026-11-25T12:00:00Z"  # old status left untouched


def test_group_restarts_accumulate() -> None:
    status = compute_status(
        {"groupRestarts": 2},
        generation=1,
        now=T0,
        selector=SELECTOR,
        workload=WorkloadView(1, 1, 0, 1, recreating=True),
        group_restarts=1,
    )
    assert status["groupRestarts"] == 3


@pytest.mark.parametrize(
    ("gate", "progressing"),
    [
        (Gate(ic.REASON_WAITING_FOR_FINETUNE, "waiting", True), "True"),
        (Gate("FinetuneFailed", "failed", False), "False"),
    ],
)
def test_a_gate_means_nothing_serves(gate: Gate, progressing: str) -> None:
    status = compute_status({}, generation=2, now=T0, selector=SELECTOR, gate=gate)
    assert conditions(status) == {
        "Available": ("False", gate.reason),
        "Progressing": (progressing, gate.reason),
        "Ready": ("False", gate.reason),
    }
    assert (status["replicas"], status["readyReplicas"]) == (0, 0)
    assert "endpoint" not in status


def test_invalid_spec_keeps_the_counts_and_says_why() -> None:
    old = status_for(WorkloadView(2, 2, 2, 2))
    status = invalid_spec_status(old, generation=4, now=T0, selector=SELECTOR, error="spec.maxSeqLen: too long")
    assert conditions(status)["Ready"] == ("False", "InvalidSpec")
    assert conditions(status)["Progressing"] == ("False", "InvalidSpec")
    assert status["readyReplicas"] == 2 and status["observedGeneration"] == 4
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["message"] == "spec.maxSeqLen: too long"


def test_deployment_view() -> None:
    assert deployment_view(None, 2) == WorkloadView(2, 0, 0, 0, observed=False)
    deployment = {
        "metadata": {"generation": 4},
        "status": {"observedGeneration": 4, "replicas": 3, "readyReplicas": 2, "updatedReplicas": 1},
    }
    assert deployment_view(deployment, 2) == WorkloadView(2, 3, 2, 1, observed=True)
    deployment["status"]["observedGeneration"] = 3
    assert not deployment_view(deployment, 2).observed


def test_events_tell_the_story() -> None:
    waiting = compute_status(
        {}, generation=1, now=T0, selector=SELECTOR, gate=Gate(ic.REASON_WAITING_FOR_FINETUNE, "waiting for ft", True)
    )
    creating = status_for(WorkloadView(1, 0, 0, 0, observed=False), old=waiting)
    ready = status_for(WorkloadView(1, 1, 1, 1), old=creating)
    broken = status_for(WorkloadView(1, 1, 0, 0, recreating=True, message="group 0 failed"), old=ready)
    assert [(e.type, e.reason) for e in transition_events({}, waiting)] == [("Normal", "WaitingForFinetune")]
    assert [(e.type, e.reason) for e in transition_events(waiting, creating)] == [("Normal", "Creating")]
    assert [(e.type, e.reason) for e in transition_events(creating, ready)] == [("Normal", "Ready")]
    assert ENDPOINT in transition_events(creating, ready)[0].message
    assert [(e.type, e.reason) for e in transition_events(broken, broken)] == []
    assert [(e.type, e.reason) for e in transition_events(ready, broken)] == [
        ("Warning", "RecreatingGroup"),
        ("Warning", "NotReady"),
    ]


def test_a_rollout_while_serving_is_not_a_warning() -> None:
    ready = status_for(WorkloadView(2, 2, 2, 2))
    rolling = status_for(WorkloadView(2, 3, 2, 1), old=ready)
    assert [(e.type, e.reason) for e in transition_events(ready, rolling)] == [
        ("Normal", "RollingUpdate"),
        ("Normal", "NotReady"),
    ]
    assert next(c for c in rolling["conditions"] if c["type"] == "Ready")["message"] == (
        "2/2 replica(s) ready; RollingUpdate: 1/2 replica(s) run the current spec"
    )


# --- fromFinetune ------------------------------------------------------------------------------------------------


def finetune(
    state: str = "Running", *, checkpoint: str | None = None, failed: bool = False, **spec: Any
) -> dict[str, Any]:
    conds = [{"type": "Running", "status": "True"}]
    if state == "Succeeded":
        conds.append({"type": "Succeeded", "status": "True"})
    if failed:
        conds.append({"type": "Failed", "status": "True"})
    status: dict[str, Any] = {"state": state, "conditions": conds}
    if checkpoint:
        status["checkpoint"] = checkpoint
    return {"metadata": {"name": "ft"}, "spec": spec, "status": status}


OUTPUT_SPEC = {
    "volumes": [
        {"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}},
        {"name": "out", "persistentVolumeClaim": {"claimName": "ft-output"}},
    ],
    "volumeMounts": [
        {"name": "data", "mountPath": "/data"},
        {"name": "out", "mountPath": "/data/output", "subPath": "runs"},
    ],
}
CKPT = "/data/output/merged/rank_0/telechat20.ckpt"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (None, "WaitingForFinetune"),
        (finetune("Running"), "WaitingForFinetune"),
        (finetune("Merging"), "WaitingForFinetune"),
        (finetune("Succeeded"), "WaitingForFinetune"),  # no checkpoint path yet
        (finetune("Failed", failed=True), "FinetuneFailed"),
    ],
)
def test_from_finetune_waits_until_it_succeeded_with_a_checkpoint(body: dict[str, Any] | None, reason: str) -> None:
    gate = resolve_finetune_checkpoint(inference_spec(checkpoint={"fromFinetune": "ft"}), body)
    assert isinstance(gate, Gate)
    assert gate.reason == reason
    assert gate.waiting == (reason == "WaitingForFinetune")
    assert "ft" in gate.message


def test_succeeded_finetune_is_served_with_its_output_volume_read_only() -> None:
    spec = inference_spec(checkpoint={"fromFinetune": "ft"})
    resolved = resolve_finetune_checkpoint(spec, finetune("Succeeded", checkpoint=CKPT, **OUTPUT_SPEC))
    assert isinstance(resolved, ResolvedCheckpoint)
    assert resolved.path == CKPT
    assert resolved.from_finetune == "ft"
    assert resolved.vocab_file == "/data/output/merged/rank_0/tokenizer.model"
    # The deepest mount holding the checkpoint wins, renamed and read-only, at the same path.
    assert resolved.volumes == (
        {"name": ic.FINETUNE_OUTPUT_VOLUME, "persistentVolumeClaim": {"claimName": "ft-output", "readOnly": True}},
    )
    assert resolved.volume_mounts == (
        {"name": ic.FINETUNE_OUTPUT_VOLUME, "mountPath": "/data/output", "readOnly": True, "subPath": "runs"},
    )
    assert OUTPUT_SPEC["volumes"][1]["persistentVolumeClaim"] == {"claimName": "ft-output"}  # input not modified


def test_own_mount_covering_the_checkpoint_wins_and_vocab_file_is_honoured() -> None:
    spec = inference_spec(
        checkpoint={"fromFinetune": "ft"},
        vocabFile="/tok/tokenizer.model",
        volumes=[{"name": "shared", "nfs": {"server": "nfs", "path": "/exports"}}],
        volumeMounts=[{"name": "shared", "mountPath": "/data"}],
    )
    resolved = resolve_finetune_checkpoint(spec, finetune("Succeeded", checkpoint=CKPT, **OUTPUT_SPEC))
    assert isinstance(resolved, ResolvedCheckpoint)
    assert (resolved.volumes, resolved.volume_mounts) == ((), ())
    assert resolved.vocab_file == "/tok/tokenizer.model"


def test_finetune_without_a_volume_for_the_checkpoint_adds_none() -> None:
    resolved = resolve_finetune_checkpoint(
        inference_spec(checkpoint={"fromFinetune": "ft"}), finetune("Succeeded", checkpoint="/elsewhere/x.ckpt")
    )
    assert isinstance(resolved, ResolvedCheckpoint)
    assert resolved.volumes == ()


def test_finetune_of_routes_finetune_events() -> None:
    assert finetune_of(inference_body(checkpoint={"fromFinetune": "ft"})) == "ft"
    assert finetune_of(inference_body()) is None


@pytest.mark.parametrize("state", ["Running", "Succeeded"])
def test_a_finetune_of_another_model_is_refused_not_served(state: str) -> None:
    """tcinf telechat2-35b from a telechat2-7b finetune: a condition saying so, never a workload."""
    spec = inference_spec(model="telechat2-35b", checkpoint={"fromFinetune": "ft"})
    gate = resolve_finetune_checkpoint(spec, finetune(state, checkpoint=CKPT, model="telechat2-7b", **OUTPUT_SPEC))
    assert isinstance(gate, Gate)
    assert (gate.reason, gate.waiting) == (ic.REASON_MODEL_MISMATCH, False)
    assert "telechat2-7b" in gate.message and "telechat2-35b" in gate.message and "fromFinetune" in gate.message
    status = compute_status({}, generation=3, now=T0, selector="s", gate=gate)
    assert conditions(status)["Ready"] == ("False", ic.REASON_MODEL_MISMATCH)
    assert conditions(status)["Progressing"] == ("False", ic.REASON_MODEL_MISMATCH)
    assert transition_events({}, status)[0].type == "Warning"


def test_a_finetune_of_the_same_model_is_served() -> None:
    spec = inference_spec(model="telechat2-7b", checkpoint={"fromFinetune": "ft"})
    resolved = resolve_finetune_checkpoint(spec, finetune("Succeeded", checkpoint=CKPT, model="telechat2-7b"))
    assert isinstance(resolved, ResolvedCheckpoint)
