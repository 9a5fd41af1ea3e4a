"""The Helm charts, without a cluster: generated parts in sync, schemas strict and documented, `helm lint` clean,
and what `helm template` renders checked against the operator (its flags, its RBAC) and the CRDs.

helm is the one the local cluster builds (`python -m tests.cluster build`, pinned in tests/cluster/gomod/helm).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.build import entry_dir, is_complete
from tests.cluster.components import COMPONENTS_BY_NAME

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "charts"
OPERATOR_CHART = CHARTS / "telechat-operator"
INFERENCE_CHART = CHARTS / "telechat-inference"
MINIMAL_INFERENCE = ["--set", "model=telechat2-7b", "--set", "checkpoint.path=/data/telechat2-7b"]


def load_sync_module() -> Any:
    spec = importlib.util.spec_from_file_location("charts_sync", CHARTS / "sync.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def helm() -> Path:
    entry = entry_dir(COMPONENTS_BY_NAME["helm"])
    if not is_complete(entry, "helm"):
        pytest.skip(f"helm is not built ({entry}): run python -m tests.cluster build")
    return entry / "helm"


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # No kubeconfig: lint and template must work offline, as in a GitOps repository server.
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, env={"HOME": "/tmp", "KUBECONFIG": "/dev/null"}
    )


def render(helm: Path, chart: Path, *args: str, release: str = "tc", namespace: str = "telechat") -> list[dict]:
    result = run_helm(helm, "template", release, str(chart), "--namespace", namespace, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(helm: Path, chart: Path, *args: str) -> str:
    result = run_helm(helm, "template", "tc", str(chart), *args)
    assert result.returncode != 0, f"helm template {' '.join(args)} should have failed"
    return result.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# --- Generated parts and their sources of truth ---------------------------------------------------------------


def test_chart_crds_are_byte_identical_to_the_repository_crds() -> None:
    sources = sorted((REPO / "crds").glob("*.yaml"))
    copies = sorted((OPERATOR_CHART / "files" / "crds").glob("*.yaml"))
    assert sources, "crds/ is empty"
    assert [p.name for p in copies] == [p.name for p in sources], "run python charts/sync.py"
    for source, copy in zip(sources, copies, strict=True):
        assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}: run python charts/sync.py"


def test_inference_model_enum_is_telechat2s_model_list() -> None:
    from telechat2.configs import list_models

    schema = json.loads((INFERENCE_CHART / "values.schema.json").read_text())
    assert schema["properties"]["model"]["enum"] == list(list_models()), "run python charts/sync.py"


def test_sync_check_reports_drift_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = load_sync_module()
    messages: list[str] = []
    assert sync.main(["--check"], report=messages.append) == 0, messages
    # A drifted copy is reported, and a real run restores it byte for byte.
    fake_chart_crds = tmp_path / "crds"
    fake_chart_crds.mkdir()
    (fake_chart_crds / "stale.yaml").write_text("old\n")
    monkeypatch.setattr(sync, "CHART_CRDS_DIR", fake_chart_crds)
    assert sync.main(["--check"], report=messages.append) == 1
    assert any("stale.yaml" in message for message in messages)
    assert sync.main([], report=messages.append) == 0
    assert sorted(p.name for p in fake_chart_crds.iterdir()) == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))


def test_render_inference_schema_replaces_only_the_enum() -> None:
    sync = load_sync_module()
    text = json.dumps({"properties": {"model": {"enum": ["old"], "description": "d"}, "x": {"type": "string"}}})
    rendered = json.loads(sync.render_inference_schema(text, ["a", "b"]))
    assert rendered == {"properties": {"model": {"enum": ["a", "b"], "description": "d"}, "x": {"type": "string"}}}


# --- values.schema.json and values.yaml ------------------------------------------------------------------------


def schema_nodes(node: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from schema_nodes(node["items"], f"{path}[]")


@pytest.mark.parametrize("chart", [OPERATOR_CHART, INFERENCE_CHART], ids=lambda p: p.name)
def test_schema_rejects_unknown_keys_and_describes_every_level(chart: Path) -> None:
    schema = json.loads((chart / "values.schema.json").read_text())
    for path, node in schema_nodes(schema):
        assert node.get("description"), f"{chart.name} schema {path or '<root>'} has no description"
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{chart.name} schema {path} accepts unknown keys"


def documented_leaves(values_file: Path) -> tuple[set[str], set[str]]:
    """Dotted paths of every key in values.yaml, and of those whose comment block starts with helm-docs' `# --`."""
    keys: set[str] = set()
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    comment_block: list[str] = []
    for line in values_file.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match:
            if not stripped:
                comment_block = []
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([name for _, name in stack] + [key])
        keys.add(path)
        if comment_block and comment_block[0].startswith("# --"):
            documented.add(path)
        comment_block = []
        stack.append((indent, key))
    return keys, documented


