"""Readable process titles: ``lemonade worker kokoro`` in ``ps``, not ``python -m workers.zygote``.

Every worker and zygote is a Python interpreter, and a forked worker even carries its
zygote's command line, so ``ps``/``top`` could not tell which process holds which model.
Each process sets two names: the command line (``/proc/PID/cmdline``, what ``ps -f`` and
``psutil.Process.cmdline()`` show) through the ``setproctitle`` package, and the short name
(``/proc/PID/comm``, 15 bytes at most, what ``top`` and ``psutil.Process.name()`` show)
through ``prctl(PR_SET_NAME)``. The short names are ``lw:<model>`` for a worker and
``lz:<kind>`` for a zygote, since "lemonade worker" alone fills the 15 bytes.

Titles are cosmetic: every failure here is ignored, and without ``setproctitle`` only the
short name changes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

#: Linux's limit for /proc/PID/comm, without the terminating NUL.
COMM_MAX = 15
_PR_SET_NAME = 15

# setproctitle normally moves the environment out of the way to make room for a long title,
# which leaves /proc/PID/environ unreadable; our titles fit in the original command line.
os.environ.setdefault("SPT_NOENV", "1")

_setproctitle: Any
try:
    import setproctitle as _setproctitle
except ImportError:  # pragma: no cover - a declared dependency; titles are only cosmetic
    _setproctitle = None


def _set_comm(name: str) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        # dlopen(NULL): the symbols already loaded, libc's prctl among them. (find_library
        # would run ldconfig in a subprocess on every call.)
        libc = ctypes.CDLL(None, use_errno=True)
        # The kernel truncates to 15 bytes itself; cut on characters to keep UTF-8 whole.
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name[:COMM_MAX].encode()[:COMM_MAX]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def set_title(title: str, short: str) -> None:
    """Show this process as ``title`` (command line) and ``short`` (its 15-byte name).

    Call it from the main thread: the short name belongs to the calling thread, and the
    process's name is its main thread's.
    """
    if _setproctitle is not None:
        try:
            _setproctitle.setproctitle(title)
        except Exception:  # a title must never stop a worker
            pass
    _set_comm(short)


def worker(model: str | None, kind: str) -> None:
    """``lemonade worker <model>`` (``lemonade worker [<kind>]`` until the model is known)."""
    if model:
        set_title(f"lemonade worker {model}", f"lw:{model}")
    else:
        set_title(f"lemonade worker [{kind}]", f"lw:[{kind}]")


def zygote(kind: str) -> None:
    set_title(f"lemonade zygote {kind}", f"lz:{kind}")


def server(command: str = "serve") -> None:
    set_title(f"lemonade {command}", "lemonade")
