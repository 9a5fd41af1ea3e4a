"""API calls the TeleChatInference controller needs beyond `k8s` (Deployments, server-side apply, its own kind).

Built on `k8s`'s transport (same client, same request metrics, same `ApiError`), so the rule "only the client
modules talk to the API" holds. Candidates to fold into `k8s.py`.

Children the operator keeps in step with the spec (ConfigMap, Service, Deployment) are written with server-side
apply under the field manager `telechat-operator`: the operator owns exactly the fields it sets, a field it stops
setting is removed, and fields others own (a cloud controller's Service annotations, the Deployment controller's
revision annotation) are left alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from telechat_operator import constants as c
from telechat_operator import inference_constants as ic
from telechat_operator import k8s

APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON
_PLURALS = {"Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps", "Pod": "pods"}


def _collection(api_version: str, namespace: str, plural: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{quote(namespace)}/{plural}"


def _inference_path(namespace: str, name: str) -> str:
    return f"{_collection(c.API_VERSION, namespace, ic.INFERENCE_PLURAL)}/{quote(name)}"


def _get(path: str, resource: str) -> dict[str, Any] | None:
    try:
        return k8s._request("GET", path, resource)
    except k8s.ApiError as err:
        if err.status == 404:
            return None
        raise


# --- the custom resource -------------------------------------------------------------------------------------


def get_inference(namespace: str, name: str) -> dict[str, Any] | None:
    return _get(_inference_path(namespace, name), ic.INFERENCE_PLURAL)


def patch_inference_status(namespace: str, name: str, patch: Mapping[str, Any]) -> None:
    """Merge-patch the status subresource only: the operator never writes spec."""
    k8s._request(
        "PATCH",
        _inference_path(namespace, name) + "/status",
        ic.INFERENCE_PLURAL,
        body={"status": patch},
        content_type=k8s.MERGE_PATCH,
    )


# --- children ------------------------------------------------------------------------------------------------


def get_child(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    api_version = "apps/v1" if kind == "Deployment" else "v1"
    plural = _PLURALS[kind]
    return _get(f"{_collection(api_version, namespace, plural)}/{quote(name)}", plural)


def apply(body: Mapping[str, Any]) -> dict[str, Any]:
    """Server-side apply (create or update) with our field manager, taking over conflicting fields."""
    meta = body["metadata"]
    plural = _PLURALS[body["kind"]]
    path = f"{_collection(body['apiVersion'], meta['namespace'], plural)}/{quote(meta['name'])}"
    return k8s._request(
        "PATCH",
        path,
        plural,
        body=dict(body),
        query={"fieldManager": c.OPERATOR_NAME, "force": "true"},
        content_type=APPLY_PATCH,
    )


def list_children(kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
    api_version = "apps/v1" if kind == "Deployment" else "v1"
    plural = _PLURALS[kind]
    result = k8s._request("GET", _collection(api_version, namespace, plural), plural, query={"labelSelector": selector})
    return list((result or {}).get("items") or [])


def delete_child(kind: str, namespace: str, name: str) -> None:
    """Delete (404 is done); dependents (a Deployment's pods) go in the background through the garbage collector."""
    api_version = "apps/v1" if kind == "Deployment" else "v1"
    plural = _PLURALS[kind]
    try:
        k8s._request(
            "DELETE",
            f"{_collection(api_version, namespace, plural)}/{quote(name)}",
            plural,
            body={"propagationPolicy": "Background"},
        )
    except k8s.ApiError as err:
        if err.status != 404:
            raise


def post_event(inference: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
    """A core/v1 Event on the TeleChatInference, so `kubectl describe tcinf` tells the story."""
    meta = inference["metadata"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    k8s.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": c.API_VERSION,
                "kind": ic.INFERENCE_KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": c.OPERATOR_NAME},
            "reportingComponent": c.OPERATOR_NAME,
            "reportingInstance": c.OPERATOR_NAME,
        }
    )
