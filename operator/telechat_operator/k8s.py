"""The only module that talks to the Kubernetes API (kopf's own watches aside), for both kinds.

Plain JSON over the `kubernetes` client's configured connection (auth, TLS, proxies from kubeconfig or the
in-cluster service account), without its model classes: the operator works on dicts end to end, and skipping
model deserialization keeps a 64-pod list cheap. Writes are idempotent: create treats 409 as done, delete treats
404 as done. Every request is counted in `telechat_operator_api_requests_total`.

Children the TeleChatInference controller keeps in step with its spec (ConfigMap, Service, Deployment) are written
with server-side apply under the field manager `telechat-operator`: the operator owns exactly the fields it sets, a
field it stops setting is removed, and fields others own (a cloud controller's Service annotations, the Deployment
controller's revision annotation) are left alone.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes
from kubernetes.client.exceptions import ApiException

from telechat_operator.common import constants as c
from telechat_operator.common import metrics
from telechat_operator.common.objects import selector_string
from telechat_operator.inference import constants as ic

_client_lock = threading.Lock()
_client: kubernetes.client.ApiClient | None = None

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the body is sent as JSON


# Every object the operator writes is posted with strict field validation: a field the apiserver does not know
# (a typo in a user's affinity or volumeMounts, copied into a pod) is an error naming it, never silently dropped.
STRICT = {"fieldValidation": "Strict"}


class ApiError(RuntimeError):
    """A request the API refused; `status` is the HTTP code (422 for a body the apiserver rejects).

    `target` says which request on which object ("create Pod ns/name"), set by the writers below, so a status
    condition can name the refused object."""

    def __init__(self, status: int, message: str, target: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.target = target

    def describe(self) -> str:
        """ "create Pod ns/x refused (HTTP 403): ..." (or just the code and message when the target is unknown)."""
        where = f"{self.target} refused " if self.target else "refused "
        return f"{where}(HTTP {self.status}): {self.message}"


def _refused(verb: str, body: Mapping[str, Any], err: ApiError) -> ApiError:
    """Name the object on an ApiError raised by a write (kept when an inner write named it already)."""
    if not err.target:
        meta = body.get("metadata") or {}
        err.target = f"{verb} {body.get('kind')} {meta.get('namespace')}/{meta.get('name')}"
    return err


def api_client() -> kubernetes.client.ApiClient:
    """One shared client, configured from the pod's service account or else the kubeconfig."""
    global _client
    with _client_lock:
        if _client is None:
            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            configuration = kubernetes.client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = 32
            _client = kubernetes.client.ApiClient(configuration)
        return _client


def _request(
    method: str,
    path: str,
    resource: str,
    body: Any = None,
    query: Mapping[str, str] | None = None,
    content_type: str = "application/json",
) -> Any:
    client = api_client()
    url = client.configuration.host + path + (f"?{urlencode(query)}" if query else "")
    headers = {"Accept": "application/json", "Content-Type": content_type}
    client.update_params_for_auth(headers, None, ["BearerToken"])
    metrics.API_REQUESTS.labels(verb=method, resource=resource).inc()
    try:
        response = client.rest_client.request(
            method, url, headers=headers, body=body, _preload_content=False, _request_timeout=(10, 30)
        )
    except ApiException as err:
        raise ApiError(err.status or 0, _message(err.body)) from None
    return json.loads(response.data) if response.data else None


def _message(raw: Any) -> str:
    try:
        return json.loads(raw).get("message", str(raw))
    except (TypeError, ValueError, AttributeError):
        return str(raw)


def _collection(api_version: str, namespace: str, plural: str) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{quote(namespace)}/{plural}"


_PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Event": "events",
    "PodGroup": "podgroups",
    "Deployment": "deployments",
}
_CORE_API_VERSIONS = {"Pod": "v1", "Service": "v1", "ConfigMap": "v1", "Event": "v1", "Deployment": "apps/v1"}


def _plural(body: Mapping[str, Any]) -> str:
    return _PLURALS[body["kind"]]


def _object_path(api_version: str, namespace: str, plural: str, name: str) -> str:
    return f"{_collection(api_version, namespace, plural)}/{quote(name)}"


def _get(path: str, resource: str) -> dict[str, Any] | None:
    """GET one object; None when it does not exist (404)."""
    try:
        return _request("GET", path, resource)
    except ApiError as err:
        if err.status == 404:
            return None
        raise


# --- the custom resource -------------------------------------------------------------------------------------


def get_finetune(namespace: str, name: str) -> dict[str, Any] | None:
    return _get(_object_path(c.API_VERSION, namespace, c.FINETUNE_PLURAL, name), c.FINETUNE_PLURAL)


def patch_finetune_status(
    namespace: str, name: str, patch: Mapping[str, Any], expected_version: str | None = None
) -> str:
    """Merge-patch the status subresource only (the operator never writes spec); returns the new resourceVersion.
    With `expected_version`, only if the job is still at that resourceVersion (409 otherwise)."""
    path = _object_path(c.API_VERSION, namespace, c.FINETUNE_PLURAL, name) + "/status"
    body: dict[str, Any] = {"status": patch}
    if expected_version:
        body["metadata"] = {"resourceVersion": expected_version}
    result = _request("PATCH", path, c.FINETUNE_PLURAL, body=body, content_type=MERGE_PATCH)
    return str(result["metadata"]["resourceVersion"])


