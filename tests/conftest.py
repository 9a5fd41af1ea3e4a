"""Shared pytest wiring.

Tests under tests/unit are marked `unit`, tests under tests/e2e `e2e`, tests under tests/e2e_real `real`.
The session fixture `cluster` is the local control plane (`tests/cluster`): started the first time a test asks
for it, stopped at session end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the cluster tooling needs `cryptography`; unit-only runs should not import it
    from tests.cluster.controlplane import ClusterHandle

TESTS_DIR = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in pyproject.toml: a pyproject change makes every checkout's ensure_venv reinstall.
    config.addinivalue_line("markers", "real: end-to-end tests on real nodes (containerd + kubelet, root; e2e_real)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS_DIR).parts
        if parts and parts[0] == "unit":
            item.add_marker(pytest.mark.unit)
        elif parts and parts[0] == "e2e":
            item.add_marker(pytest.mark.e2e)
        elif parts and parts[0] == "e2e_real":
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterHandle]:
    """The local cluster: `.kubeconfig`, `.api_client()`, `.kubectl(*args)`, `.bin_dir`, `.state_dir`.

    Set TELECHAT_CLUSTER_KUBECONFIG to reuse a running cluster instead of starting one.
    """
    from tests.cluster.session import session_cluster

    with session_cluster() as handle:
        yield handle
