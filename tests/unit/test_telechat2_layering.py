"""telechat2's layering: no import cycles, and library modules never import the CLI modules behind subcommands.

Rules, over every module under telechat2/:
1. the import graph has no cycle;
2. no LIBRARY module (or module inside a LIBRARY package) imports a CLI module: one named in cli.py's SUBCOMMANDS
   table, or cli.py itself. CLI modules may import library modules (and each other); library code shared by
   several subcommands lives in a library module, never in the CLI module of one of them;
3. the module behind `telechat2 <name>` is `telechat2.<name>` (`serve` is the `telechat2.serve` package's app).

The graph holds every import of every telechat2 module, at module level and inside functions (a deferred import is
still a dependency: it only moves the failure to run time). `from telechat2 import x` counts as importing the
submodule `telechat2.x` when there is one, and importing `a.b.c` also depends on the packages `a.b` and `a`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "telechat2"

# Library modules (and packages: every module under them): what the CLI modules are built from. None of them may
# import a module that cli.py dispatches to (`cli.SUBCOMMANDS`), nor cli.py itself.
LIBRARY = (
    "telechat2.loading",
    "telechat2.msrun",
    "telechat2.modeling",
    "telechat2.batched",
    "telechat2.generation",
    "telechat2.tensor_parallel",
    "telechat2.checkpoint_io",
    "telechat2.weights",
    "telechat2.tokenizer",
    "telechat2.chat",
    "telechat2.configuration",
    "telechat2.configs",
    "telechat2.serve.engine",
    "telechat2.serve.scheduler",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The telechat2 modules `name` imports anywhere in its file (resolved to modules that exist)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            for end in range(1, len(parts) + 1):  # a.b.c imports a.b and a too
                prefix = ".".join(parts[:end])
                if prefix in modules and prefix != name:
                    found.add(prefix)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. Package -> own submodule edges (an __init__ re-export) and
    submodule -> own package edges are ignored: Python loads a package before its submodules either way."""

    def edges(node: str) -> list[str]:
        return sorted(t for t in graph[node] if not t.startswith(node + ".") and not node.startswith(t + "."))

    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in edges(node):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def cli_modules() -> set[str]:
    """The modules behind `telechat2 <subcommand>`, read from cli.py's SUBCOMMANDS table (without importing it)."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "SUBCOMMANDS":
            table = ast.literal_eval(node.value)
            return {module for module, _ in table.values()} | {"telechat2.cli"}
    raise AssertionError("cli.py has no SUBCOMMANDS table")


def is_library(name: str) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in LIBRARY)


def test_the_graph_sees_function_level_and_package_imports() -> None:
    graph = import_graph()
    assert "telechat2.configs" in graph["telechat2.describe"]  # `from telechat2 import configs`
    assert "telechat2.tensor_parallel" in graph["telechat2.loading"]  # imported inside load_model
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_telechat2_has_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_library_modules_import_no_cli_module() -> None:
    graph = import_graph()
    commands = cli_modules()
    library = sorted(name for name in graph if is_library(name))
    offending = [f"{name} imports {target}" for name in library for target in sorted(graph[name] & commands)]
    assert offending == [], "library modules import CLI modules:\n" + "\n".join(offending)
    assert set(LIBRARY) <= set(graph), f"LIBRARY names modules that do not exist: {sorted(set(LIBRARY) - set(graph))}"


def test_modules_are_named_after_their_subcommands() -> None:
    """`telechat2 <name>` runs telechat2.<name> (hyphens as underscores); serve is the serve package's app."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    table = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "SUBCOMMANDS"
    )
    expected = {name: f"telechat2.{name.replace('-', '_')}" for name in table} | {"serve": "telechat2.serve.app"}
    assert {name: module for name, (module, _) in table.items()} == expected
