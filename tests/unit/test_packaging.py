"""The layout rules the repository must keep: `operator/` never shadows the standard library's `operator`, and the
console scripts name callables that exist."""

from __future__ import annotations

import importlib
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_operator_folder_is_not_a_package() -> None:
    assert (REPO / "operator" / "telechat_operator" / "__init__.py").is_file()
    assert not (REPO / "operator" / "__init__.py").exists()


def test_importing_operator_from_the_repo_root_gives_the_standard_library() -> None:
    # Run from the repository root, where a package named `operator` would win over the standard library.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            # The interpreter imports `operator` while starting up: forget it, put the repo first, import it again.
            "import sys; sys.modules.pop('operator', None); sys.path.insert(0, '.'); import operator; "
            "print(operator.__file__)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    module_file = Path(result.stdout.splitlines()[0]).resolve()
    assert module_file.parent == Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_console_scripts_name_existing_callables() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"telechat-operator", "telechat2"}
    for target in scripts.values():
        module_name, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module_name), attribute)), target
