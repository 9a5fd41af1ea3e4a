"""Multi-node replicas: group pods (leader + workers under msrun) and the planner that recreates groups whole."""

from __future__ import annotations

import dataclasses

import pytest
from telechat_operator.common import constants as c
from telechat_operator.inference import constants as ic
from telechat_operator.inference.groups import (
    GroupPod,
    build_group_pod,
    build_group_service,
    group_template_hash,
    leader_address,
    plan_groups,
)
from telechat_operator.inference.spec import InferenceSpec

from tests.unit.inference_fixtures import inference_spec, path_checkpoint

HASH = "current"


def spec(replicas: int = 2, nodes: int = 2) -> InferenceSpec:
    return inference_spec(replicas=replicas, devicesPerReplica=8, nodesPerReplica=nodes)


def command_args(pod: dict) -> dict[str, str]:
    command = pod["spec"]["containers"][0]["command"]
    head = command[: command.index("--")]
    return dict(zip(head[2::2], head[3::2], strict=True))


def test_group_pods_form_one_msrun_job_around_the_leader() -> None:
    s = spec()
    leader = build_group_pod(s, path_checkpoint(), 1, 0, "cfg")
    worker = build_group_pod(s, path_checkpoint(), 1, 1, "cfg")
    assert leader["metadata"]["name"] == leader["spec"]["hostname"] == "tc7b-g1-0"
    assert worker["metadata"]["name"] == "tc7b-g1-1"
    assert leader["spec"]["subdomain"] == worker["spec"]["subdomain"] == "tc7b-g1"
    assert leader_address(s, 1) == "tc7b-g1-0.tc7b-g1.serving.svc"
    for rank, pod in enumerate((leader, worker)):
        args = command_args(pod)
        assert args["--master_addr"] == leader_address(s, 1)
        assert (args["--worker_num"], args["--local_worker_num"], args["--node_rank"]) == ("16", "8", str(rank))
        assert pod["spec"]["restartPolicy"] == "Never"  # the group restarts, not the kubelet
        assert pod["spec"]["containers"][0]["resources"]["limits"][c.ASCEND_RESOURCE] == "8"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env[c.ENV_NODE_RANK] == str(rank) and env[ic.ENV_GROUP_SIZE] == "2" and env[ic.ENV_GROUP_INDEX] == "1"
    # Only the leader serves HTTP: it alone is selected by the Service and probed.
    assert leader["metadata"]["labels"][ic.LABEL_SERVING] == "true"
    assert ic.LABEL_SERVING not in worker["metadata"]["labels"]
    assert "readinessProbe" in leader["spec"]["containers"][0]
    assert "readinessProbe" not in worker["spec"]["containers"][0]
    assert (leader["metadata"]["labels"][c.LABEL_ROLE], worker["metadata"]["labels"][c.LABEL_ROLE]) == (
        ic.ROLE_LEADER,
        ic.ROLE_GROUP_WORKER,
    )


def test_template_hash_is_per_spec_not_per_group() -> None:
    s = spec()
    hashes = {
        build_group_pod(s, path_checkpoint(), g, r, "cfg")["metadata"]["labels"][ic.LABEL_TEMPLATE_HASH]
        for g in range(3)
        for r in range(2)
    }
    assert hashes == {group_template_hash(s, path_checkpoint(), "cfg")}
    assert group_template_hash(s, path_checkpoint(), "other") not in hashes
    assert (
        group_template_hash(
            inference_spec(replicas=2, devicesPerReplica=8, nodesPerReplica=2, image="new"), path_checkpoint(), "cfg"
        )
        not in hashes
    )
    # The serve command's batch size and warm-up are in the pods: changing either rolls the groups.
    for changed in ({"maxBatchSize": 16}, {"warmUp": False}):
        outdated = inference_spec(replicas=2, devicesPerReplica=8, nodesPerReplica=2, **changed)
        assert group_template_hash(outdated, path_checkpoint(), "cfg") not in hashes
    # Scaling does not outdate running groups.
    assert group_template_hash(spec(replicas=5), path_checkpoint(), "cfg") in hashes


def test_group_service_is_headless_and_publishes_unready_leaders() -> None:
    service = build_group_service(spec(), 0)
    assert service["metadata"]["name"] == "tc7b-g0"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {ic.LABEL_INFERENCE_NAME: "tc7b", ic.LABEL_GROUP_INDEX: "0"}


