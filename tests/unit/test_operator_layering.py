"""The finetune operator's layering: pure modules import no client, only `k8s.py` talks to the API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "telechat_operator"
PURE = [
    "constants.py",
    "spec.py",
    "status.py",
    "builders/names.py",
    "builders/common.py",
    "builders/configmap.py",
    "builders/service.py",
    "builders/podgroup.py",
    "builders/pods.py",
    "builders/initializer.py",
    "crd_rules.py",
]
CLIENTS = ("kubernetes", "kopf", "urllib3", "aiohttp", "telechat_operator.k8s", "telechat_operator.handlers")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_client(module: str) -> None:
    imports = imported_modules(PACKAGE / module)
    offending = sorted(name for name in imports if name.startswith(CLIENTS))
    assert offending == [], f"{module} imports {offending}"


def test_only_k8s_py_imports_the_kubernetes_client_among_the_finetune_modules() -> None:
    finetune_modules = [*PURE, "handlers/finetune.py", "workqueue.py", "settings.py", "metrics.py", "__main__.py"]
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
