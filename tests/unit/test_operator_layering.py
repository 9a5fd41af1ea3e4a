"""The operator's layering: pure modules import no client, only `k8s.py` talks to the API, and the packages stack.

Rules, over every module under operator/telechat_operator/:
1. `common` imports neither `finetune` nor `inference`; `finetune` and `inference` never import each other (what both
   need lives in `common`);
2. the PURE modules (spec, status, decisions and builders of both kinds, and the shared core) import no client:
   not kopf, not the kubernetes client, not `k8s.py`, not a controller or handler module;
3. only `k8s.py` imports the kubernetes client;
4. the import graph has no cycle.

The graph holds every import of every module, at module level and inside functions (a deferred import is still a
dependency: it only moves the failure to run time), as tests/unit/test_telechat2_layering.py does for telechat2.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.unit.test_telechat2_layering import find_cycle

ROOT = Path(__file__).resolve().parents[2] / "operator"
PACKAGE = ROOT / "telechat_operator"
PURE = [
    "common/constants.py",
    "common/conditions.py",
    "common/objects.py",
    "common/spec.py",
    "common/launch.py",
    "common/pods.py",
    "common/refusals.py",
    "finetune/spec.py",
    "finetune/spec_changes.py",
    "finetune/status.py",
    "finetune/decide.py",
    "finetune/progress.py",
    "finetune/names.py",
    "finetune/configmap.py",
    "finetune/service.py",
    "finetune/podgroup.py",
    "finetune/pods.py",
    "finetune/initializer.py",
    "inference/constants.py",
    "inference/spec.py",
    "inference/status.py",
    "inference/builders.py",
    "inference/groups.py",
    "inference/plan.py",
    "crd_rules.py",
]
CLIENTS = (
    "kubernetes",
    "kopf",
    "urllib3",
    "aiohttp",
    "telechat_operator.k8s",
    "telechat_operator.handlers",
    "telechat_operator.finetune.handlers",
    "telechat_operator.finetune.controller",
    "telechat_operator.finetune.progress_poll",
    "telechat_operator.inference.handlers",
    "telechat_operator.inference.controller",
)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the telechat_operator modules it imports anywhere in its file (`a.b.c` also imports `a.b`, `a`)."""
    modules = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for target in imported_modules(path):
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix in modules and prefix != name:
                    found.add(prefix)
        graph[name] = found
    return graph


def test_every_pure_module_exists() -> None:
    """A renamed module must not drop out of the checks below unnoticed."""
    assert [m for m in PURE if not (PACKAGE / m).is_file()] == []


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_client(module: str) -> None:
    imports = imported_modules(PACKAGE / module)
    offending = sorted(name for name in imports if name.startswith(CLIENTS))
    assert offending == [], f"{module} imports {offending}"


def test_only_k8s_py_imports_the_kubernetes_client_among_the_finetune_modules() -> None:
    finetune_modules = [
        *PURE,
        "finetune/handlers.py",
        "finetune/controller.py",
        "common/workqueue.py",
        "common/settings.py",
        "common/metrics.py",
        "__main__.py",
    ]
    users = [m for m in finetune_modules if any(n.startswith("kubernetes") for n in imported_modules(PACKAGE / m))]
    assert users == []
    assert "kubernetes" in imported_modules(PACKAGE / "k8s.py")


def test_only_k8s_py_talks_to_the_api_in_the_whole_package() -> None:
    """Both kinds' controllers share one API module: no other module imports the client or k8s's private names."""
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "k8s.py")
    users = [p.name for p in modules if any(name.startswith("kubernetes") for name in imported_modules(p))]
    assert users == []
    private = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "k8s"
                and node.attr.startswith("_")
            ):
                private.append(f"{path.relative_to(PACKAGE)}: k8s.{node.attr}")
    assert private == []
    assert not (PACKAGE / "inference_k8s.py").exists()


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("telechat_operator.common", ("telechat_operator.finetune", "telechat_operator.inference")),
        ("telechat_operator.finetune", ("telechat_operator.inference",)),
        ("telechat_operator.inference", ("telechat_operator.finetune",)),
    ],
)
def test_the_packages_stack(package: str, forbidden: tuple[str, ...]) -> None:
    """common is below both kinds; a kind reaches the other only through common."""
    graph = import_graph()
    offending = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module == package or module.startswith(package + ".")
        for target in targets
        if any(target == other or target.startswith(other + ".") for other in forbidden)
    )
    assert offending == []


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "telechat_operator.finetune.controller" in graph["telechat_operator.finetune.handlers"]  # the graph is read
    assert find_cycle(graph) is None


def test_the_cycle_check_sees_function_level_imports(tmp_path: Path) -> None:
    """The checks read imports inside functions too: a deferred import is still a dependency."""
    (tmp_path / "a.py").write_text("def f():\n    from telechat_operator.inference import plan\n")
    assert "telechat_operator.inference.plan" in imported_modules(tmp_path / "a.py")
    assert find_cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]
