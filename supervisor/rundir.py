"""The supervisor's private runtime directory, the sweep of ones left by dead supervisors, and
the start-up check of the data dir.

Worker sockets live here. It is made with ``mkdtemp`` (mode 0700) under ``$XDG_RUNTIME_DIR``
or the temp dir, with a short path because a socket path must fit in 108 bytes. An ``owner``
file records the supervisor's pid and start time, so a later supervisor can tell a stale dir
(its owner is gone, or the pid was reused by another process) from a live one.

The data dir (worker caches: converted weights, optimised graphs) is written by workers, long
after the start; :func:`prepare_data_dir` creates and test-writes it before the server
listens, so a path that cannot work fails the start in one line instead of failing a load.
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
_DATA_DIR_HINT = "pick another with --data-dir or LEMONADE_DATA_DIR"


class StartupError(Exception):
    """The server cannot start; the message is one line fit to show the user as it is."""


def prepare_data_dir(path: str | Path) -> Path:
    """Create the data dir (mode 0700) if needed and check that files can be made in it.

    Raises :class:`StartupError` naming the path and the reason. The check writes a file
    rather than asking ``os.access``, which says yes to root on a read-only filesystem.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise StartupError(f"the data dir {folder} exists but is not a folder "
                           f"({_DATA_DIR_HINT})") from None
    except OSError as e:
        raise StartupError(f"cannot create the data dir {folder}: "
                           f"{(e.strerror or str(e)).lower()} ({_DATA_DIR_HINT})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    except OSError as e:
        raise StartupError(f"cannot write in the data dir {folder}: "
                           f"{(e.strerror or str(e)).lower()} ({_DATA_DIR_HINT})") from None
    os.close(fd)
    os.unlink(probe)
    return folder


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
