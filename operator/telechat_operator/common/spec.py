"""Parsing pieces both custom resources share (TeleChatFinetune in `finetune.spec`, TeleChatInference in
`inference.spec`).

One copy, so both kinds word errors the same way and check the same things: a `SpecError` names the field.
Pure: no API calls; `telechat2.configs` is imported lazily (pure Python, no MindSpore).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from telechat_operator.common import constants as c

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """A spec the operator cannot run; `field` is the JSON path users see in `kubectl explain`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    """The controller reference every child carries: garbage-collected with its owner, adopted by no one else."""
    return {
        "apiVersion": c.API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def require_int(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool, which Python counts as one), within `minimum`..`maximum` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(field, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SpecError(field, f"must be at most {maximum}, got {value}")
    return value


def optional_int(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    """None stays None (the field was left out); anything else must pass `require_int`."""
    return None if value is None else require_int(value, field, minimum=minimum, maximum=maximum)


def require_str(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(field, "must be a non-empty string")
    return value


def validate_name(name: str, nodes: int) -> None:
    """Pod host names `<name>-rank-<nodes-1>` must be DNS labels (the CRD's CEL rule says the same)."""
    if not _DNS_LABEL.match(name):
        raise SpecError(
            "metadata.name", "must be a DNS label: lower-case letters, digits and '-', starting with a letter"
        )
    host = f"{name}{c.RANK_HOST_INFIX}{nodes - 1}"
    if len(host) > c.DNS_LABEL_MAX:
        raise SpecError(
            "metadata.name",
            f"too long: pod host name {host!r} would be {len(host)} characters (max {c.DNS_LABEL_MAX})",
        )


def known_model_defaults(model: str) -> tuple[Any, dict[str, str]]:
    """`telechat2.configs.model_defaults(model)` and its env as strings; an unknown model is a spec.model error."""
    from telechat2 import configs

    if model not in configs.list_models():
        raise SpecError("spec.model", f"unknown model {model!r}; known: {', '.join(configs.list_models())}")
    raw = configs.model_defaults(model)
    return raw, {str(k): str(v) for k, v in (raw.env or {}).items()}


def merge_env(
    defaults: Mapping[str, str], user: list[dict[str, Any]], *, reserved: Collection[str]
) -> tuple[dict[str, Any], ...]:
    """Model defaults first, user entries override by name (upsert, never a duplicate name).

    `reserved` names are set by the operator or msrun; a user entry with one of them is an error, not an override.
    """
    merged: dict[str, dict[str, Any]] = {name: {"name": name, "value": str(value)} for name, value in defaults.items()}
    for index, entry in enumerate(user):
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError(f"spec.env[{index}].name", "is required")
        if name in reserved:
            raise SpecError(f"spec.env[{index}].name", f"{name} is reserved (set by the operator or msrun)")
        merged.pop(name, None)  # user entries keep their own order, after the defaults
        merged[name] = dict(entry)
    return tuple(merged.values())


def resources_without_npus(
    raw: Mapping[str, Any] | None, *, devices_field: str, field: str = "spec.resources"
) -> dict[str, Any]:
    """The user's container resources; the NPU count comes from `devices_field` only, never from here."""
    resources = dict(raw or {})
    for section in ("requests", "limits"):
        if c.ASCEND_RESOURCE in (resources.get(section) or {}):
            raise SpecError(f"{field}.{section}", f"must not set {c.ASCEND_RESOURCE}; use {devices_field}")
    return resources


# A Kubernetes resource quantity (the apiserver's own pattern, as in the CRDs).
_QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def cpu_resources(raw: Any, field: str) -> dict[str, Any]:
    """Resources of a CPU-only container (the merge pod): requests/limits of quantities, never an NPU.

    Checked here too (the CRD says the same) because a typo such as `limts` or `cpu: two` would otherwise reach the
    pod, or be dropped, only after training finished."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(field, f"must be an object with requests and/or limits, got {raw!r}")
    unknown = sorted(set(raw) - {"requests", "limits"})
    if unknown:
        raise SpecError(f"{field}.{unknown[0]}", "unknown key: only requests and limits are allowed")
    resources: dict[str, Any] = {}
    for section in ("requests", "limits"):
        values = raw.get(section)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise SpecError(f"{field}.{section}", f"must map resource names to quantities, got {values!r}")
        for name, value in values.items():
            if name == c.ASCEND_RESOURCE:
                raise SpecError(f"{field}.{section}", f"must not set {c.ASCEND_RESOURCE}: this container runs on CPU")
            if isinstance(value, bool) or not _QUANTITY.match(str(value)):
                raise SpecError(
                    f"{field}.{section}.{name}", f"{value!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)"
                )
        resources[section] = dict(values)
    return resources


def check_volume_mounts(mounts: Iterable[Mapping[str, Any]], field: str = "spec.volumeMounts") -> None:
    """No mount at or under a path the operator mounts, and no path mounted twice (the apiserver would refuse the
    pod, or a Deployment apply with a 500, long after the spec was accepted)."""
    seen: dict[str, int] = {}
    for index, mount in enumerate(mounts):
        raw = str(mount.get("mountPath") or "")
        path = posixpath.normpath(raw) if raw else raw
        for own in c.RESERVED_MOUNT_PATHS:
            if path == own or path.startswith(own + "/"):
                raise SpecError(f"{field}[{index}].mountPath", f"{raw} is at or under {own}, which the operator mounts")
        if path in seen:
            raise SpecError(f"{field}[{index}].mountPath", f"{raw} is already mounted by {field}[{seen[path]}]")
        seen[path] = index


def check_host_paths(
    volumes: Iterable[Mapping[str, Any]], allowed: Collection[str], field: str = "spec.volumes"
) -> None:
    """hostPath volumes reach into the node: refused unless the operator's setting allows the path (the Ascend
    driver paths are the operator's own volumes, never the user's). `allowed` holds path prefixes."""
    for index, volume in enumerate(volumes):
        host_path = volume.get("hostPath")
        if host_path is None:
            continue
        raw = str((host_path or {}).get("path") or "")
        path = posixpath.normpath(raw) if raw else raw
        if not any(path == root or path.startswith(root.rstrip("/") + "/") for root in allowed):
            allowed_text = ", ".join(allowed) if allowed else "none"
            raise SpecError(
                f"{field}[{index}].hostPath.path",
                f"{raw or '(empty)'} is not an allowed host path (operator setting TELECHAT_OPERATOR_ALLOWED_HOSTPATHS:"
                f" {allowed_text}); use a PersistentVolumeClaim",
            )


# Checkpoint files end like this; anything else is taken as a directory (the tokenizer default depends on it).
CHECKPOINT_FILE_SUFFIXES = (".ckpt", ".safetensors")


def default_vocab_file(checkpoint_path: str) -> str:
    """tokenizer.model in the checkpoint's directory (the path itself when it is a directory)."""
    path = checkpoint_path.rstrip("/") or "/"
    directory = posixpath.dirname(path) if path.endswith(CHECKPOINT_FILE_SUFFIXES) else path
    return posixpath.join(directory, "tokenizer.model")


def checkpoint_directory(checkpoint_path: str) -> str:
    """The directory holding the weights (MindIE's modelWeightPath)."""
    path = checkpoint_path.rstrip("/") or "/"
    return posixpath.dirname(path) if path.endswith(CHECKPOINT_FILE_SUFFIXES) else path
