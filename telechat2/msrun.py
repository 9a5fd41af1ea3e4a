"""This process's place under msrun: ranks from msrun's environment, the rank layout, joining the group.

msrun starts N worker processes (MS_ROLE=MS_WORKER, RANK_ID, RANK_SIZE, MS_SCHED_HOST) plus one scheduler process
(MS_ROLE=MS_SCHED). `telechat2 predict` and `telechat2 serve` both use this module to decide what the ranks hold
(`plan_layout`: the model split over them, a whole replica each, or one process) and to join the communication
group; the serving side's leader/follower lockstep is `telechat2.serve.distributed`. Imports MindSpore only in
`run_msrun_scheduler` and `join_cluster`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from telechat2.tensor_parallel import TensorParallel


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int
    leader_host: str
    msrun_worker: bool = False  # started by msrun (MS_ROLE=MS_WORKER), so its scheduler waits for this rank to join

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProcessGroup:
        """msrun exports RANK_ID, RANK_SIZE (or MS_WORKER_NUM) and MS_SCHED_HOST; absent means one process."""
        world = int(environ.get("RANK_SIZE") or environ.get("MS_WORKER_NUM") or 1)
        rank = int(environ.get("RANK_ID") or 0)
        if not 0 <= rank < world:
            raise ValueError(f"RANK_ID {rank} is outside 0..{world - 1} (RANK_SIZE {world})")
        return cls(
            rank=rank,
            world_size=world,
            leader_host=environ.get("MS_SCHED_HOST", "127.0.0.1"),
            msrun_worker=environ.get("MS_ROLE") == "MS_WORKER",
        )


REPLICAS = "replicas"
TENSOR_PARALLEL = "tensor_parallel"
SINGLE = "single"


def model_parallel_of(run_config: Mapping[str, Any]) -> int:
    value = (run_config.get("parallel_config") or {}).get("model_parallel") or 1
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"parallel_config.model_parallel must be a positive integer, got {value!r}")
    return value


def plan_layout(run_config: Mapping[str, Any], group: ProcessGroup) -> str:
    """SINGLE (one process), TENSOR_PARALLEL (model_parallel == world size > 1) or REPLICAS (model_parallel 1)."""
    model_parallel = model_parallel_of(run_config)
    if group.world_size == 1:
        return SINGLE
    if model_parallel == group.world_size:
        return TENSOR_PARALLEL
    if model_parallel == 1:
        return REPLICAS
    raise ValueError(
        f"parallel_config.model_parallel is {model_parallel} but msrun started {group.world_size} ranks: "
        f"set it to {group.world_size} (split the model over the ranks) or 1 (a whole replica per rank)"
    )


def layout_warning(run_config: Mapping[str, Any], group: ProcessGroup) -> str | None:
    """What to tell the operator when the YAML's model_parallel and the number of ranks disagree (None: they agree).

    For a mismatch that `plan_layout` refuses, the message is the same as its error.
    """
    model_parallel = model_parallel_of(run_config)
    if model_parallel == group.world_size:
        return None
    if group.world_size == 1:
        return (
            f"the config asks for model_parallel={model_parallel} but one process runs: it holds the whole model "
            f"(start {model_parallel} ranks under msrun to split it)"
        )
    if model_parallel == 1:
        return (
            f"parallel_config.model_parallel=1 with {group.world_size} ranks: every rank holds a whole replica and "
            f"runs every request in lockstep (set model_parallel: {group.world_size} to split the model instead)"
        )
    return (
        f"parallel_config.model_parallel={model_parallel} does not match the {group.world_size} ranks msrun started "
        f"(it must be {group.world_size} or 1)"
    )


def is_msrun_scheduler(environ: Mapping[str, str]) -> bool:
    """msrun also starts the task as its scheduler process (MS_ROLE=MS_SCHED, RANK_ID 0): it must not serve."""
    return environ.get("MS_ROLE") == "MS_SCHED"


def run_msrun_scheduler() -> int:
    """The scheduler's whole job: `init()` runs MindSpore's cluster scheduler until the workers are done."""
    from mindspore.communication import init

    init()
    return 0


def join_cluster(group: ProcessGroup) -> TensorParallel:
    """Join msrun's communication group (blocks until every rank has joined) and check it agrees with RANK_ID.

    Every worker joins, replicas too: msrun's scheduler waits for all of them. Returns the tensor-parallel place.
    """
    from telechat2 import tensor_parallel

    place = tensor_parallel.initialize()
    if (place.rank, place.size) != (group.rank, group.world_size):
        raise RuntimeError(
            f"communication group says rank {place.rank} of {place.size}, msrun's environment RANK_ID {group.rank} "
            f"of RANK_SIZE {group.world_size}"
        )
    return place
