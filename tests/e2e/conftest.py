"""End-to-end fixtures: a fresh namespace per test (the `cluster` fixture lives in tests/conftest.py).

Helpers for tests live in importable modules, e.g. `tests.cluster.waiting.wait_for`: importing this conftest
from a test module would load it a second time, under another name.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ClusterHandle
from tests.cluster.waiting import wait_for


@pytest.fixture
def namespace(cluster: ClusterHandle) -> Iterator[str]:
    """A namespace of its own for one test, usable for pods (its `default` ServiceAccount exists); deleted after."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", f"--namespace={name}", check=False).returncode == 0,
        f"the default ServiceAccount in namespace {name}",
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