@pytest.mark.parametrize("chart", [OPERATOR_CHART, INFERENCE_CHART], ids=lambda p: p.name)
def test_every_value_is_documented_and_in_the_schema(chart: Path) -> None:
    values = yaml.safe_load((chart / "values.yaml").read_text())
    schema = json.loads((chart / "values.schema.json").read_text())
    keys, documented = documented_leaves(chart / "values.yaml")

    def walk(value: Any, node: dict, path: str) -> None:
        if not isinstance(value, dict) or "properties" not in node:
            assert path in documented, f"{chart.name}: value {path} has no helm-docs '# --' comment"
            return
        for key, child in value.items():
            child_path = f"{path}.{key}" if path else key
            assert key in node["properties"], f"{chart.name}: value {child_path} is missing from values.schema.json"
            walk(child, node["properties"][key], child_path)

    walk(values, schema, "")
    assert keys, "no keys read from values.yaml"


# --- helm lint -------------------------------------------------------------------------------------------------


def lint_is_clean(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    "values", [None, *sorted((OPERATOR_CHART / "ci").glob("*.yaml"))], ids=lambda p: p.name if p else "defaults"
)
def test_operator_chart_lints_clean(helm: Path, values: Path | None) -> None:
    lint_is_clean(run_helm(helm, "lint", "--strict", str(OPERATOR_CHART), *(["-f", str(values)] if values else [])))


@pytest.mark.parametrize("values", sorted((INFERENCE_CHART / "ci").glob("*.yaml")), ids=lambda p: p.name)
def test_inference_chart_lints_clean(helm: Path, values: Path) -> None:
    lint_is_clean(run_helm(helm, "lint", "--strict", str(INFERENCE_CHART), "-f", str(values)))


