"""Typed keys for what the aiohttp application carries (``app[MANAGER]`` and friends)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from supervisor.config import Settings
from supervisor.manager import Manager
from supervisor.metrics import Metrics

SETTINGS = web.AppKey("settings", Settings)
MANAGER = web.AppKey("manager", Manager)
METRICS = web.AppKey("metrics", Metrics)
STARTED_AT = web.AppKey("started_at", float)
#: Set when the server starts shutting down, so open event streams end instead of holding it up.
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
#: Builds the settings again from the same files, flags and environment (config reload).
RELOADER: web.AppKey[Callable[[], Settings]] = web.AppKey("reloader")
