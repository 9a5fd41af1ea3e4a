"""Every RBAC grant of operator/deploy/rbac.yaml is used, and every request the operator makes is granted.

The reconcilers of both kinds run here against a small in-memory apiserver behind `k8s.api_client()` (so the real
URL building and verbs of `k8s.py` are what is recorded), through the scenarios that reach every write they make:
a gang-scheduled job that starts, fails, restarts and merges; an inference that starts, meets a same-named leftover,
switches to multi-node groups and scales to zero. kopf's own requests are its watches (list + watch of every
resource it has handlers for) and, cluster-wide, the CRD scan. The chart's rules equal rbac.yaml's
(tests/unit/test_charts.py), so this holds for both. The e2e tests run the operator under this ClusterRole too.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from operator_factories import job_body
from telechat_operator import k8s
from telechat_operator.common import constants as c
from telechat_operator.common.settings import OperatorConfig
from telechat_operator.inference import constants as ic

from tests.unit.inference_fixtures import inference_body

REPO = Path(__file__).resolve().parents[2]
Grant = tuple[str, str, str]  # (apiGroup, resource, verb)


class FakeApiserver:
    """Objects by path; answers GET/POST/PATCH/DELETE like the apiserver for what the operator sends."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.used: set[Grant] = set()
        self.versions = itertools.count(1)

    # --- the transport k8s.py calls ---
    def request(self, method: str, url: str, headers: Any = None, body: Any = None, **_: Any) -> Any:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        segments = [unquote(s) for s in parts.path.strip("/").split("/")]
        if segments[0] == "api":  # /api/v1/namespaces/ns/<plural>[/name[/sub]]
            group, rest = "", segments[2:]
        else:  # /apis/<group>/<version>/namespaces/ns/<plural>[/name[/sub]]
            group, rest = segments[1], segments[3:]
        namespace, plural, tail = rest[1], rest[2], rest[3:]
        name = tail[0] if tail else None
        sub = tail[1] if len(tail) > 1 else None
        resource = f"{plural}/{sub}" if sub else plural
        key = f"{group}/{namespace}/{plural}/{name}"
        content_type = (headers or {}).get("Content-Type", "")
        if method == "GET" and name is None:
            self.used.add((group, resource, "list"))
            prefix = f"{group}/{namespace}/{plural}/"
            items = [o for k, o in self.objects.items() if k.startswith(prefix) and self._selects(query, o)]
            return self._answer({"items": copy.deepcopy(items), "metadata": {"resourceVersion": "1"}})
        if method == "GET":
            self.used.add((group, resource, "get"))
            return self._answer(self._existing(key))
        if method == "POST":
            self.used.add((group, resource, "create"))
            key = f"{group}/{namespace}/{plural}/{body['metadata']['name']}"
            if key in self.objects:
                self._fail(409, "AlreadyExists")
            return self._answer(self._store(key, copy.deepcopy(body)))
        if method == "PATCH":
            self.used.add((group, resource, "patch"))
            if content_type == k8s.APPLY_PATCH:  # server-side apply: creates what is missing (needs create too)
                if key not in self.objects:
                    self.used.add((group, resource, "create"))
                    return self._answer(self._store(key, copy.deepcopy(body)))
                return self._answer(self._store(key, {**self.objects[key], **copy.deepcopy(body)}))
            current = self._existing(key)
            if sub == "status":
                status = {**(current.get("status") or {}), **body["status"]}
                current["status"] = {k: v for k, v in status.items() if v is not None}
            else:
                for field, value in body.items():
                    current[field] = {**(current.get(field) or {}), **value}
            return self._answer(self._store(key, current))
        if method == "DELETE":
            self.used.add((group, resource, "delete"))
            self._existing(key)
            del self.objects[key]
            return self._answer({})
        raise AssertionError(f"unexpected {method} {url}")

    # --- helpers ---
    def put(self, api_version: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        """Store an object as a user or a controller would (not recorded)."""
        group = "" if api_version == "v1" else api_version.split("/")[0]
        return self._store(f"{group}/{body['metadata']['namespace']}/{plural}/{body['metadata']['name']}", body)

    def get(self, group: str, namespace: str, plural: str, name: str) -> dict[str, Any]:
        return self.objects[f"{group}/{namespace}/{plural}/{name}"]

    def all(self, group: str, plural: str) -> list[dict[str, Any]]:
        return [o for k, o in self.objects.items() if k.startswith(f"{group}/") and k.split("/")[2] == plural]

    def _store(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{key}")
        meta["resourceVersion"] = str(next(self.versions))
        self.objects[key] = body
        return body

    def _existing(self, key: str) -> dict[str, Any]:
        if key not in self.objects:
            self._fail(404, "NotFound")
        return self.objects[key]

    @staticmethod
    def _selects(query: dict[str, list[str]], obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for term in filter(None, (query.get("labelSelector") or [""])[0].split(",")):
            key, _, value = term.partition("=")
            if key not in labels or (value and labels[key] != value):
                return False
        return True

    @staticmethod
    def _answer(obj: dict[str, Any]) -> Any:
        return type("Response", (), {"data": json.dumps(obj).encode()})()

    @staticmethod
    def _fail(status: int, reason: str) -> None:
        from kubernetes.client.exceptions import ApiException

        error = ApiException(status=status, reason=reason)
        error.body = json.dumps({"message": reason})
        raise error


@pytest.fixture
def apiserver(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiserver]:
    from telechat_operator.finetune import handlers as finetune
    from telechat_operator.inference import handlers as inference

    server = FakeApiserver()
    client = type(
        "Client",
        (),
        {
            "rest_client": server,
            "configuration": type("Configuration", (), {"host": "https://api"})(),
            "update_params_for_auth": lambda self, *args: None,
        },
    )()
    monkeypatch.setattr(k8s, "api_client", lambda: client)
    fast = OperatorConfig(backoff_base_seconds=0.0, status_counts_seconds=0.0, allowed_host_paths=("/mnt",))
    monkeypatch.setattr(finetune.controller, "config", fast)
    monkeypatch.setattr(inference.controller, "config", fast)
    state = finetune.controller
    for table in (state.own_status_writes, state.unstarted_jobs, state.pod_versions, state.posted_pods):
        table.clear()
    yield server
    finetune.controller.event_pool.submit(lambda: None).result()
    for table in (state.own_status_writes, state.unstarted_jobs, state.pod_versions, state.posted_pods):
        table.clear()


def set_phase(server: FakeApiserver, pods: list[dict[str, Any]], phase: str, exit_code: int | None = None) -> None:
    for pod in pods:
        status: dict[str, Any] = {"phase": phase}
        if exit_code is not None:
            container = pod["spec"]["containers"][0]["name"]
            status["containerStatuses"] = [{"name": container, "state": {"terminated": {"exitCode": exit_code}}}]
        pod["status"] = status


def drive_finetune(server: FakeApiserver) -> None:
    """A Volcano-scheduled 2-node job: start, a rank killed (restart), both succeed, merge, done."""
    from telechat_operator.finetune import handlers as finetune

    body = job_body(schedulerName="volcano", volumes=[{"name": "out", "hostPath": {"path": "/mnt/out"}}])
    server.put(c.API_VERSION, c.FINETUNE_PLURAL, body)
    key = ("ns", "ft")

    def pods(role: str = c.ROLE_WORKER) -> list[dict[str, Any]]:
        return [p for p in server.all("", "pods") if p["metadata"]["labels"].get(c.LABEL_ROLE) == role]

    finetune.controller.reconcile(key)  # PodGroup, pods, ConfigMap, Service, status, Events
    assert server.all("scheduling.volcano.sh", "podgroups") and len(pods()) == 2
    set_phase(server, pods(), "Running")
    finetune.controller.reconcile(key)
    set_phase(server, pods()[:1], "Failed", exit_code=137)
    finetune.controller.reconcile(key)  # restart: the old group is deleted
    finetune.controller.reconcile(key)  # attempt 2: pods again, the ConfigMap exists (409, then patched)
    assert {p["metadata"]["labels"][c.LABEL_ATTEMPT] for p in pods()} == {"2"}
    set_phase(server, pods(), "Succeeded", exit_code=0)
    finetune.controller.reconcile(key)  # merge pod
    set_phase(server, pods(c.ROLE_MERGE), "Succeeded", exit_code=0)
    finetune.controller.reconcile(key)
    finetune.controller.event_pool.submit(lambda: None).result()
    assert server.get(c.GROUP, "ns", c.FINETUNE_PLURAL, "ft")["status"]["state"] == c.STATE_SUCCEEDED

    # A job that fails for good while a rank still runs: that rank is stopped in place (patched), keeping its log.
    server.put(c.API_VERSION, c.FINETUNE_PLURAL, job_body(name="doomed"))
    finetune.controller.reconcile(("ns", "doomed"))
    doomed = [p for p in server.all("", "pods") if p["metadata"]["labels"][c.LABEL_JOB_NAME] == "doomed"]
    set_phase(server, doomed, "Running")
    finetune.controller.reconcile(("ns", "doomed"))
    set_phase(server, doomed[:1], "Failed", exit_code=1)
    finetune.controller.reconcile(("ns", "doomed"))
    finetune.controller.event_pool.submit(lambda: None).result()
    assert server.get(c.GROUP, "ns", c.FINETUNE_PLURAL, "doomed")["status"]["state"] == c.STATE_FAILED


def drive_inference(server: FakeApiserver) -> None:
    """Single-node (past a same-named leftover ConfigMap), then multi-node groups, then scaled to zero."""
    from telechat_operator.inference import handlers as inference

    body = inference_body(name="tc", namespace="ns")
    server.put(c.API_VERSION, ic.INFERENCE_PLURAL, body)
    leftover = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "tc-serving-config",
            "namespace": "ns",
            "labels": {c.LABEL_OWNER_KIND: ic.INFERENCE_KIND},
            "ownerReferences": [{"uid": "an-older-tc"}],
        },
    }
    server.put("v1", "configmaps", leftover)
    key = ("ns", "tc")

    def group_pods() -> list[dict[str, Any]]:
        return [p for p in server.all("", "pods") if p["metadata"]["labels"][c.LABEL_OWNER_KIND] == ic.INFERENCE_KIND]

    inference.controller.reconcile(key)  # the leftover is deleted (Stale)
    inference.controller.reconcile(key)  # ConfigMap, Service, Deployment applied; status; Events
    assert server.all("apps", "deployments")
    stored = server.get(c.GROUP, "ns", ic.INFERENCE_PLURAL, "tc")
    stored["spec"].update(nodesPerReplica=2, devicesPerReplica=8, replicas=2)
    stored["metadata"]["generation"] = 4
    inference.controller.reconcile(key)  # the Deployment goes, group Services and pods come
    assert not server.all("apps", "deployments") and len(group_pods()) == 4
    stored["spec"]["replicas"] = 0
    stored["metadata"]["generation"] = 5
    inference.controller.reconcile(key)  # groups and their Services removed
    assert not group_pods()
    # A fromFinetune inference reads its finetune.
    serving = inference_body(name="ft-serving", namespace="ns", checkpoint={"fromFinetune": "ft"})
    server.put(c.API_VERSION, ic.INFERENCE_PLURAL, serving)
    inference.controller.reconcile(("ns", "ft-serving"))


def kopf_watches() -> set[Grant]:
    """What kopf requests: list + watch of every resource with a handler, and (cluster-wide) the CRD scan."""
    import kopf
    from telechat_operator.handlers import register_all

    register_all()
    grants: set[Grant] = set()
    for handler in kopf.get_default_registry()._watching.get_all_handlers():
        selector = handler.selector
        assert selector is not None
        for verb in ("list", "watch"):
            grants.add((selector.group or "", selector.plural or selector.any_name or "", verb))
    grants |= {("apiextensions.k8s.io", "customresourcedefinitions", verb) for verb in ("list", "watch")}
    return grants


def granted() -> set[Grant]:
    docs = [d for d in yaml.safe_load_all((REPO / "operator" / "deploy" / "rbac.yaml").read_text()) if d]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_every_grant_is_used_and_every_request_is_granted(apiserver: FakeApiserver) -> None:
    drive_finetune(apiserver)
    drive_inference(apiserver)
    used = apiserver.used | kopf_watches()
    grants = granted()
    assert sorted(used - grants) == [], "requests the ClusterRole does not grant"
    assert sorted(grants - used) == [], "grants no request uses: trim them from rbac.yaml and the chart"
