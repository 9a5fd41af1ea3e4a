"""Small facts about Kubernetes objects both controllers read or write: status patches, ownership, own-write echoes,
child metadata, content hashes and label selectors.

Pure: dicts in, dicts out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from telechat_operator.common import constants as c


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Merge-patch turning `old` into `new` at the top level of status (removed keys become null)."""
    patch: dict[str, Any] = {key: value for key, value in new.items() if old.get(key) != value}
    patch.update({key: None for key in old if key not in new})
    return patch


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether `uid` owns the object: children left over from a deleted owner of the same name (garbage collection
    may lag) are not ours."""
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def json_copy(value: Mapping[str, Any]) -> dict[str, Any]:
    """The status as the API returns it (plain JSON types), to compare with watch events."""
    return json.loads(json.dumps(value, default=str))


# What a resource looked like after this operator's last status write: (generation, status as JSON).
Written = tuple[int, dict[str, Any]]


def is_echo(written: Written | None, body: Mapping[str, Any]) -> bool:
    """True for a watch event that only echoes our last status write (`written`): the pass that wrote it already
    acted on that state. A deletion is never an echo."""
    meta = body.get("metadata") or {}
    if written is None or meta.get("deletionTimestamp"):
        return False
    return written == (int(meta.get("generation", 0)), body.get("status") or {})


def child_labels(owner_kind: str, name_label: str, owner_name: str) -> dict[str, str]:
    """Labels on every child of one owner: select its objects by kind and name; managed-by lets the operator's
    watches filter server-side."""
    return {c.LABEL_MANAGED_BY: c.MANAGED_BY_VALUE, c.LABEL_OWNER_KIND: owner_kind, name_label: owner_name}


def child_metadata(namespace: str, name: str, labels: Mapping[str, str], owner: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata of a child object: its labels and the controller reference to its owner."""
    return {"name": name, "namespace": namespace, "labels": dict(labels), "ownerReferences": [dict(owner)]}


def stable_hash(obj: Any, length: int = 10) -> str:
    """Short content hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def selector_string(labels: Mapping[str, str]) -> str:
    """Labels as a label-selector string (sorted, so the same labels always give the same string)."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
