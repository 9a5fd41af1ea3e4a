"""Shared pytest wiring: tests under tests/unit are marked `unit`, tests under tests/e2e are marked `e2e`."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS_DIR).parts
        if parts and parts[0] == "unit":
            item.add_marker(pytest.mark.unit)
        elif parts and parts[0] == "e2e":
            item.add_marker(pytest.mark.e2e)
