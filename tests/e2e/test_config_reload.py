"""Config reload without a restart, against a real server with requests in flight.

``POST /api/v1/reload``, ``lemonade reload`` and ``SIGHUP`` re-read the config file: new
models appear, removed ones drain and unload through the one retire path, a changed recipe
is used from the model's next load, server settings apply or are reported as needing a
restart, and an invalid file changes nothing.
"""

from __future__ import annotations

import os
import signal
import threading
import urllib.request

from tests.e2e.conftest import pid_gone, run_cli, wait_for

BASE = """
[server]
auto_unload_timer = "10m"
stop_grace = "1s"
[models.keep]
recipe = "synthetic"
type = "tts"
[models.keep.options]
memory_mb = 1
[models.leaving]
recipe = "synthetic"
type = "tts"
[models.leaving.options]
latency_ms = 2500
chunks = 5
"""

NEW = """
[server]
auto_unload_timer = "7m"
stop_grace = "1s"
port = 8123                     # the server runs with --port 0: the flag wins, no change
zygotes = "off"                 # bound at start: reported as needing a restart
[models.keep]
recipe = "synthetic"
type = "tts"
[models.keep.options]
memory_mb = 2
[models.arriving]
recipe = "synthetic"
type = "tts"
"""


def _stream_speech(url: str, model: str, out: dict[str, object]) -> None:
    request = urllib.request.Request(
        url + "/v1/audio/speech", method="POST",
        data=b'{"model": "%s", "input": "a long answer", "stream": true, "response_format": "pcm"}'
        % model.encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        out["status"] = response.status
        out["body"] = response.read()


def test_reload_applies_the_difference_and_loses_no_request(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(BASE)
    keep_pid = server.load("keep")["pid"]
    leaving_pid = server.load("leaving")["pid"]
    # A request in flight on the model the reload removes: it must finish, whole.
    answer: dict[str, object] = {}
    streaming = threading.Thread(target=_stream_speech, args=(server.url, "leaving", answer))
    streaming.start()
    wait_for(lambda: server.model("leaving")["in_flight"] == 1, 10)

    server.config_path.write_text(NEW)
    result = server.post("/api/v1/reload", {})
    assert result.status == 200, result.body
    report = result.json()
    assert report["added"] == ["arriving"]
    assert report["removed"] == ["leaving"]
    assert report["changed"] == [] and report["reload_when_idle"] == ["keep"]
    assert "auto_unload_timer_s" in report["server_settings_applied"]
    assert report["restart_needed"] == ["zygotes"]

    streaming.join(30)
    assert answer["status"] == 200 and len(answer["body"]) > 0  # type: ignore[arg-type]
    wait_for(lambda: pid_gone(leaving_pid), 15)
    wait_for(lambda: sorted(m["name"] for m in server.status()["models"]) == ["arriving", "keep"],
             15)
    gone = server.speech("leaving")
    assert gone.status == 404 and "'leaving' is not configured" in gone.error["message"]
    # keep was idle: it unloaded for the reload, and its next load uses the new recipe.
    wait_for(lambda: pid_gone(keep_pid), 15)
    assert server.model("keep")["last_eviction"]["reason"] == "reload"
    assert server.speech("keep").status == 200
    assert server.model("keep")["info"]["memory_mb"] == 2
    assert server.speech("arriving").status == 200
    # The global timer applied; the zygote setting did not (it would need a restart).
    assert server.model("arriving")["idle_timeout_s"] == 420
    assert server.status()["server"]["auto_unload_timer_s"] == 420


def test_an_invalid_file_changes_nothing_and_names_file_and_key(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(BASE)
    pid = server.load("keep")["pid"]
    server.config_path.write_text(BASE.replace("memory_mb = 1", "memory_mbb = 1"))
    result = server.post("/api/v1/reload", {})
    assert result.status == 400
    message = result.error["message"]
    assert "nothing changed" in message and str(server.config_path) in message
    assert "[models.keep]" in message and "memory_mbb" in message
    assert server.model("keep")["pid"] == pid
    assert sorted(m["name"] for m in server.status()["models"]) == ["keep", "leaving"]
    garbage = server.post("/api/v1/reload", {"please": True})
    assert garbage.status == 400 and "please" in garbage.error["message"]


def test_sighup_and_the_cli_reload(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(BASE)
    server.config_path.write_text(BASE + '[models.by-signal]\nrecipe = "synthetic"\ntype = "tts"\n')
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: any(m["name"] == "by-signal" for m in server.status()["models"]), 10)
    assert server.speech("by-signal").status == 200

    server.config_path.write_text(BASE)
    out = run_cli("reload", env={"LEMONADE_URL": server.url})
    assert out.returncode == 0, out.stderr
    assert "removed (drained, then unloaded): by-signal" in out.stdout
