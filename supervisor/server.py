"""Runs the application until SIGTERM or SIGINT, then shuts down in order.

Order matters: stop accepting connections, let handlers finish (bounded), then retire every
worker (the manager's cleanup), so no worker outlives the server. The real listening address
is logged, which matters when port 0 asked the kernel to pick one.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from supervisor.api.app import create_app
from supervisor.config import Settings

log = logging.getLogger(__name__)

#: How long in-flight HTTP requests get to finish when the server is asked to stop.
SHUTDOWN_TIMEOUT_S = 10.0


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            shown = f"[{host}]" if ":" in host else host
            log.info("lemonade %s listening on http://%s:%d", _models_line(settings), shown, port)
        await stop.wait()
        log.info("shutting down: finishing requests, then stopping every worker")
    finally:
        await runner.cleanup()


def _models_line(settings: Settings) -> str:
    names = ", ".join(settings.models) or "no models"
    return f"({len(settings.models)} configured: {names})"