def test_inference_chart_without_a_model_is_rejected_naming_it(helm: Path) -> None:
    result = run_helm(helm, "lint", str(INFERENCE_CHART))
    assert result.returncode != 0
    assert "model" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("chart", "args", "named"),
    [
        (OPERATOR_CHART, ["--set", "replicas=2"], "replicas"),
        (OPERATOR_CHART, ["--set", "metrics.service.portt=1"], "portt"),
        (OPERATOR_CHART, ["--set", "scope=everywhere"], "scope"),
        (INFERENCE_CHART, [*MINIMAL_INFERENCE, "--set", "modelName=x"], "modelName"),
        (INFERENCE_CHART, [*MINIMAL_INFERENCE, "--set", "ingress.enable=true"], "enable"),
        (INFERENCE_CHART, ["--set", "model=telechat3", "--set", "checkpoint.path=/x"], "model"),
        (INFERENCE_CHART, [*MINIMAL_INFERENCE, "--set", "devicesPerReplica=3"], "devicesPerReplica"),
        (INFERENCE_CHART, [*MINIMAL_INFERENCE, "--set", "maxBatchSize=1025"], "/maxBatchSize': maximum"),
        (INFERENCE_CHART, [*MINIMAL_INFERENCE, "--set", "maxBatchSize=-1"], "/maxBatchSize': minimum"),
        (INFERENCE_CHART, [*MINIMAL_INFERENCE, "--set-string", "warmUp=yes"], "/warmUp': got string, want boolean"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(helm: Path, chart: Path, args: list[str], named: str) -> None:
    assert named in render_error(helm, chart, *args)


def test_values_file_with_an_unknown_key_is_rejected(helm: Path, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("model: telechat2-7b\ncheckpoint:\n  path: /data/m\n  pathh: /typo\n")
    message = render_error(helm, INFERENCE_CHART, "-f", str(values))
    assert "pathh" in message and "additional properties" in message.lower()


# --- telechat-operator: what it renders ------------------------------------------------------------------------


def test_rendered_crds_are_the_repository_crds_kept_on_uninstall(helm: Path) -> None:
    crds = {crd["metadata"]["name"]: crd for crd in by_kind(render(helm, OPERATOR_CHART), "CustomResourceDefinition")}
    sources = [yaml.safe_load(path.read_text()) for path in sorted((REPO / "crds").glob("*.yaml"))]
    assert set(crds) == {source["metadata"]["name"] for source in sources}
    for source in sources:
        rendered = crds[source["metadata"]["name"]]
        assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert source["metadata"].get("labels", {}).items() <= rendered["metadata"]["labels"].items()
        rendered_metadata = {k: v for k, v in rendered["metadata"].items() if k not in ("labels", "annotations")}
        source_metadata = {k: v for k, v in source["metadata"].items() if k not in ("labels", "annotations")}
        assert rendered_metadata == source_metadata
        assert {k: v for k, v in rendered.items() if k != "metadata"} == {
            k: v for k, v in source.items() if k != "metadata"
        }


def test_crds_can_be_left_out_or_not_kept(helm: Path) -> None:
    assert not by_kind(render(helm, OPERATOR_CHART, "--set", "crds.enabled=false"), "CustomResourceDefinition")
    for crd in by_kind(render(helm, OPERATOR_CHART, "--set", "crds.keep=false"), "CustomResourceDefinition"):
        assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


def operator_container(docs: list[dict]) -> dict:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def parse_operator_args(container: dict) -> Any:
    """The operator's own argument parser accepts exactly what the chart passes."""
    from telechat_operator.__main__ import build_parser

    command = container["command"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] in scripts, f"{command[0]} is not a console script of the package"
    return build_parser().parse_args([*command[1:], *container["args"]])


def test_operator_deployment_runs_the_operator_non_root_with_probe_and_metrics(helm: Path) -> None:
    docs = render(helm, OPERATOR_CHART)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(docs)
    args = parse_operator_args(container)
    assert args.command == "run" and args.all_namespaces and not args.namespace
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert args.liveness == f"http://0.0.0.0:{ports[probe['port']]}{probe['path']}"
    assert args.metrics_port == ports["metrics"]
    service = one(docs, "Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert "helm.sh/chart" not in deployment["spec"]["selector"]["matchLabels"], "selector must not change on upgrade"
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]


def test_operator_options_reach_its_command_line(helm: Path) -> None:
    docs = render(
        helm,
        OPERATOR_CHART,
        *("--set", "peering.enabled=true", "--set", "replicaCount=2", "--set", "operator.verbose=true"),
        *("--set", "operator.logFormat=plain", "--set", "metrics.enabled=false"),
    )
    args = parse_operator_args(operator_container(docs))
    assert (args.peering, args.verbose, args.log_format, args.metrics_port) == ("telechat-operator", True, "plain", 0)
    assert not by_kind(docs, "Service")
    assert "strategy" not in one(docs, "Deployment")["spec"], "peered replicas may roll one by one"


def rbac_rules(docs: list[dict]) -> list[dict]:
    return [rule for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role") for rule in role["rules"]]


def test_rbac_has_no_wildcards_and_never_writes_spec(helm: Path) -> None:
    for args in ([], ["--set", "scope=namespace"], ["--set", "peering.enabled=true"]):
        rules = rbac_rules(render(helm, OPERATOR_CHART, *args))
        assert rules
        for rule in rules:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"wildcard in {field}: {rule}"
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate", "deletecollection"}
            if "telechat.io" in rule["apiGroups"]:
                writes = set(rule["verbs"]) & {"create", "update", "delete"}
                assert not writes, f"the operator must not create, replace or delete its own resources: {rule}"


def test_cluster_scope_binds_a_cluster_role(helm: Path) -> None:
    docs = render(helm, OPERATOR_CHART)
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": one(docs, "ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": one(docs, "ServiceAccount")["metadata"]["name"], "namespace": "telechat"}
    ]


def test_namespace_scope_binds_a_role_in_the_watched_namespace_only(helm: Path) -> None:
    docs = render(helm, OPERATOR_CHART, "--set", "scope=namespace", "--set", "watchNamespace=jobs")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "jobs"
    assert binding["subjects"][0]["namespace"] == "telechat", "the ServiceAccount lives in the release namespace"
    groups = {group for rule in role["rules"] for group in rule["apiGroups"]}
    assert "apiextensions.k8s.io" not in groups, "namespace scope needs no cluster-wide access"
    assert parse_operator_args(operator_container(docs)).namespace == ["jobs"]
    # Without watchNamespace the release namespace is watched.
    docs = render(helm, OPERATOR_CHART, "--set", "scope=namespace")
    assert one(docs, "Role")["metadata"]["namespace"] == "telechat"
    assert parse_operator_args(operator_container(docs)).namespace == ["telechat"]


def normalized_rules(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) triples: rules may be split or merged differently and still grant the same."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def test_chart_rbac_grants_exactly_what_the_operators_manifests_grant(helm: Path) -> None:
    deploy_dir = REPO / "operator" / "deploy"
    manifests = [
        doc for path in sorted(deploy_dir.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
    ]
    roles = [doc for doc in manifests if doc["kind"] in ("ClusterRole", "Role")]
    assert roles, f"no ClusterRole or Role under {deploy_dir}"
    expected = normalized_rules([rule for role in roles for rule in role["rules"]])
    assert normalized_rules(rbac_rules(render(helm, OPERATOR_CHART))) == expected


def test_preflight_rejects_contradictory_values(helm: Path) -> None:
    assert "watchNamespace" in render_error(helm, OPERATOR_CHART, "--set", "watchNamespace=jobs")
    assert "peering" in render_error(helm, OPERATOR_CHART, "--set", "replicaCount=2")


def test_names_are_truncated_to_63_characters(helm: Path) -> None:
    docs = render(helm, OPERATOR_CHART, release="r" * 53)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63
        for value in doc["metadata"].get("labels", {}).values():
            assert len(str(value)) <= 63


# --- telechat-inference: what it renders -----------------------------------------------------------------------


def crd_spec_properties() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "telechat.io_telechatinferences.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_minimal_inference_renders_only_what_was_set(helm: Path) -> None:
    docs = render(helm, INFERENCE_CHART, *MINIMAL_INFERENCE, release="tc7b")
    assert [doc["kind"] for doc in docs] == ["TeleChatInference"]
    inference = docs[0]
    assert inference["apiVersion"] == "telechat.io/v1alpha1"
    assert inference["metadata"]["name"] == "tc7b" and inference["metadata"]["namespace"] == "telechat"
    assert inference["spec"] == {
        "model": "telechat2-7b",
        "image": "telechat-runtime:0.1.0",
        "checkpoint": {"path": "/data/telechat2-7b"},
        "replicas": 1,
    }


def test_full_values_render_every_field_into_the_crds_schema(helm: Path) -> None:
    docs = render(helm, INFERENCE_CHART, "-f", str(INFERENCE_CHART / "ci" / "full-values.yaml"), release="tc35b")
    inference = one(docs, "TeleChatInference")
    spec = inference["spec"]
    unknown = set(spec) - set(crd_spec_properties())
    assert not unknown, f"the chart renders fields the CRD does not have: {unknown}"
    assert spec["checkpoint"] == {"fromFinetune": "ft-35b"}
    assert spec["image"] == "registry.example.com/telechat-runtime:0.1.0"
    assert spec["apiKeySecretRef"] == {"name": "telechat-api-key", "key": "token"}
    assert (spec["devicesPerReplica"], spec["maxSeqLen"], spec["seqLength"], spec["port"]) == (4, 16384, 16384, 1025)
    assert (spec["maxBatchSize"], spec["warmUp"]) == (16, False)
    assert "replicas" not in spec, "with autoscaling the HPA owns spec.replicas"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "telechat.io/v1alpha1",
        "kind": "TeleChatInference",
        "name": "tc35b",
    }
    assert [metric["type"] for metric in hpa["spec"]["metrics"]] == ["Pods"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == QUEUE_DEPTH_METRIC, "the server's metric name"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 8)
    ingress = one(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "tc35b", "port": {"number": 1025}}, "the Ingress points at the operator's Service"
    assert ingress["spec"]["tls"][0]["secretName"] == "telechat-tls"


@pytest.mark.parametrize(
    ("args", "rendered"),
    [
        ([], {}),  # maxBatchSize 0 and warmUp true: left out, the server's batch default and the CRD's warmUp apply
        (["--set", "warmUp=true", "--set", "maxBatchSize=0"], {}),
        (["--set", "warmUp=false"], {"warmUp": False}),
        (["--set", "maxBatchSize=32"], {"maxBatchSize": 32}),
        (["--set", "maxBatchSize=1", "--set", "warmUp=false"], {"maxBatchSize": 1, "warmUp": False}),
    ],
)
def test_batch_size_and_warm_up_render_only_when_set(helm: Path, args: list[str], rendered: dict[str, Any]) -> None:
    (inference,) = render(helm, INFERENCE_CHART, *MINIMAL_INFERENCE, *args)
    spec = inference["spec"]
    assert {key: spec[key] for key in ("maxBatchSize", "warmUp") if key in spec} == rendered


def test_every_inference_value_maps_to_a_crd_field() -> None:
    """Top-level values are either chart plumbing or a TeleChatInference spec field of the same name."""
    chart_only = {"global", "nameOverride", "fullnameOverride", "labels", "annotations", "ingress", "autoscaling"}
    values = set(json.loads((INFERENCE_CHART / "values.schema.json").read_text())["properties"])
    spec_fields = set(crd_spec_properties())
    assert values - chart_only - spec_fields == set()
    assert spec_fields - values <= {"imagePullPolicy"}, f"CRD fields the chart cannot set: {spec_fields - values}"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "model=telechat2-7b"], "checkpoint"),
        ([*MINIMAL_INFERENCE, "--set", "checkpoint.fromFinetune=ft"], "only one"),
        ([*MINIMAL_INFERENCE, "--set", "fullnameOverride=" + "a" * 41], "fullnameOverride"),
        (
            [*MINIMAL_INFERENCE, "--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=5"],
            "minReplicas",
        ),
        (
            [
                *MINIMAL_INFERENCE,
                "--set",
                "autoscaling.enabled=true",
                "--set",
                "autoscaling.targetCPUUtilizationPercentage=0",
            ],
            "metric",
        ),
    ],
)
def test_inference_preflight_names_the_problem(helm: Path, args: list[str], named: str) -> None:
    assert named in render_error(helm, INFERENCE_CHART, *args)


