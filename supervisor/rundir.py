"""The supervisor's private runtime directory, and the sweep of ones left by dead supervisors.

Worker sockets live here. It is made with ``mkdtemp`` (mode 0700) under ``$XDG_RUNTIME_DIR``
or the temp dir, with a short path because a socket path must fit in 108 bytes. An ``owner``
file records the supervisor's pid and start time, so a later supervisor can tell a stale dir
(its owner is gone, or the pid was reused by another process) from a live one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

RUNTIME_DIR_PREFIX = "lemonade-"
_OWNER_FILE = "owner"


def create_runtime_dir(base: str | None = None) -> Path:
    root = Path(base or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    sweep_stale_runtime_dirs(root)
    path = Path(tempfile.mkdtemp(prefix=RUNTIME_DIR_PREFIX, dir=root))
    os.chmod(path, 0o700)
    (path / _OWNER_FILE).write_text(f"{os.getpid()} {_create_time(os.getpid())}\n")
    return path


def _create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def sweep_stale_runtime_dirs(base: Path) -> list[Path]:
    """Remove runtime dirs left by supervisors that died (their owner pid is gone)."""
    removed = []
    uid = os.getuid()
    for path in base.glob(f"{RUNTIME_DIR_PREFIX}*"):
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != uid:
                continue
            owner = (path / _OWNER_FILE).read_text().split()
            pid, created = int(owner[0]), float(owner[1])
        except (OSError, ValueError, IndexError):
            continue
        if psutil.pid_exists(pid) and abs(_create_time(pid) - created) < 1.0:
            continue  # a live supervisor owns it
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log.info("removed stale runtime dir %s (owner %d is gone)", path, pid)
    return removed
