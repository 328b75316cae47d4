"""Shared fixtures. The leak guard runs after every test: a test that leaves a child process,
a zombie or an open file descriptor behind fails, whatever it asserted itself. It also audits
every supervisor ``Manager`` the test started (in this process): it must have been closed,
with no timer armed, nothing in flight, no reservation held and no task left running
(``Manager.audit()``).

A module-scoped fixture whose process tree changes on its own between tests (the dashboard
tests' browser starts and ends renderer processes) registers its root in
``tests.helpers.LONG_LIVED_PROCESSES``; that tree is the fixture's to end, not a test's leak.

``--soak`` (or ``LEMONADE_SOAK=1``) switches the stateful and fault tests to their nightly
sizes; ``soak_size(pr, nightly)`` picks the number.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest

from supervisor.manager import LIVE_MANAGERS
from tests.helpers import LONG_LIVED_PROCESSES

_SETTLE_S = 5.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the stateful and fault tests at their nightly (soak) sizes")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--soak"):
        os.environ["LEMONADE_SOAK"] = "1"


def soak_size(pr: int, nightly: int) -> int:
    """``pr`` normally; ``nightly`` under ``--soak`` / ``LEMONADE_SOAK=1``."""
    return nightly if os.environ.get("LEMONADE_SOAK") == "1" else pr


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _describe_fds(fds: set[int]) -> str:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd} (closed meanwhile)")
    return ", ".join(out)


def _long_lived(process: psutil.Process) -> bool:
    """Whether ``process`` belongs to a registered long-lived tree (see the docstring)."""
    if not LONG_LIVED_PROCESSES:
        return False
    try:
        return any(p.pid in LONG_LIVED_PROCESSES for p in process.parents())
    except psutil.Error:
        return True  # gone meanwhile


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    before_fds = _open_fds()
    before_managers = {id(m) for m in LIVE_MANAGERS}
    yield
    manager_problems = []
    for manager in list(LIVE_MANAGERS):
        if id(manager) in before_managers or manager.runtime_dir is None:
            continue  # older, or never started (no process, no timer, no task)
        if not manager.closed:
            manager_problems.append("a Manager was started and never closed")
            continue
        manager_problems += manager.audit()
    deadline = time.monotonic() + _SETTLE_S
    while True:
        children = [p for p in me.children(recursive=True)
                    if p.pid not in before_children and not _long_lived(p)]
        leaked_fds = _open_fds() - before_fds
        if (not children and not leaked_fds) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    for child in children:
        try:
            status = child.status()
            cmd = " ".join(child.cmdline())[:120]
        except psutil.Error:
            continue
        kind = "zombie" if status == psutil.STATUS_ZOMBIE else "child process"
        problems.append(f"{kind} {child.pid} ({cmd})")
        if status != psutil.STATUS_ZOMBIE:
            child.kill()
    if leaked_fds:
        problems.append(f"leaked file descriptors: {_describe_fds(leaked_fds)}")
    problems += manager_problems
    if problems:
        pytest.fail("test left things behind: " + "; ".join(problems))