def get_inference(namespace: str, name: str) -> dict[str, Any] | None:
    return _get(_object_path(c.API_VERSION, namespace, ic.INFERENCE_PLURAL, name), ic.INFERENCE_PLURAL)


def patch_inference_status(namespace: str, name: str, patch: Mapping[str, Any]) -> None:
    """Merge-patch the status subresource only: the operator never writes spec."""
    path = _object_path(c.API_VERSION, namespace, ic.INFERENCE_PLURAL, name) + "/status"
    _request("PATCH", path, ic.INFERENCE_PLURAL, body={"status": patch}, content_type=MERGE_PATCH)


# --- children ------------------------------------------------------------------------------------------------


def list_pods(
    namespace: str, labels: Mapping[str, str], from_cache: bool = False, not_older_than: str | None = None
) -> list[dict[str, Any]]:
    """Pods matching `labels`.

    By default a consistent read. `from_cache` reads the apiserver's watch cache instead, at least as new as
    `not_older_than` (a resourceVersion this operator has seen; any state when None): a consistent read issued right
    after a write to another resource first waits for etcd to confirm the cache is current (a progress notification,
    40-90 ms measured here), which was most of a new job's time to its first pod. A cache read the apiserver cannot
    serve (a cache behind the version asked for, e.g. another apiserver replica's) falls back to a consistent one."""
    selector = selector_string(labels)
    path = _collection("v1", namespace, "pods")
    if from_cache:
        version = {"resourceVersion": not_older_than, "resourceVersionMatch": "NotOlderThan"}
        query = {"labelSelector": selector} | (version if not_older_than else {"resourceVersion": "0"})
        try:
            return list(_request("GET", path, "pods", query=query).get("items") or [])
        except ApiError as err:
            if err.status in (403, 404):
                raise
    result = _request("GET", path, "pods", query={"labelSelector": selector})
    return list(result.get("items") or [])


def get_child(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """A Pod, Service, ConfigMap or Deployment by name; None if absent."""
    plural = _PLURALS[kind]
    return _get(_object_path(_CORE_API_VERSIONS[kind], namespace, plural, name), plural)


def list_children(kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
    """Pods, Services, ConfigMaps or Deployments matching a label selector string."""
    plural = _PLURALS[kind]
    path = _collection(_CORE_API_VERSIONS[kind], namespace, plural)
    result = _request("GET", path, plural, query={"labelSelector": selector})
    return list((result or {}).get("items") or [])


def apply(body: Mapping[str, Any]) -> dict[str, Any]:
    """Server-side apply (create or update) with our field manager, taking over conflicting fields."""
    meta = body["metadata"]
    plural = _plural(body)
    try:
        return _request(
            "PATCH",
            _object_path(body["apiVersion"], meta["namespace"], plural, meta["name"]),
            plural,
            body=dict(body),
            query={"fieldManager": c.OPERATOR_NAME, "force": "true", **STRICT},
            content_type=APPLY_PATCH,
        )
    except ApiError as err:
        raise _refused("apply", body, err) from None


def create(body: Mapping[str, Any]) -> bool:
    """Create a namespaced object; False if it already existed (409), which is success for a reconciler."""
    meta = body["metadata"]
    try:
        _request(
            "POST",
            _collection(body["apiVersion"], meta["namespace"], _plural(body)),
            _plural(body),
            body=body,
            query=STRICT,
        )
        return True
    except ApiError as err:
        if err.status == 409:
            return False
        raise _refused("create", body, err) from None


def create_or_patch(body: Mapping[str, Any], patch: Mapping[str, Any]) -> None:
    """Create, or merge-patch `patch` into the existing object (keeps a ConfigMap in step with the spec)."""
    if not create(body):
        meta = body["metadata"]
        path = f"{_collection(body['apiVersion'], meta['namespace'], _plural(body))}/{meta['name']}"
        try:
            _request("PATCH", path, _plural(body), body=patch, query=STRICT, content_type=MERGE_PATCH)
        except ApiError as err:
            raise _refused("patch", body, err) from None


def delete_child(kind: str, namespace: str, name: str) -> None:
    """Delete (404 is done); dependents (a Deployment's pods) go in the background through the garbage collector."""
    plural = _PLURALS[kind]
    try:
        _request(
            "DELETE",
            _object_path(_CORE_API_VERSIONS[kind], namespace, plural, name),
            plural,
            body={"propagationPolicy": "Background"},
        )
    except ApiError as err:
        if err.status != 404:
            raise _refused("delete", {"kind": kind, "metadata": {"namespace": namespace, "name": name}}, err) from None


def delete_pod(namespace: str, name: str) -> None:
    delete_child("Pod", namespace, name)


def stop_pod(namespace: str, name: str) -> None:
    """End a running pod but keep it (and its logs): with spec.activeDeadlineSeconds=1 the kubelet stops its
    containers as for any pod past its deadline (phase Failed, reason DeadlineExceeded). 404 is done."""
    path = _object_path("v1", namespace, "pods", name)
    try:
        _request("PATCH", path, "pods", body={"spec": {"activeDeadlineSeconds": 1}}, content_type=MERGE_PATCH)
    except ApiError as err:
        if err.status != 404:
            raise


def post_event(kind: str, obj: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
    """A core/v1 Event on one of our resources (`kind` is TeleChatFinetune or TeleChatInference), so
    `kubectl describe` tells the story."""
    meta = obj["metadata"]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": c.API_VERSION,
            "kind": kind,
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
    create(body)
