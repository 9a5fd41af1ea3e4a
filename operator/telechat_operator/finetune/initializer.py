"""The initializer pod: `telechat2 preprocess` (jsonl -> MindRecord) and `telechat2 convert` (Hugging Face ->
MindSpore) before the first rank pod.

The operator never reads volumes, so whether there is work left is decided inside the pod: each command finds its
output's completion marker (written atomically after a successful run, with the inputs' sizes and hashes) and exits
0 at once when it matches. A failure's reason (the line or tensor at fault) goes to the container's termination
message, which the state machine copies into the job's status.
"""

from __future__ import annotations

from typing import Any

from telechat_operator.common import constants as c
from telechat_operator.common.pods import container_security_context, pod_security_context
from telechat_operator.finetune import names
from telechat_operator.finetune.names import metadata
from telechat_operator.finetune.pods import _container_base, _placement
from telechat_operator.finetune.spec import FinetuneSpec

_TAIL = ["--skip-if-complete", "--termination-message-path", c.TERMINATION_MESSAGE_PATH]


def preprocess_command(spec: FinetuneSpec) -> list[str]:
    init = spec.initializers
    assert init.dataset_jsonl and init.tokenizer
    return [
        "telechat2", "preprocess",
        "--input_dataset_file", init.dataset_jsonl,
        "--vocab_file_path", init.tokenizer,
        "--max_length", str(init.max_length),
        "--output_path", spec.dataset_path,
        *_TAIL,
    ]  # fmt: skip


def convert_command(spec: FinetuneSpec) -> list[str]:
    """The architecture comes from the checkpoint's config.json when present, else from the job's model."""
    init = spec.initializers
    assert init.huggingface and spec.load_checkpoint
    return [
        "telechat2", "convert",
        "--torch_path", init.huggingface,
        "--mindspore_path", spec.load_checkpoint,
        "--model", spec.model,
        *_TAIL,
    ]  # fmt: skip


def build_init_pod(spec: FinetuneSpec) -> dict[str, Any]:
    """CPU only, the user's volumes; one container per step, run side by side."""
    meta = metadata(spec, names.init_pod(spec.name), **{c.LABEL_ROLE: c.ROLE_INITIALIZER, c.LABEL_ATTEMPT: "1"})
    commands = []
    if spec.initializers.dataset_jsonl:
        commands.append((c.PREPROCESS_CONTAINER, preprocess_command(spec)))
    if spec.initializers.huggingface:
        commands.append((c.CONVERT_CONTAINER, convert_command(spec)))
    containers = []
    for name, command in commands:
        container = {
            **_container_base(spec, name),
            "command": command,
            "env": [dict(e) for e in spec.env],
            "volumeMounts": [dict(m) for m in spec.volume_mounts],
            "terminationMessagePath": c.TERMINATION_MESSAGE_PATH,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": container_security_context(),
        }
        if spec.initializers.resources:
            container["resources"] = dict(spec.initializers.resources)
        containers.append(container)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "containers": containers,
        "volumes": [dict(v) for v in spec.volumes],
        "securityContext": pod_security_context(),
        **_placement(spec),
    }
    if spec.scheduler_name and not spec.gang_scheduled:  # like the merge pod, not part of the training gang
        pod_spec["schedulerName"] = spec.scheduler_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}