def pod(group: int, rank: int, phase: str = "Running", ready: bool = True, **kw: object) -> GroupPod:
    fields = {"deleting": False, "template_hash": HASH, **kw}
    return GroupPod(f"tc7b-g{group}-{rank}", group, rank, phase, ready and phase == "Running", **fields)  # type: ignore[arg-type]


def ready_group(group: int, template_hash: str = HASH) -> list[GroupPod]:
    return [pod(group, 0, template_hash=template_hash), pod(group, 1, template_hash=template_hash)]


@dataclasses.dataclass
class Case:
    name: str
    pods: list[GroupPod]
    create: list[tuple[int, int]]
    delete: list[str]
    recreated: list[int] = dataclasses.field(default_factory=list)
    rolled: list[int] = dataclasses.field(default_factory=list)
    restarting: list[int] | None = None  # default: the recreated groups
    counts: tuple[int, int, int] = (2, 2, 2)  # replicas, ready, updated
    replicas: int = 2


CASES = [
    Case("nothing yet: create every pod of every group", [], [(0, 0), (0, 1), (1, 0), (1, 1)], [], counts=(0, 0, 0)),
    Case("all ready: nothing to do", ready_group(0) + ready_group(1), [], []),
    Case(
        "a worker failed: the whole group goes",
        [*ready_group(0), pod(1, 0), pod(1, 1, phase="Failed")],
        [],
        ["tc7b-g1-0", "tc7b-g1-1"],
        recreated=[1],
        counts=(2, 1, 1),
    ),
    Case(
        "a leader exited: the whole group goes",
        [*ready_group(0), pod(1, 0, phase="Succeeded"), pod(1, 1)],
        [],
        ["tc7b-g1-0", "tc7b-g1-1"],
        recreated=[1],
        counts=(2, 1, 1),
    ),
    Case(
        "a pod of a running group was deleted: the rest go too",
        [*ready_group(0), pod(1, 0)],
        [],
        ["tc7b-g1-0"],
        recreated=[1],
        counts=(2, 1, 1),
    ),
    Case(
        "old pods still terminating: wait, create nothing",
        [*ready_group(0), pod(1, 0, deleting=True), pod(1, 1, phase="Failed", deleting=True)],
        [],
        [],
        counts=(2, 1, 2),
        restarting=[1],
    ),
    Case(
        "a half-created group that never started: just finish it",
        [*ready_group(0), pod(1, 0, phase="Pending", ready=False)],
        [(1, 1)],
        [],
        counts=(2, 1, 2),
    ),
    Case(
        "scaled down: the extra group goes",
        ready_group(0) + ready_group(1),
        [],
        ["tc7b-g1-0", "tc7b-g1-1"],
        counts=(1, 1, 1),
        replicas=1,
    ),
    Case(
        "spec changed: roll one ready group at a time",
        ready_group(0, "old") + ready_group(1, "old"),
        [],
        ["tc7b-g0-0", "tc7b-g0-1"],
        rolled=[0],
        counts=(2, 2, 0),
    ),
    Case(
        "spec changed while another group is down: wait for it before rolling a ready one",
        [*ready_group(0, "old"), pod(1, 0, deleting=True)],
        [],
        [],
        counts=(2, 1, 1),
        restarting=[1],
    ),
    Case(
        "an outdated group that is not ready yet is replaced at once",
        [*ready_group(0), pod(1, 0, phase="Pending", ready=False, template_hash="old")],
        [],
        ["tc7b-g1-0"],
        rolled=[1],
        counts=(2, 1, 1),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_plan_groups(case: Case) -> None:
    plan = plan_groups(spec(replicas=case.replicas), case.pods, HASH)
    assert sorted(plan.create) == case.create
    assert sorted(plan.delete) == case.delete
    assert plan.recreated == case.recreated
    assert plan.rolled == case.rolled
    assert plan.restarting == (case.recreated if case.restarting is None else case.restarting)
    assert (plan.replicas, plan.ready, plan.updated) == case.counts


def test_group_pod_view_from_a_pod_body() -> None:
    body = build_group_pod(spec(), path_checkpoint(), 1, 1, "cfg")
    body["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    view = GroupPod.from_body(body)
    assert (view.group, view.rank, view.phase, view.ready, view.deleting) == (1, 1, "Running", True, False)
    assert view.template_hash == group_template_hash(spec(), path_checkpoint(), "cfg")
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert GroupPod.from_body(body).broken
