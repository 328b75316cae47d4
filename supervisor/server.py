"""Runs the application until SIGTERM or SIGINT, then shuts down in order.

Order matters: stop accepting connections, let handlers finish (bounded), then retire every
worker (the manager's cleanup), so no worker outlives the server. The real listening address
is logged, which matters when port 0 asked the kernel to pick one, and so is the dashboard's
URL (``/ui``).

What can be checked before anything starts is checked first, and fails as one line
(:class:`supervisor.rundir.StartupError`, shown by the CLI without a traceback): the data dir
must be writable and the port free. The port is probed before the app starts, so a second
``lemonade serve`` on a taken port starts no zygote and no preload before it gives up.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from supervisor.api.app import create_app
from supervisor.api.config_reload import reload_now
from supervisor.api.dashboard import UI_PATH
from supervisor.api.keys import MANAGER, RELOADER
from supervisor.config import Settings
from supervisor.config_values import ConfigError
from supervisor.errors import BadRequest
from supervisor.rundir import StartupError, prepare_data_dir
from supervisor.slow_clients import GuardedRunner
from workers import proctitle

log = logging.getLogger(__name__)

#: How long in-flight HTTP requests get to finish when the server is asked to stop.
SHUTDOWN_TIMEOUT_S = 10.0
#: An idle keep-alive connection is closed after this (nginx uses 75 s too).
KEEPALIVE_TIMEOUT_S = 75.0

__all__ = ["SHUTDOWN_TIMEOUT_S", "StartupError", "serve"]


async def serve(settings: Settings, reloader: Callable[[], Settings] | None = None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the config (``reloader``) and applies it."""
    proctitle.server()
    prepare_data_dir(settings.data_dir)
    _probe_port(settings.host, settings.port)
    if settings.config_path is None:
        log.warning("%s", _no_config_line(settings))
    try:
        # Reads the devices: a recipe on a missing GPU stops here.
        app = create_app(settings, reloader=reloader)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    # Slow clients: a header deadline and a connection cap in front of aiohttp, and an idle
    # keep-alive connection closed after 75 s (aiohttp's own default is an hour).
    runner = GuardedRunner(app, header_timeout_s=settings.header_timeout_s,
                           max_connections=settings.max_connections,
                           handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT_S)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_on_hangup, app)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as e:  # lost a race with another process since the probe, or the probe
            raise StartupError(_listen_line(settings.host, settings.port, e)) from None
        for address in runner.addresses:
            host, port = address[0], address[1]
            shown = f"[{host}]" if ":" in host else host
            log.info("lemonade %s listening on http://%s:%d", _models_line(settings), shown, port)
        if runner.addresses:
            host, port = runner.addresses[0][0], runner.addresses[0][1]
            log.info("dashboard: http://%s:%d%s", _browsable(host), port, UI_PATH)
        await stop.wait()
        log.info("shutting down: finishing requests, then stopping every worker")
    finally:
        await runner.cleanup()


def _reload_on_hangup(app: web.Application) -> None:
    """SIGHUP: the same reload as ``POST /api/v1/reload``; the outcome goes to the log."""
    log.info("SIGHUP: reloading the config")
    try:
        reload_now(app[MANAGER], app[RELOADER])
    except BadRequest:
        pass  # reload_now logged why, naming file and key; the running config stays


def _probe_port(host: str, port: int) -> None:
    """Fail now if ``host:port`` cannot be bound: in use, or not ours to take.

    Binds each address the host resolves to with the options asyncio's server uses
    (``SO_REUSEADDR``, v6-only), then lets go. Other errors (an address family the machine
    lacks) are left to the real bind, which knows which of them to skip.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # the real bind reports a name that does not resolve
    for family, type_, proto, _, address in infos:
        with socket.socket(family, type_, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise StartupError(_listen_line(host, port, e)) from None


def _listen_line(host: str, port: int, error: OSError) -> str:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return (f"cannot listen on {shown}: address already in use "
                "(is another server running? pick another with --port)")
    if error.errno == errno.EACCES:
        return (f"cannot listen on {shown}: permission denied "
                "(ports below 1024 need privileges; pick another with --port)")
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {shown}: address not available "
                "(is it an address of this machine? pick another with --host)")
    reason = (error.strerror or str(error)).lower()
    return f"cannot listen on {shown}: {reason}"


def _no_config_line(settings: Settings) -> str:
    looked = Path.cwd() / "lemonade.toml"
    start = (f"starting with the {len(settings.models)} model(s) of the recipe files"
             if settings.models else "starting with no models")
    return (f"no config file found: no --config, no LEMONADE_CONFIG, and no {looked}; "
            f"{start}")


def _browsable(host: str) -> str:
    """The host of a URL a browser on this machine can open: a wildcard bind (``0.0.0.0``,
    ``::``) is reached through the loopback address."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _models_line(settings: Settings) -> str:
    names = ", ".join(settings.models) or "no models"
    return f"({len(settings.models)} configured: {names})"
