"""The Argo CD health checks in charts/argocd-health, run in Lua 5.1 (the dialect of Argo CD's gopher-lua).

Each case is a TeleChatFinetune or TeleChatInference as the operator leaves it, and the health Argo CD must show:
Progressing until the operator has observed the current generation and the workload is Ready (inference) or
Succeeded (finetune), Degraded on failure, Suspended for a suspended finetune, Progressing with no status at all.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

REPO = Path(__file__).resolve().parents[2]
HEALTH_DIR = REPO / "charts" / "argocd-health" / "telechat.io"


def load_sync_module() -> Any:
    spec = importlib.util.spec_from_file_location("charts_sync", REPO / "charts" / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def as_argo_value(value: Any) -> Any:
    """Argo CD hands Lua the object decoded from JSON: every number is a float."""
    if isinstance(value, dict):
        return {key: as_argo_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_argo_value(item) for item in value]
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    return float(value)


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """Run `<kind>/health.lua` the way Argo CD does: a chunk with the object in the global `obj`."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(as_argo_value(obj), recursive=True)
    result = runtime.execute((HEALTH_DIR / kind / "health.lua").read_text())
    assert result is not None, f"{kind}/health.lua returned nothing"
    assert result["status"] in ("Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown")
    return result["status"], result["message"] or ""


def condition(kind: str, status: str, reason: str, generation: int = 1, message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def finetune(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "telechat.io/v1alpha1",
        "kind": "TeleChatFinetune",
        "metadata": {"name": "ft", "namespace": "default", "generation": generation},
        "spec": {"model": "telechat2-tiny", "nodes": 2},
    }
    if status is not None:
        obj["status"] = status
    return obj


def inference(status: dict[str, Any] | None, generation: int = 1, replicas: int = 2) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "telechat.io/v1alpha1",
        "kind": "TeleChatInference",
        "metadata": {"name": "tc7b", "namespace": "default", "generation": generation},
        "spec": {"model": "telechat2-7b", "replicas": replicas},
    }
    if status is not None:
        obj["status"] = status
    return obj


# --- TeleChatFinetune ----------------------------------------------------------------------------------------


def test_finetune_without_status_is_progressing() -> None:
    assert health("TeleChatFinetune", finetune(None))[0] == "Progressing"
    assert health("TeleChatFinetune", finetune({}))[0] == "Progressing"


def test_running_finetune_is_progressing_like_a_running_job() -> None:
    status = {
        "state": "Running",
        "conditions": [
            condition("Created", "True", "PodsCreated"),
            condition("Running", "True", "AllRanksRunning", message="2/2 rank pods running"),
        ],
    }
    state, message = health("TeleChatFinetune", finetune(status))
    assert state == "Progressing"
    assert "AllRanksRunning" in message and "2/2" in message


@pytest.mark.parametrize("phase", ["Created", "Restarting", "Merging"])
def test_finetune_phases_before_success_are_progressing(phase: str) -> None:
    status = {"state": phase, "conditions": [condition(phase, "True", f"{phase}Reason")]}
    state, message = health("TeleChatFinetune", finetune(status))
    assert (state, message) == ("Progressing", f"{phase}Reason")


def test_a_stalled_finetune_is_progressing_and_says_why() -> None:
    stuck = "rank 0 pod ft-a1-rank-0 is Pending: Unschedulable: 0/4 nodes are available"
    stalled = condition("Stalled", "True", "Unschedulable", message=stuck)
    conditions = [condition("Created", "True", "PodsCreated"), stalled]
    state, message = health("TeleChatFinetune", finetune({"state": "Pending", "conditions": conditions}))
    assert (state, message) == ("Progressing", f"Unschedulable: {stuck}")
    cleared = [conditions[0], condition("Stalled", "False", "AllRanksRunning"), condition("Running", "True", "Up")]
    assert health("TeleChatFinetune", finetune({"state": "Running", "conditions": cleared})) == ("Progressing", "Up")


def test_succeeded_finetune_is_healthy_and_names_the_checkpoint() -> None:
    status = {
        "state": "Succeeded",
        "checkpoint": "/out/merged/telechat2.ckpt",
        "conditions": [
            condition("Running", "False", "AllRanksSucceeded"),
            condition("Merging", "False", "MergeSucceeded"),
            condition("Succeeded", "True", "CheckpointMerged"),
        ],
    }
    state, message = health("TeleChatFinetune", finetune(status))
    assert state == "Healthy"
    assert "/out/merged/telechat2.ckpt" in message


@pytest.mark.parametrize("reason", ["BackoffLimitExceeded", "DeadlineExceeded", "MergeFailed", "NonRetryableExitCode"])
def test_failed_finetune_is_degraded_with_the_reason(reason: str) -> None:
    status = {
        "state": "Failed",
        "conditions": [condition("Running", "False", "PodFailed"), condition("Failed", "True", reason, message="x")],
    }
    assert health("TeleChatFinetune", finetune(status)) == ("Degraded", f"{reason}: x")


