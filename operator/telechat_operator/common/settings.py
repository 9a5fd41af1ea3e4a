"""Operator configuration: tunables read once from the environment, and the kopf settings derived from them."""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
from collections.abc import Collection, Mapping
from typing import Any

import kopf

from telechat_operator.common import constants as c


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} must not be negative")
    return value


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    # Exponential backoff between attempts: base * 2^(restarts-1), capped (tests use a base of ~1s).
    backoff_base_seconds: float = 10.0
    backoff_max_seconds: float = 300.0
    # Every job is reconciled at least this often even without events (a safety net for missed watch events).
    resync_seconds: float = 300.0
    # Pod events are collected this long before the job is reconciled (one pass for a burst of rank pod changes).
    pod_event_settle_seconds: float = 0.2
    # Longer for pods that only progressed (Pending -> Running): the job's Running status can wait a second, which
    # turns a group's ramp into one pass and keeps those writes off the API while other jobs' pods are being created.
    pod_progress_settle_seconds: float = 1.0
    # Minimum interval between status writes that only update the pod counts (status.pods).
    status_counts_seconds: float = 2.0
    # Concurrent reconcile passes across all jobs, and concurrent pod creations within one pass.
    reconcile_workers: int = 16
    create_workers: int = 16
    # Watch stream timeouts: without them a silently dropped connection stalls the operator forever.
    watch_server_timeout: float = 300.0
    watch_client_timeout: float = 330.0
    watch_connect_timeout: float = 10.0
    request_timeout: float = 60.0
    # Training progress: rank 0's /progress is fetched at most this often per running job (0 turns polling off),
    # each fetch giving up after progress_timeout_seconds (unreachable pods back off up to resync_seconds).
    progress_seconds: float = 30.0
    progress_timeout_seconds: float = 2.0
    # A multi-node inference group ready this long after its last recreation has its failure count (and so its
    # recreation backoff) reset; one that fails sooner counts as crash-looping.
    group_stable_seconds: float = 600.0
    # Host paths (prefixes) user volumes may mount with hostPath (TELECHAT_OPERATOR_ALLOWED_HOSTPATHS, comma
    # separated): none by default. The Ascend driver paths are the operator's own volumes and need no entry.
    allowed_host_paths: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        prefix = "TELECHAT_OPERATOR_"
        defaults = cls()
        values: dict[str, Any] = {
            field.name: _float(env, prefix + field.name.upper(), getattr(defaults, field.name))
            for field in dataclasses.fields(cls)
            if field.name != "allowed_host_paths"
        }
        for name in ("reconcile_workers", "create_workers"):
            values[name] = max(1, int(values[name]))
        values["allowed_host_paths"] = host_path_list(env, prefix + "ALLOWED_HOSTPATHS")
        return cls(**values)


def host_path_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated absolute paths; a relative one is a configuration error naming the variable."""
    paths = tuple(part.strip() for part in (env.get(name) or "").split(",") if part.strip())
    for path in paths:
        if not path.startswith("/"):
            raise ValueError(f"environment variable {name}: {path!r} is not an absolute path")
    return tuple(posixpath.normpath(path) for path in paths)


class NoDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf computes, for every watch event, a deep-copied "essence" of the body to diff against the last handled
    one. Only change-detecting handlers (on.create/update/resume/field) use it; this operator registers none (its
    reconcilers are level-triggered `on.event` handlers), and the copy was half of kopf's cost per pod event.
    `tests/unit/test_operator_runtime.py` fails if a change-detecting handler is ever registered."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None


_GLOB_CHARS = frozenset("*?[]!,")


def exact_namespaces(namespaces: Collection[str]) -> bool:
    """True when the operator is namespace-scoped to plain names only (no globs, negations or lists)."""
    return bool(namespaces) and not any(_GLOB_CHARS & set(name) for name in namespaces)


def configure_kopf(
    settings: kopf.OperatorSettings,
    config: OperatorConfig,
    *,
    peering: str | None,
    namespaces: Collection[str] = (),
) -> None:
    """Apply the operator's choices to kopf's settings (called from the startup handler)."""
    # Namespace-scoped with plain names, the operator's RBAC (a Role) cannot list namespaces or CRDs cluster-wide,
    # and kopf would spend its first minute retrying that forbidden scan before serving. The names are known and
    # the CRDs are installed before the operator, so there is nothing to discover. Globs still need the scan.
    settings.scanning.disabled = exact_namespaces(namespaces)
    settings.watching.server_timeout = int(config.watch_server_timeout)  # the API takes whole seconds
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.connect_timeout = config.watch_connect_timeout
    settings.networking.request_timeout = config.request_timeout
    settings.networking.connect_timeout = config.watch_connect_timeout
    # Watch only the pods this operator created (server-side filter).
    settings.watching.label_selectors["v1", "pods"] = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY_VALUE}"
    # The reconcilers post their own Events; kopf's per-handler chatter would only cost API requests.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = c.OPERATOR_NAME
    # If kopf ever stores state on our objects, keep it in annotations under our domain, never in status.
    settings.persistence.finalizer = f"{c.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = NoDiffBaseStorage(prefix=c.GROUP)
    if peering:
        settings.peering.name = peering
        settings.peering.mandatory = True
        settings.peering.standalone = False
    else:
        settings.peering.standalone = True
