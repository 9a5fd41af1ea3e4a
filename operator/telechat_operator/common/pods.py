"""Pod pieces shared by the children of both kinds: what every NPU pod mounts and requests, placement, security."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from telechat_operator.common import constants as c


def npu_pod_volumes(config_map_name: str) -> list[dict[str, Any]]:
    """The rendered configs, shared memory and the host's Ascend driver: every NPU pod (rank or server) needs them."""
    return [
        {"name": c.CONFIG_VOLUME, "configMap": {"name": config_map_name}},
        {"name": c.SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        *({"name": vol, "hostPath": {"path": path, "type": kind}} for vol, path, kind in c.ASCEND_DRIVER_MOUNTS),
    ]


def npu_volume_mounts() -> list[dict[str, Any]]:
    """Where the NPU container mounts `npu_pod_volumes` (configs and driver read-only)."""
    return [
        {"name": c.CONFIG_VOLUME, "mountPath": c.CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": c.SHM_VOLUME, "mountPath": c.SHM_MOUNT_PATH},
        *({"name": vol, "mountPath": path, "readOnly": True} for vol, path, _ in c.ASCEND_DRIVER_MOUNTS),
    ]


def ascend_resources(resources: Mapping[str, Any], npus: int) -> dict[str, Any]:
    """The user's resources with the NPU count set in requests and limits (the spec parsers forbid setting it)."""
    requests = {**(resources.get("requests") or {}), c.ASCEND_RESOURCE: str(npus)}
    limits = {**(resources.get("limits") or {}), c.ASCEND_RESOURCE: str(npus)}
    return {**resources, "requests": requests, "limits": limits}


def placement_fields(
    node_selector: Mapping[str, str],
    tolerations: tuple[dict[str, Any], ...],
    affinity: dict[str, Any] | None,
    priority_class_name: str | None,
) -> dict[str, Any]:
    """The user's scheduling fields for a pod spec, only those set (an empty field would show up as a diff)."""
    fields: dict[str, Any] = {}
    if node_selector:
        fields["nodeSelector"] = dict(node_selector)
    if tolerations:
        fields["tolerations"] = [dict(t) for t in tolerations]
    if affinity:
        fields["affinity"] = affinity
    if priority_class_name:
        fields["priorityClassName"] = priority_class_name
    return fields


def pod_security_context() -> dict[str, Any]:
    """Every pod the operator creates: the container runtime's default seccomp profile."""
    return {"seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    """Every container the operator creates: no capabilities, no privilege escalation, never privileged.

    The user is the image's: the runtime image runs as root because the Ascend driver's device files and libraries
    (/dev/davinci*, /usr/local/Ascend/driver) are readable only by root or the driver's HwHiAiUser, and the merge pod
    runs as the same user as the ranks whose output directory it writes into. Root without capabilities can still
    read and write what it owns, and nothing else a capability would grant (ports above 1024 only)."""
    return {"allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]}}
