"""Fixtures for the Ray tests: one two-node cluster shared by every Ray test of the session
(a cold start costs 5-20 s), and a loopback-only network namespace of a test's own.

Tests that need them carry ``@pytest.mark.ray`` and skip, with the reason, where the machine
cannot run them (not root, no unshare/nsenter/ip, ray not importable).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.ray_harness import LoopbackNetns, RayTestCluster, unavailable_reason

try:  # the leak guard's registry of long-lived process trees (tests/conftest.py)
    from tests.helpers import LONG_LIVED_PROCESSES
except ImportError:  # pragma: no cover - an older tree without the registry
    LONG_LIVED_PROCESSES = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if item.get_closest_marker("ray") is None:
            continue
        reason = reason or unavailable_reason() or ""
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def _skip_unless_available() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def _ray_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayTestCluster]:
    _skip_unless_available()
    cluster = RayTestCluster(tmp_path_factory.getbasetemp(), owned=LONG_LIVED_PROCESSES)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def ray_cluster(_ray_cluster_session: RayTestCluster) -> RayTestCluster:
    """The shared cluster, both nodes running: a node an earlier test killed (and did not
    restart) is started again first."""
    cluster = _ray_cluster_session
    for name in cluster.specs:
        if not cluster.alive(name):
            cluster.restart_node(name)
    return cluster


@pytest.fixture
def loopback_netns() -> Iterator[LoopbackNetns]:
    """A fresh loopback-only network namespace (its holder ended after the test)."""
    _skip_unless_available()
    with LoopbackNetns() as netns:
        yield netns
