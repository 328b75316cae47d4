"""The real ``lemonade`` command against a real server (LEMONADE_URL points at it)."""

from __future__ import annotations

import re
import socket

from tests.e2e.conftest import pid_alive, pid_gone, run_cli, wait_for

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.tone]
recipe = "synthetic"
type = "tts"
idle_timeout = "2m"
[models.tone-2]
recipe = "synthetic"
type = "tts"
"""


def _row(table: str, name: str) -> list[str]:
    for line in table.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name} in:\n{table}")


def test_cli_drives_the_lifecycle(start_server):
    server = start_server(CONFIG)
    env = {"LEMONADE_URL": server.url}

    models = run_cli("models", env=env)
    assert models.returncode == 0, models.stderr
    assert models.stdout.split()[:4] == ["MODEL", "TYPE", "RECIPE", "STATE"]
    assert _row(models.stdout, "tone") == ["tone", "tts", "synthetic", "unloaded"]
    assert _row(models.stdout, "tone-2")[:3] == ["tone-2", "tts", "synthetic"]

    load = run_cli("load", "tone", env=env)
    assert load.returncode == 0, load.stderr
    match = re.search(r"pid (\d+)", load.stdout)
    assert match, load.stdout
    pid = int(match.group(1))
    assert pid_alive(pid)
    assert server.model("tone")["pid"] == pid
    assert "ready" in load.stdout

    status = run_cli("status", env=env)
    assert status.returncode == 0, status.stderr
    header = status.stdout.splitlines()[0]
    for column in ("MODEL", "STATE", "PID", "RSS", "IDLE TIMEOUT", "SET BY", "EXPIRES IN"):
        assert column in header
    row = _row(status.stdout, "tone")
    assert "ready" in row and str(pid) in row
    line = next(line for line in status.stdout.splitlines() if line.startswith("tone "))
    assert " 2m " in line
    assert "recipe" in line and str(server.config_path) in line
    assert "unloaded" in _row(status.stdout, "tone-2")
    (zygote,) = server.zygote_pids()  # the worker was forked from the synthetic kind's zygote
    zygote_row = _row(status.stdout, "synthetic")
    assert "ready" in zygote_row and str(zygote) in zygote_row and zygote_row[-1] == "1"
    assert zygote_row[-3:-1] == ["1", "-"]  # one live worker, so no idle exit is due

    as_json = run_cli("status", "--json", env=env)
    assert as_json.returncode == 0
    assert f'"pid": {pid}' in as_json.stdout

    timeout = run_cli("timeout", "tone", "10m", env=env)
    assert timeout.returncode == 0, timeout.stderr
    assert "tone" in timeout.stdout and "10m" in timeout.stdout
    row = server.model("tone")
    assert (row["idle_timeout_s"], row["idle_timeout_source"]) == (600, "runtime")
    status = run_cli("status", env=env)
    line = next(line for line in status.stdout.splitlines() if line.startswith("tone "))
    assert " 10m " in line and "runtime" in line

    everything = run_cli("timeout", "5m", env=env)
    assert everything.returncode == 0, everything.stderr
    assert "all models" in everything.stdout and "5m" in everything.stdout
    assert server.status()["server"]["auto_unload_timer_s"] == 300
    assert server.model("tone-2")["idle_timeout_s"] == 300

    unload = run_cli("unload", "tone", env=env)
    assert unload.returncode == 0, unload.stderr
    assert "unloaded tone" in unload.stdout
    assert pid_gone(pid)
    assert server.model("tone")["state"] == "unloaded"

    nothing = run_cli("unload", "tone", env=env)
    assert nothing.returncode == 0
    assert "not loaded" in nothing.stdout


def test_cli_unload_all_and_errors(start_server):
    server = start_server(CONFIG)
    env = {"LEMONADE_URL": server.url}
    pids = []
    for name in ("tone", "tone-2"):
        result = run_cli("load", name, env=env)
        assert result.returncode == 0, result.stderr
        pids.append(int(re.search(r"pid (\d+)", result.stdout).group(1)))
    assert sorted(server.worker_pids()) == sorted(pids)

    unload = run_cli("unload", "--all", env=env)
    assert unload.returncode == 0, unload.stderr
    assert "tone" in unload.stdout and "tone-2" in unload.stdout
    assert all(pid_gone(pid) for pid in pids)
    assert server.worker_pids() == []

    unknown = run_cli("load", "ghost", env=env)
    assert unknown.returncode != 0
    assert "404" in unknown.stderr and "ghost" in unknown.stderr
    usage = run_cli("unload", env=env)
    assert usage.returncode != 0
    assert "--all" in usage.stderr
    bad = run_cli("timeout", "tone", "soon", env=env)
    assert bad.returncode != 0
    assert "400" in bad.stderr and "idle_timeout" in bad.stderr
    assert server.alive()


def test_cli_uses_the_api_key_from_the_environment(start_server):
    server = start_server(CONFIG, env={"LEMONADE_API_KEY": "secret"})
    denied = run_cli("status", env={"LEMONADE_URL": server.url})
    assert denied.returncode != 0
    assert "401" in denied.stderr
    allowed = run_cli("status", env={"LEMONADE_URL": server.url, "LEMONADE_API_KEY": "secret"})
    assert allowed.returncode == 0, allowed.stderr
    assert "tone" in allowed.stdout


def test_cli_without_a_server_says_how_to_start_one():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port was free a moment ago and nothing listens on it now.
    url = f"http://127.0.0.1:{port}"
    result = run_cli("status", env={"LEMONADE_URL": url}, timeout=20)
    assert result.returncode != 0
    assert "no Lemonade server answered" in result.stderr
    assert url in result.stderr
    assert "lemonade serve" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_zygote_ends_after_the_idle_timeout_given_by_the_flag(start_server):
    server = start_server(CONFIG, args=["--zygote-idle-timeout", "2s"])
    env = {"LEMONADE_URL": server.url}
    assert server.status()["server"]["zygote_idle_timeout_s"] == 2
    assert run_cli("load", "tone", env=env).returncode == 0
    (zygote,) = server.zygote_pids()
    unload = run_cli("unload", "--all", env=env)
    assert unload.returncode == 0, unload.stderr
    listed = server.status()["server"]["zygotes"]
    if listed:  # not yet gone: no worker, and its exit is due within the timeout
        (row,) = listed
        assert row["pid"] == zygote and row["workers"] == 0
        assert 0 <= row["idle_expires_in_s"] <= 2
    wait_for(lambda: pid_gone(zygote), 30, what="the idle zygote to end")
    assert server.status()["server"]["zygotes"] == []
    assert "Zygotes" not in run_cli("status", env=env).stdout
    assert "had no worker for" in server.log_text()
    assert run_cli("load", "tone", env=env).returncode == 0  # a new zygote forks it
    assert server.zygote_pids() not in ([], [zygote])
