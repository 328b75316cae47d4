"""The ``lemonade`` command: ``serve`` runs the server; the rest talk to a running one.

``serve`` flags map one to one onto config fields; the environment variables are read by
``config.load_settings`` (not by click), so precedence stays CLI > env > file > defaults and
status can say which level set each value. Client commands use only the standard library's
HTTP client and print a clear message when no server answers.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import click

from supervisor.cli_progress import LoadWatcher, loading_lines, state_cell
from supervisor.config import ConfigError, load_settings
from supervisor.units import format_bytes, format_duration

_LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lemonade-supervisor")
def main() -> None:
    """Lemonade Supervisor: one worker process per model, unloaded when idle."""


# ===================================================================== serve


@main.command()
@click.option("--host", help="Address to bind. [env LEMONADE_HOST; default 127.0.0.1]")
@click.option("--port", help="Port to bind; 0 picks a free one. [env LEMONADE_PORT; default 8000]")
@click.option("--config", "config",
              help="Config file. [env LEMONADE_CONFIG; default ./lemonade.toml]")
@click.option("--recipes", multiple=True,
              help="Extra recipe file with [models.*] tables; repeatable. [env LEMONADE_RECIPES]")
@click.option("--auto-unload-timer",
              help='Global idle timeout: seconds, "5m", "1h30m"; 0 = never. '
                   "[env LEMONADE_GLOBAL_AUTO_UNLOAD_TIMER; default 300]")
@click.option("--max-loaded-models",
              help="Most models resident at once; -1 = unlimited. [env LEMONADE_MAX_LOADED_MODELS]")
@click.option("--memory-budget",
              help='RAM all models may use (the cpu device\'s budget): "12GiB", "auto" or "none". '
                   "[env LEMONADE_MEMORY_BUDGET]")
@click.option("--device-budget", "device_budget", multiple=True,
              help='Budget of a GPU or NPU, DEVICE=SIZE: "cuda:0=16GiB", "cuda:1=auto"; '
                   "repeatable. [env LEMONADE_DEVICE_BUDGETS, comma-separated]")
@click.option("--vram-release-wait",
              help="After a GPU worker exits, the next load on that GPU waits at most this long "
                   'for its memory to show free: "5s". [env LEMONADE_VRAM_RELEASE_WAIT]')
@click.option("--preload", multiple=True,
              help="Model to load at start; repeatable. [env LEMONADE_PRELOAD, comma-separated]")
@click.option("--default-model",
              help="Model for the seed-compatible routes. [env LEMONADE_DEFAULT_MODEL]")
@click.option("--data-dir",
              help="Folder for worker caches (converted weights). "
                   "[env LEMONADE_DATA_DIR; default .lemonade next to the config file]")
@click.option("--zygotes", type=click.Choice(["off", "lazy", "eager"]),
              help="Start workers by forking a per-kind template process that has the heavy "
                   "modules imported (lazy: made on a kind's first load; eager: at start) or "
                   "by a fresh spawn (off). [env LEMONADE_ZYGOTES; default lazy]")
@click.option("--zygote-idle-timeout",
              help='A zygote with no live worker for this long ends (its memory comes back; '
                   'the next load starts a new one): "10m", 300; 0 = never. '
                   "[env LEMONADE_ZYGOTE_IDLE_TIMEOUT; default 10m]")
@click.option("--cluster",
              help='Run the models on a Ray cluster: "local" (start one here), "auto" (the '
                   'cluster this machine is a node of), "HOST:PORT" (its head) or '
                   '"ray://HOST:PORT"; needs the ray extra. [env LEMONADE_CLUSTER; default: '
                   "this machine only]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="[env LEMONADE_LOG_LEVEL; default info]")
@click.option("--access-log/--no-access-log", "access_log", default=None,
              help="One log line per request (logger supervisor.access). "
                   "[env LEMONADE_ACCESS_LOG; default on]")
def serve(**options: Any) -> None:
    """Run the server (API key only from LEMONADE_API_KEY, never a flag)."""
    cli = {key: value for key, value in options.items() if value not in (None, ())}
    for key in ("recipes", "preload", "device_budget"):
        if key in cli:
            cli[key] = list(cli[key])
    try:
        settings = load_settings(cli=cli, env=os.environ)
    except ConfigError as e:
        raise _CannotStart(str(e)) from None
    logging.basicConfig(level=settings.log_level.upper(), format=_LOG_FORMAT, stream=sys.stderr)
    os.environ["LEMONADE_LOG_LEVEL"] = settings.log_level  # workers log at the same level
    from supervisor.server import StartupError
    from supervisor.server import serve as run_server  # keeps client commands light to start
    from workers import event_loop

    try:
        # A config reload (SIGHUP, `lemonade reload`) reads the same flags and environment.
        event_loop.run(run_server(settings, lambda: load_settings(cli=cli, env=os.environ)))
    except StartupError as e:  # a port in use, an unwritable data dir: one line, no traceback
        raise _CannotStart(str(e)) from None


class _CannotStart(click.ClickException):
    """``lemonade: <one line>`` on stderr and exit status 1: the server did not start."""

    def show(self, file: Any = None) -> None:
        click.echo(f"lemonade: {self.format_message()}", err=True)


# ===================================================================== client commands

url_option = click.option(
    "--url", envvar="LEMONADE_URL", default=None,
    help="Server address. [env LEMONADE_URL; default from LEMONADE_HOST/LEMONADE_PORT]",
)


def _base_url(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host = os.environ.get("LEMONADE_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    port = os.environ.get("LEMONADE_PORT") or "8000"
    return f"http://{host}:{port}"


def _request(url: str | None, method: str, path: str, body: dict[str, Any] | None = None,
             timeout: float = 600.0) -> Any:
    base = _base_url(url)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    key = os.environ.get("LEMONADE_API_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise click.ClickException(f"{e.code}: {message}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise click.ClickException(
            f"no Lemonade server answered at {base} ({reason}). "
            "Start one with `lemonade serve`, or point --url / LEMONADE_URL at it."
        ) from None


def _expires_in(expires_at: str | None, row: dict[str, Any]) -> str:
    if row["state"] != "ready":
        return "-"
    if expires_at is None:
        if row["in_flight"]:
            return "busy"
        return "pinned" if row["pinned"] else "never"
    when = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    left = (when - dt.datetime.now(dt.UTC)).total_seconds()
    return format_duration(max(0.0, round(left)))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    )


@main.command()
@url_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status JSON.")
def status(url: str | None, as_json: bool) -> None:
    """Show every model: state, pid, measured memory, idle timeout and when it expires."""
    data = _request(url, "GET", "/api/v1/status", timeout=10)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    devices = data.get("devices") or []
    if len(devices) > 1:  # the CPU alone is what the model table already says
        click.echo(_table([["DEVICE", "TOTAL", "BUDGET", "OUR MODELS", "OTHERS", "FREE"]] + [
            [d["name"] + ("" if d["seen"] else " (declared)")
             + (" releasing" if d.get("releasing") else ""),
             *(_amount(d, d[key]) for key in ("total_bytes", "budget_bytes",
                                               "used_by_models_bytes", "used_by_others_bytes",
                                               "free_bytes"))] for d in devices]))
        click.echo("")
    cluster = data.get("cluster")
    if cluster:
        click.echo(f"Ray cluster {cluster['address']}:")
        click.echo(_table([["NODE", "ADDRESS", "ALIVE", "RESOURCES"]] + [
            [n["name"], n["address"], "yes" if n["alive"] else "no",
             ", ".join(f"{k}={format_bytes(int(v)) if k.endswith('memory') else f'{v:g}'}"
                       for k, v in sorted(n["resources"].items())
                       if not k.startswith("node:"))] for n in cluster["nodes"]]))
        click.echo("")
    rows = [["MODEL", "TYPE", "STATE", "PID", "RSS", "VRAM", "IDLE TIMEOUT", "SET BY",
             "EXPIRES IN", "LAST UNLOAD", *(["NODE"] if cluster else [])]]
    for m in data["models"]:
        timeout = m["idle_timeout_s"]
        last = m["last_eviction"]["reason"] if m["last_eviction"] else "-"
        state = state_cell(m)
        rows.append([
            m["name"], m["type"], state, str(m["pid"] or "-"),
            format_bytes(m["memory"]["rss_bytes"] or None),
            _vram_cell(m),
            format_duration(float("inf") if timeout is None else timeout),
            m["idle_timeout_source"], _expires_in(m["expires_at"], m), last,
            *([m.get("node") or "-"] if cluster else []),
        ])
    click.echo(_table(rows))
    for line in loading_lines(data["models"]):
        click.echo(f"  loading {line}")
    zygotes = data.get("server", {}).get("zygotes") or []
    if zygotes:
        click.echo("\nZygotes (templates that fork workers; no weights, no VRAM):")
        click.echo(_table([["KIND", "STATE", "PID", "RSS", "WORKERS", "IDLE EXIT IN", "FORKS"]] + [
            [z["kind"], z["state"], str(z["pid"] or "-"), format_bytes(z["rss_bytes"] or None),
             str(z.get("workers", "-")), _idle_exit_in(z), str(z["forks"])] for z in zygotes]))


def _amount(device: dict[str, Any], n: int | None) -> str:
    """A device figure: bytes, or for a Ray resource (``unit`` thousandths) its units."""
    if device.get("unit") == "thousandths":
        return "-" if n is None else f"{n / 1000:g}"
    return format_bytes(n)


def _vram_cell(model: dict[str, Any]) -> str:
    vram = format_bytes(model["memory"]["vram_bytes"] or None)
    placed = model.get("placed_device")
    return f"{vram} {placed}" if placed and placed != "cpu" and vram != "-" else vram


def _idle_exit_in(zygote: dict[str, Any]) -> str:
    left = zygote.get("idle_expires_in_s")
    if left is None:
        return "-" if zygote.get("workers") else "never"
    return format_duration(max(0.0, round(left)))


@main.command()
@url_option
def reload(url: str | None) -> None:
    """Re-read the config files and apply the difference without a restart."""
    report = _request(url, "POST", "/api/v1/reload", body={}, timeout=30)
    lines = [f"{label}: {', '.join(report[key])}" for key, label in (
        ("added", "added"), ("removed", "removed (drained, then unloaded)"),
        ("changed", "recipe changed"), ("reload_when_idle", "reloaded once idle"),
        ("server_settings_applied", "server settings applied"),
        ("restart_needed", "needs a restart to apply"),
    ) if report.get(key)]
    click.echo("\n".join(lines) or "no changes")


@main.command()
@url_option
def models(url: str | None) -> None:
    """List the configured models."""
    data = _request(url, "GET", "/v1/models", timeout=10)
    rows = [["MODEL", "TYPE", "RECIPE", "STATE"]]
    rows += [[m["id"], m["type"], m["recipe"], m["state"]] for m in data["data"]]
    click.echo(_table(rows))


@main.command()
@url_option
@click.argument("name")
@click.option("--pin", is_flag=True, help="Never evict it (until unloaded by hand).")
@click.option("--idle-timeout", help='Its idle timeout from now on ("10m"; 0 = never).')
def load(url: str | None, name: str, pin: bool, idle_timeout: str | None) -> None:
    """Load NAME now (it then unloads after its idle timeout)."""
    body: dict[str, Any] = {"model_name": name}
    if pin:
        body["pinned"] = True
    if idle_timeout is not None:
        body["idle_timeout"] = idle_timeout
    # The request answers when the model is ready; meanwhile, show its progress.
    with LoadWatcher(name, lambda: _request(url, "GET", "/api/v1/status", timeout=10),
                     sys.stdout):
        data = _request(url, "POST", "/api/v1/load", body)
    click.echo(f"{name} is {data['state']} (pid {data['pid']}, loaded in "
               f"{(data['load_seconds'] or 0):.2f}s)")


@main.command()
@url_option
@click.argument("name", required=False)
@click.option("--all", "unload_all", is_flag=True, help="Unload every model.")
@click.option("--force", is_flag=True, help="Do not wait for requests in flight.")
def unload(url: str | None, name: str | None, unload_all: bool, force: bool) -> None:
    """Unload NAME, or every model with --all (its worker process ends)."""
    if bool(name) == unload_all:
        raise click.UsageError("give a model NAME or --all")
    body: dict[str, Any] = {"force": force}
    if name:
        body["model_name"] = name
    data = _request(url, "POST", "/api/v1/unload", body)
    gone = data["unloaded"]
    if gone:
        click.echo("unloaded " + ", ".join(gone))
    else:
        click.echo(data.get("message") or "nothing was loaded")


@main.command()
@url_option
@click.argument("args", nargs=-1, required=True)
def timeout(url: str | None, args: tuple[str, ...]) -> None:
    """Set the idle timeout: `timeout [NAME] SECONDS` (no NAME = global; 0 = never)."""
    if len(args) > 2:
        raise click.UsageError("expected [NAME] SECONDS")
    body: dict[str, Any] = {"idle_timeout": args[-1]}
    if len(args) == 2:
        body["model_name"] = args[0]
    data = _request(url, "POST", "/api/v1/timeout", body)
    target = data["model_name"] or "all models"
    seconds = data["idle_timeout_s"]
    click.echo(f"idle timeout for {target}: "
               f"{format_duration(float('inf') if seconds is None else seconds)}")


if __name__ == "__main__":
    main()