def test_release_name_that_is_not_a_dns_label_is_rejected(helm: Path) -> None:
    result = run_helm(helm, "template", "TC-7b", str(INFERENCE_CHART), *MINIMAL_INFERENCE)
    assert result.returncode != 0


def test_peering_ships_kopfs_crds_and_creates_the_peering_object_for_the_scope(helm: Path) -> None:
    peering_crds = list(yaml.safe_load_all((OPERATOR_CHART / "crds" / "kopf-peering.yaml").read_text()))
    assert {(c["spec"]["group"], c["spec"]["names"]["kind"], c["spec"]["scope"]) for c in peering_crds} == {
        ("kopf.dev", "ClusterKopfPeering", "Cluster"),
        ("kopf.dev", "KopfPeering", "Namespaced"),
    }
    assert not by_kind(render(helm, OPERATOR_CHART), "ClusterKopfPeering")

    cluster = one(render(helm, OPERATOR_CHART, "--set", "peering.enabled=true"), "ClusterKopfPeering")
    assert cluster["apiVersion"] == "kopf.dev/v1"
    assert cluster["metadata"]["name"] == "telechat-operator"
    assert "namespace" not in cluster["metadata"]

    docs = render(
        helm, OPERATOR_CHART, "--set", "peering.enabled=true", "--set", "scope=namespace", "--set", "watchNamespace=llm"
    )
    assert not by_kind(docs, "ClusterKopfPeering")
    namespaced = one(docs, "KopfPeering")
    assert namespaced["metadata"]["namespace"] == "llm"
    args = operator_container(docs)["args"]
    assert "--peering=telechat-operator" in args


