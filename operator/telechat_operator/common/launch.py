"""The launch contract: how a pod starts `telechat2 launch` (msrun across nodes) and the environment that repeats
its arguments. One builder for both kinds: finetune rank pods and the pods of multi-node inference groups.

Pure: values in, the command line and the environment out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from telechat_operator.common import constants as c


@dataclasses.dataclass(frozen=True)
class Launch:
    """One node's place in an msrun cluster."""

    worker_num: int  # NPUs in the whole cluster
    local_worker_num: int  # NPUs on this node
    node_rank: int
    master_addr: str  # rank 0's address: msrun's scheduler
    master_port: int
    log_dir: str
    cluster_timeout: int

    def command(self, program: Sequence[str], launch_args: Sequence[str] = ()) -> list[str]:
        """`telechat2 launch <the msrun arguments> <launch_args> -- <program>`."""
        return [
            "telechat2",
            "launch",
            "--worker_num",
            str(self.worker_num),
            "--local_worker_num",
            str(self.local_worker_num),
            "--node_rank",
            str(self.node_rank),
            "--master_addr",
            self.master_addr,
            "--master_port",
            str(self.master_port),
            "--log_dir",
            self.log_dir,
            "--cluster_time_out",
            str(self.cluster_timeout),
            *launch_args,
            "--",
            *program,
        ]

    def env(self) -> dict[str, str]:
        """The same values as the command line, as the contract's variables (for a process or a debugging shell)."""
        return {
            c.ENV_WORKER_NUM: str(self.worker_num),
            c.ENV_LOCAL_WORKER_NUM: str(self.local_worker_num),
            c.ENV_NODE_RANK: str(self.node_rank),
            c.ENV_MASTER_ADDR: self.master_addr,
            c.ENV_MASTER_PORT: str(self.master_port),
            c.ENV_LOG_DIR: self.log_dir,
            c.ENV_CLUSTER_TIMEOUT: str(self.cluster_timeout),
        }
