"""Shared fixtures. The leak guard runs after every test: a test that leaves a child process,
a zombie or an open file descriptor behind fails, whatever it asserted itself."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest

_SETTLE_S = 5.0


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


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    me = psutil.Process()
    before_children = {p.pid for p in me.children(recursive=True)}
    before_fds = _open_fds()
    yield
    deadline = time.monotonic() + _SETTLE_S
    while True:
        children = [p for p in me.children(recursive=True) if p.pid not in before_children]
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
    if problems:
        pytest.fail("test left things behind: " + "; ".join(problems))