def test_allowed_host_paths_reach_the_operator_environment(helm: Path) -> None:
    def allowed(*args: str) -> str:
        env = {e["name"]: e.get("value") for e in operator_container(render(helm, OPERATOR_CHART, *args))["env"]}
        return env["TELECHAT_OPERATOR_ALLOWED_HOSTPATHS"]

    assert allowed() == ""
    assert allowed("--set", "hostPaths.allowed={/mnt/telechat,/data}") == "/mnt/telechat,/data"
    assert "hostPaths" in render_error(helm, OPERATOR_CHART, "--set", "hostPaths.allowed={relative}")


QUEUE_DEPTH_METRIC = "telechat_queue_depth"


def test_hpa_queue_metric_is_the_one_the_server_exports() -> None:
    """The chart's default Pods metric must be a gauge `telechat2 serve` puts on /metrics (it once said telechat2_)."""
    from telechat2.serve.metrics import ServerMetrics

    values = yaml.safe_load((INFERENCE_CHART / "values.yaml").read_text())
    assert values["autoscaling"]["queueDepthMetric"] == QUEUE_DEPTH_METRIC
    exported = {family.name for family in ServerMetrics(lambda: 0, lambda: 0, lambda: True).registry.collect()}
    assert QUEUE_DEPTH_METRIC in exported
