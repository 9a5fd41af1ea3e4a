"""Rank pods (one per node, running `telechat2 launch` -> msrun -> `telechat2 finetune`) and the merge pod."""

from __future__ import annotations

from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.launch import Launch
from telechat_operator.common.pods import (
    ascend_resources,
    container_security_context,
    npu_pod_volumes,
    npu_volume_mounts,
    placement_fields,
    pod_security_context,
)
from telechat_operator.common.spec import default_vocab_file
from telechat_operator.finetune import names
from telechat_operator.finetune.names import metadata
from telechat_operator.finetune.spec import FinetuneSpec


def output_subdir(spec: FinetuneSpec, sub: str) -> str:
    return f"{spec.output_path.rstrip('/')}/{sub}"


def merged_checkpoint_path(spec: FinetuneSpec) -> str:
    """Where `telechat2 merge` writes the full checkpoint (MindSpore's transform layout: rank_0/<prefix>0.ckpt)."""
    return f"{output_subdir(spec, c.MERGED_DIR)}/rank_0/{spec.merge_prefix}0.ckpt"


def rank_launch(spec: FinetuneSpec, rank: int) -> Launch:
    """The rank's place in the job's msrun cluster (rank 0, through the headless Service, is the master)."""
    return Launch(
        worker_num=spec.world_size,
        local_worker_num=spec.devices_per_node,
        node_rank=rank,
        master_addr=names.master_address(spec.name, spec.namespace),
        master_port=spec.master_port,
        log_dir=output_subdir(spec, c.MSRUN_LOG_DIR),
        cluster_timeout=spec.cluster_timeout,
    )


def rank_command(spec: FinetuneSpec, rank: int, attempt: int) -> list[str]:
    """The rank's full command line; every attempt after the first resumes from the newest checkpoint."""
    command = rank_launch(spec, rank).command(
        ["telechat2", "finetune", "--config", c.CONFIG_PATH], progress_args(spec) if rank == 0 else []
    )
    if attempt > 1:
        command.append("--resume")
    return command


def progress_port() -> dict[str, Any]:
    """Declared on rank 0, which serves GET /progress there (read-only)."""
    return {"name": c.PROGRESS_PORT_NAME, "containerPort": c.PROGRESS_PORT, "protocol": "TCP"}


def progress_args(spec: FinetuneSpec) -> list[str]:
    """Rank 0 serves every rank's progress record (written under the shared output dir) for the operator."""
    return ["--progress_dir", spec.output_path, "--progress_port", str(c.PROGRESS_PORT)]


def merge_command(spec: FinetuneSpec) -> list[str]:
    """`telechat2 merge`; the strategy files are passed only when the layout split parameters across ranks
    (with pure data parallelism each rank's checkpoint is already complete and merge checks the copies agree)."""
    strategy = ["--src_ckpt_strategy", output_subdir(spec, c.STRATEGY_DIR)] if spec.parallel.shards_parameters else []
    # The tokenizer of the model trained from (tokenizer.model beside spec.checkpoint.load, the layout the README
    # and the inference's default vocabFile assume) goes beside the merged checkpoint, where a TeleChatInference
    # with checkpoint.fromFinetune and no vocabFile looks for it.
    tokenizer = ["--vocab_file", default_vocab_file(spec.load_checkpoint)] if spec.load_checkpoint else []
    return [
        "telechat2",
        "merge",
        *strategy,
        "--src_ckpt_dir",
        output_subdir(spec, c.CHECKPOINT_DIR),
        "--dst_ckpt_dir",
        output_subdir(spec, c.MERGED_DIR),
        "--prefix",
        spec.merge_prefix,
        *tokenizer,
    ]


def rank_env(spec: FinetuneSpec, rank: int, attempt: int) -> list[dict[str, Any]]:
    """Model defaults and user env (already merged by name), then the launch contract (reserved names)."""
    contract = {**rank_launch(spec, rank).env(), c.ENV_JOB_NAME: spec.name, c.ENV_ATTEMPT: str(attempt)}
    return [*(dict(e) for e in spec.env), *({"name": k, "value": v} for k, v in contract.items())]


def _placement(spec: FinetuneSpec) -> dict[str, Any]:
    """Scheduling fields shared by rank and merge pods (the output volume may only be reachable there)."""
    fields = placement_fields(spec.node_selector, spec.tolerations, spec.affinity, spec.priority_class_name)
    if spec.service_account_name:
        fields["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        fields["imagePullSecrets"] = [dict(s) for s in spec.image_pull_secrets]
    return fields


def _container_base(spec: FinetuneSpec, name: str) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": spec.image}
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def build_rank_pod(spec: FinetuneSpec, rank: int, attempt: int) -> dict[str, Any]:
    meta = metadata(
        spec,
        names.rank_pod(spec.name, attempt, rank),
        **{c.LABEL_NODE_RANK: str(rank), c.LABEL_ATTEMPT: str(attempt), c.LABEL_ROLE: c.ROLE_WORKER},
    )
    if spec.gang_scheduled:
        meta["annotations"] = {c.ANNOTATION_VOLCANO_GROUP: names.pod_group(spec.name)}

    volumes = [*npu_pod_volumes(names.config_map(spec.name)), *(dict(v) for v in spec.volumes)]
    mounts = [*npu_volume_mounts(), *(dict(m) for m in spec.volume_mounts)]
    container = {
        **_container_base(spec, c.TRAINER_CONTAINER),
        "command": rank_command(spec, rank, attempt),
        "env": rank_env(spec, rank, attempt),
        "ports": [
            {"name": c.MASTER_PORT_NAME, "containerPort": spec.master_port, "protocol": "TCP"},
            *([progress_port()] if rank == 0 else []),
        ],
        "resources": ascend_resources(spec.resources, spec.devices_per_node),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator restarts the whole group, never a single rank
        "securityContext": pod_security_context(),
        "hostname": names.rank_host(spec.name, rank),
        "subdomain": names.service(spec.name),
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
        **_placement(spec),
    }
    if spec.scheduler_name:
        pod_spec["schedulerName"] = spec.scheduler_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def build_merge_pod(spec: FinetuneSpec, merge_attempt: int) -> dict[str, Any]:
    """CPU only, same image, the user's volumes (the output lives there)."""
    meta = metadata(
        spec,
        names.merge_pod(spec.name, merge_attempt),
        **{c.LABEL_ATTEMPT: str(merge_attempt), c.LABEL_ROLE: c.ROLE_MERGE},
    )
    container = {
        **_container_base(spec, c.MERGE_CONTAINER),
        "command": merge_command(spec),
        "env": [dict(e) for e in spec.env],
        "volumeMounts": [dict(m) for m in spec.volume_mounts],
    }
    if spec.merge_resources:
        # CPU and memory only: the parser refuses an NPU here, and none is ever copied from the ranks' resources.
        container["resources"] = {
            section: {k: v for k, v in values.items() if k != c.ASCEND_RESOURCE}
            for section, values in spec.merge_resources.items()
        }
    container["securityContext"] = container_security_context()
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [dict(v) for v in spec.volumes],
        **_placement(spec),
    }
    # Not part of the training gang: Volcano's PodGroup counts rank pods only.
    if spec.scheduler_name and not spec.gang_scheduled:
        pod_spec["schedulerName"] = spec.scheduler_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}
