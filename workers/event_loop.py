"""The event loop every Lemonade process runs on: uvloop when installed, asyncio's otherwise.

A request crosses three event loops (the router's, the worker's, and back), each turning
several times per small call, so the loop's own cost is a visible share of the hop. uvloop
(libuv) runs the same asyncio code with a cheaper loop; nothing here depends on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

try:
    import uvloop

    _HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
    _HAVE_UVLOOP = False


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the fastest loop available."""
    if _HAVE_UVLOOP:
        result: T = uvloop.run(main)
        return result
    return asyncio.run(main)


def name() -> str:
    return "uvloop" if _HAVE_UVLOOP else "asyncio"
