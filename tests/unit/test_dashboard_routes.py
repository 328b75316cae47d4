"""The server side of the dashboard, in process (aiohttp's test client; no worker starts):
the static files and who may fetch them, ``GET /`` for browsers and for Ollama's clients,
``POST /api/v1/pin`` and its refusals, the status fields the page reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from supervisor.api.app import create_app
from supervisor.api.dashboard import PATHS, prefers_html
from supervisor.api.keys import MANAGER
from supervisor.config import load_settings

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.tone]
recipe = "synthetic"
type = "tts"
"""
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
STATIC_DIR = Path(__file__).resolve().parents[2] / "supervisor" / "dashboard"


def _app(tmp_path: Path, env: dict[str, str] | None = None) -> web.Application:
    config = tmp_path / "lemonade.toml"
    config.write_text(CONFIG)
    settings = load_settings(cli={"config": str(config)}, env=env or {}, cwd=tmp_path)
    (tmp_path / "run").mkdir(exist_ok=True)
    return create_app(settings, runtime_base=str(tmp_path / "run"))


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    return await aiohttp_client(_app(tmp_path))


@pytest.fixture
async def keyed(aiohttp_client: Any, tmp_path: Path) -> Any:
    return await aiohttp_client(_app(tmp_path, {"LEMONADE_API_KEY": "k3y"}))


@pytest.mark.parametrize(("accept", "html"), [
    (BROWSER_ACCEPT, True),
    ("text/html", True),
    ("text/*", False),                      # a tie: the liveness text
    ("*/*", False),                         # curl, httpx, Ollama's clients
    (None, False),
    ("", False),
    ("application/json", False),
    ("text/plain, text/html;q=0.9", False),
    ("text/plain;q=0.5, text/html", True),
    ("text/html;q=0, */*", False),
    ("text/html;q=bogus, */*", False),
    ("TEXT/HTML", True),
])
def test_prefers_html(accept: str | None, html: bool) -> None:
    assert prefers_html(accept) is html


async def test_root_is_the_liveness_text_but_sends_a_browser_to_the_dashboard(client: Any) -> None:
    plain = await client.get("/")
    assert plain.status == 200
    assert plain.headers["Content-Type"].startswith("text/plain")
    assert "running" in await plain.text()
    probe = await client.get("/", headers={"Accept": "*/*"})
    assert probe.status == 200 and "running" in await probe.text()
    browser = await client.get("/", headers={"Accept": BROWSER_ACCEPT}, allow_redirects=False)
    assert browser.status == 303
    assert browser.headers["Location"] == "/ui"
    head = await client.head("/", headers={"Accept": BROWSER_ACCEPT}, allow_redirects=False)
    assert head.status == 303


@pytest.mark.parametrize(("path", "content_type"), [
    ("/ui", "text/html"), ("/ui/dashboard.js", "text/javascript"),
    ("/ui/dashboard.css", "text/css"),
])
async def test_static_files_are_served_without_the_key(keyed: Any, path: str,
                                                       content_type: str) -> None:
    response = await keyed.get(path)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith(content_type)
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert path in PATHS


async def test_with_a_key_the_data_and_the_root_still_need_it(keyed: Any) -> None:
    for path in ("/api/v1/status", "/api/v1/events", "/"):
        response = await keyed.get(path, headers={"Accept": BROWSER_ACCEPT},
                                   allow_redirects=False)
        assert response.status == 401, path
    ok = await keyed.get("/api/v1/status", headers={"Authorization": "Bearer k3y"})
    assert ok.status == 200
    for path in ("/ui/../api/v1/status", "/ui/index.html", "/ui/nothing.js", "/ui/"):
        response = await keyed.get(path)
        assert response.status in (401, 404), path  # no other file is served, nor openly


async def test_the_host_rule_still_holds_for_the_page(client: Any) -> None:
    response = await client.get("/ui", headers={"Host": "evil.example"})
    assert response.status == 403


def test_the_page_loads_nothing_from_the_network() -> None:
    page = (STATIC_DIR / "index.html").read_text()
    for url in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert url.startswith("/ui/") or url.startswith("data:"), url
    script = (STATIC_DIR / "dashboard.js").read_text()
    assert "EventSource" not in script.replace("EventSource cannot", "")  # fetch + stream
    assert not re.search(r"https?://", script)


async def test_pin_and_unpin(client: Any, aiohttp_client: Any) -> None:
    response = await client.post("/api/v1/pin", json={"model_name": "tone", "pinned": True})
    assert response.status == 200, await response.text()
    assert await response.json() == {"status": "success", "model_name": "tone",
                                     "pinned": True, "state": "unloaded"}
    (row,) = (await (await client.get("/api/v1/status")).json())["models"]
    assert row["pinned"] is True
    response = await client.post("/api/v1/pin", json={"model_name": "tone", "pinned": False})
    assert (await response.json())["pinned"] is False
    assert client.server.app[MANAGER].slots["tone"].pinned is False


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model_name": "tone"}, 400, "pinned"),
    ({"pinned": True}, 400, "model_name"),
    ({"model_name": "tone", "pinned": "yes"}, 400, "pinned"),
    ({"model_name": "tone", "pinned": None}, 400, "pinned"),
    ({"model_name": "bad name!", "pinned": True}, 400, "model_name"),
    ({"model_name": "tone", "pinned": True, "force": True}, 400, "force"),
    ({"model_name": "nope", "pinned": True}, 404, "nope"),
])
async def test_pin_refusals_name_the_field(client: Any, body: dict[str, Any], status: int,
                                           needle: str) -> None:
    response = await client.post("/api/v1/pin", json=body)
    error = (await response.json())["error"]
    assert response.status == status, error
    assert needle in error["message"], error


async def test_pin_refuses_a_body_that_is_not_an_object(client: Any) -> None:
    for raw in (b"", b"[]", b"garbage"):
        response = await client.post("/api/v1/pin", data=raw,
                                     headers={"Content-Type": "application/json"})
        assert response.status == 400, raw


async def test_status_has_the_server_clock_and_the_recent_events(client: Any) -> None:
    manager = client.server.app[MANAGER]
    manager.events.publish("unloaded", "tone", pid=1, reason="manual")
    manager.events.publish("progress", "tone", fraction=0.5)
    status = await (await client.get("/api/v1/status")).json()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", status["server"]["time"])
    events = status["recent_events"]
    assert [(e["event"], e["model"], e.get("reason")) for e in events] == [
        ("unloaded", "tone", "manual")]  # progress is not history