def test_suspended_finetune_is_suspended() -> None:
    status = {"state": "Suspended", "conditions": [condition("Suspended", "True", "JobSuspended")]}
    assert health("TeleChatFinetune", finetune(status))[0] == "Suspended"


def test_resumed_finetune_is_progressing_again() -> None:
    status = {
        "state": "Running",
        "conditions": [condition("Suspended", "False", "JobResumed", 2), condition("Running", "True", "Running", 2)],
    }
    assert health("TeleChatFinetune", finetune(status, generation=2))[0] == "Progressing"


def test_finetune_status_of_an_older_generation_is_progressing_even_if_it_said_succeeded() -> None:
    status = {"state": "Succeeded", "conditions": [condition("Succeeded", "True", "CheckpointMerged", 1)]}
    state, message = health("TeleChatFinetune", finetune(status, generation=2))
    assert state == "Progressing"
    assert "generation 2" in message
    status_with_top_level = {**status, "observedGeneration": 2}
    assert health("TeleChatFinetune", finetune(status_with_top_level, generation=2))[0] == "Healthy"


def test_finetune_state_alone_is_read_when_conditions_are_absent() -> None:
    assert health("TeleChatFinetune", finetune({"state": "Failed", "observedGeneration": 1}))[0] == "Degraded"
    assert health("TeleChatFinetune", finetune({"state": "Succeeded", "observedGeneration": 1}))[0] == "Healthy"


# --- TeleChatInference ---------------------------------------------------------------------------------------


def ready_inference_status(generation: int = 1, ready: int = 2) -> dict[str, Any]:
    return {
        "observedGeneration": generation,
        "replicas": 2,
        "readyReplicas": ready,
        "endpoint": "http://tc7b.default.svc:1025",
        "conditions": [
            condition("Available", "True", "MinimumReplicasAvailable", generation),
            condition("Progressing", "True", "RolloutComplete", generation),
            condition("Ready", "True", "AllReplicasReady", generation),
        ],
    }


def test_inference_without_status_is_progressing() -> None:
    assert health("TeleChatInference", inference(None))[0] == "Progressing"
    assert health("TeleChatInference", inference({}))[0] == "Progressing"


def test_ready_inference_is_healthy_with_its_endpoint() -> None:
    state, message = health("TeleChatInference", inference(ready_inference_status()))
    assert state == "Healthy"
    assert "2 ready" in message and "http://tc7b.default.svc:1025" in message


def test_inference_with_stale_observed_generation_is_progressing() -> None:
    obj = inference(ready_inference_status(generation=1), generation=2)
    state, message = health("TeleChatInference", obj)
    assert state == "Progressing" and "generation 2" in message


def test_inference_whose_ready_condition_is_stale_is_progressing() -> None:
    status = ready_inference_status(generation=2)
    status["conditions"][2]["observedGeneration"] = 1
    assert health("TeleChatInference", inference(status, generation=2))[0] == "Progressing"


def test_inference_loading_its_model_is_progressing() -> None:
    status = {
        "observedGeneration": 1,
        "replicas": 2,
        "readyReplicas": 0,
        "conditions": [
            condition("Available", "False", "NoReplicasAvailable"),
            condition("Progressing", "True", "Creating"),
            condition("Ready", "False", "ReplicasNotReady", message="0/2 replicas ready"),
        ],
    }
    state, message = health("TeleChatInference", inference(status))
    assert state == "Progressing" and "0/2" in message


def test_inference_rolling_update_is_progressing_even_while_ready() -> None:
    status = ready_inference_status(generation=3)
    status["conditions"][1] = condition("Progressing", "True", "RollingUpdate", 3, "1/2 replicas updated")
    assert health("TeleChatInference", inference(status, generation=3)) == (
        "Progressing",
        "RollingUpdate: 1/2 replicas updated",
    )


@pytest.mark.parametrize("reason", ["InvalidSpec", "FinetuneFailed", "ModelMismatch", "ProgressDeadlineExceeded"])
def test_inference_failure_is_degraded(reason: str) -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [
            condition("Available", "False", "NoReplicasAvailable"),
            condition("Progressing", "False", reason, message="cannot continue"),
            condition("Ready", "False", reason, message="cannot continue"),
        ],
    }
    assert health("TeleChatInference", inference(status)) == ("Degraded", f"{reason}: cannot continue")


def test_inference_not_available_and_not_progressing_is_degraded() -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [
            condition("Available", "False", "NoReplicasAvailable"),
            condition("Progressing", "False", "Stalled"),
            condition("Ready", "False", "ReplicasNotReady"),
        ],
    }
    assert health("TeleChatInference", inference(status))[0] == "Degraded"


def test_inference_waiting_for_its_finetune_is_progressing() -> None:
    status = {
        "observedGeneration": 1,
        "conditions": [
            condition("Available", "False", "WaitingForFinetune"),
            condition("Progressing", "True", "WaitingForFinetune", message="ft is Running"),
            condition("Ready", "False", "WaitingForFinetune"),
        ],
    }
    assert health("TeleChatInference", inference(status))[0] == "Progressing"


def test_inference_scaled_to_zero_is_healthy() -> None:
    status = {
        "observedGeneration": 1,
        "replicas": 0,
        "readyReplicas": 0,
        "conditions": [
            condition("Available", "True", "ScaledToZero"),
            condition("Progressing", "True", "ScaledToZero"),
            condition("Ready", "True", "ScaledToZero"),
        ],
    }
    assert health("TeleChatInference", inference(status, replicas=0))[0] == "Healthy"


# --- Shipping ------------------------------------------------------------------------------------------------


def test_argocd_cm_patch_embeds_both_scripts_verbatim() -> None:
    """The ready-to-apply argocd-cm patch is generated from the scripts (python charts/sync.py) and in sync."""
    sync = load_sync_module()
    patch_path = REPO / "charts" / "argocd-health" / "argocd-cm-patch.yaml"
    assert patch_path.read_bytes() == sync.render_argocd_patch(), "run python charts/sync.py"
    data = yaml.safe_load(patch_path.read_text())["data"]
    for kind in ("TeleChatFinetune", "TeleChatInference"):
        assert (
            data[f"resource.customizations.health.telechat.io_{kind}"] == (HEALTH_DIR / kind / "health.lua").read_text()
        )


def test_readme_shows_the_argocd_cm_keys() -> None:
    readme = (REPO / "charts" / "argocd-health" / "README.md").read_text()
    for kind in ("TeleChatFinetune", "TeleChatInference"):
        assert f"resource.customizations.health.telechat.io_{kind}" in readme


# --- Contract with the operator: statuses computed by its own (pure) status code -----------------------------


def finetune_run(status: dict[str, Any], pods: list[Any], seconds: float = 0, **spec: Any) -> dict[str, Any]:
    """One pass of the finetune state machine; returns the new status."""
    from datetime import timedelta

    from operator_factories import NOW, make_spec
    from telechat_operator.common.conditions import Backoff
    from telechat_operator.finetune.status import reconcile

    return reconcile(make_spec(**spec), status, pods, NOW + timedelta(seconds=seconds), Backoff(1, 4)).status


def test_health_of_finetune_statuses_the_operator_computes() -> None:
    from operator_factories import merge_pod, worker

    def check(status: dict[str, Any]) -> str:
        return health("TeleChatFinetune", finetune(status))[0]

    status = finetune_run({}, [])
    assert check(status) == "Progressing"
    status = finetune_run(status, [worker(0, phase="Pending"), worker(1, phase="Pending")])
    status = finetune_run(status, [worker(0), worker(1)], seconds=5)
    assert status["state"] == "Running" and check(status) == "Progressing"
    status = finetune_run(status, [worker(0, phase="Succeeded"), worker(1, phase="Succeeded")], seconds=10)
    assert status["state"] == "Merging" and check(status) == "Progressing"
    done = [worker(0, phase="Succeeded"), worker(1, phase="Succeeded"), merge_pod(phase="Succeeded")]
    status = finetune_run(status, done, seconds=20)
    assert status["state"] == "Succeeded" and check(status) == "Healthy"

    failed = finetune_run(
        finetune_run(finetune_run({}, []), [worker(0, phase="Pending"), worker(1, phase="Pending")]),
        [worker(0), worker(1, phase="Failed", exit_code=1)],
        seconds=5,
    )
    assert failed["state"] == "Failed" and check(failed) == "Degraded"

    suspended = finetune_run(finetune_run({}, []), [], seconds=1, runPolicy={"suspend": True})
    assert suspended["state"] == "Suspended" and check(suspended) == "Suspended"


def test_health_of_inference_statuses_the_operator_computes() -> None:
    from datetime import UTC, datetime

    from telechat_operator.inference.status import Gate, WorkloadView, compute_status

    def status_for(workload: WorkloadView | None = None, gate: Gate | None = None) -> dict[str, Any]:
        now = datetime(2026, 1, 1, tzinfo=UTC)
        return compute_status(
            {}, generation=1, now=now, selector="s", endpoint="http://x", workload=workload, gate=gate
        )

    def check(status: dict[str, Any]) -> str:
        return health("TeleChatInference", inference(status))[0]

    assert check(status_for(WorkloadView(desired=2, replicas=2, ready=2, updated=2))) == "Healthy"
    assert check(status_for(WorkloadView(desired=2, replicas=0, ready=0, updated=0, observed=False))) == "Progressing"
    assert check(status_for(WorkloadView(desired=2, replicas=2, ready=2, updated=1))) == "Progressing"
    assert check(status_for(WorkloadView(desired=3, replicas=2, ready=2, updated=2))) == "Progressing"
    assert check(status_for(WorkloadView(desired=0, replicas=0, ready=0, updated=0))) == "Healthy"
    assert check(status_for(gate=Gate("WaitingForFinetune", "ft is Running", waiting=True))) == "Progressing"
    assert check(status_for(gate=Gate("FinetuneFailed", "ft failed", waiting=False))) == "Degraded"
    assert check(status_for(gate=Gate("InvalidSpec", "spec.port: bad", waiting=False))) == "Degraded"
