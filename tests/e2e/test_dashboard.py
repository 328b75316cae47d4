"""The dashboard (``/ui``) in a real headless browser, against a real ``lemonade serve``.

Each test starts its own server (synthetic models: no weights, instant or slow loads as
asked) and opens the page in a fresh browser context of the module's one Chromium. What is
checked is what a person sees on the page, and what the system outside it did: the worker
process gone, ``lemonade status`` changed. Waits are long (60 s) because they only catch
hangs; on a normal machine each step takes well under a second.

A screenshot of the page with a model loaded is kept as a test artefact
(``tests/artefacts/dashboard.png``, or under ``LEMONADE_TEST_ARTEFACTS``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.browser import WAIT_MS, module_browser, screenshot
from tests.e2e.conftest import pid_gone, run_cli, wait_for

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the dashboard's browser tests need Playwright for Python "
                                  "(./setup.sh --test installs it)")
expect = sync_api.expect
expect.set_options(timeout=WAIT_MS)

MODELS = """
[server]
auto_unload_timer = "10m"
stop_grace = "2s"
[models.tone]
recipe = "synthetic"
type = "tts"
idle_timeout = "{tone_timeout}"
[models.tone.options]
memory_mb = 32
load_seconds = {load_seconds}
[models.chatty]
recipe = "synthetic"
type = "llm"
"""


def config(*, tone_timeout: str = "10m", load_seconds: float = 0) -> str:
    return MODELS.format(tone_timeout=tone_timeout, load_seconds=load_seconds)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from module_browser()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (no stored key); a JavaScript error on it fails the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def open_dashboard(page: Any, server: Any) -> None:
    page.goto(server.url + "/")  # a browser's Accept: sent on to /ui
    assert page.url == server.url + "/ui"
    expect(page.locator("#connection")).to_have_text("live")


def row(page: Any, name: str) -> Any:
    return page.locator(f'#models tr[data-model="{name}"]')


def cell(page: Any, name: str, column: str) -> Any:
    return row(page, name).locator(f"td.{column}")


def test_the_page_lists_the_configured_models(start_server, page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config())
    # `lemonade serve` says where the dashboard is (the line right after "listening on").
    wait_for(lambda: any(f"dashboard: {server.url}/ui" in line for line in server.log_lines),
             30, what="the dashboard's URL in the log")
    open_dashboard(page, server)
    expect(page.locator("#models tbody tr")).to_have_count(2)
    expect(cell(page, "tone", "state")).to_have_text("unloaded")
    expect(cell(page, "tone", "type")).to_have_text("tts")
    expect(cell(page, "tone", "timeout")).to_have_text("10m")
    expect(cell(page, "tone", "source")).to_contain_text("recipe")
    expect(cell(page, "chatty", "type")).to_have_text("llm")
    expect(cell(page, "chatty", "source")).to_contain_text("global")
    expect(page.locator("#devices .device[data-device='cpu']")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()


def test_a_request_shows_the_model_loading_then_ready_without_a_reload(start_server, page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config(load_seconds=3))
    open_dashboard(page, server)
    page.evaluate("window.sameDocument = true")  # gone if the page were reloaded
    done: dict[str, Any] = {}

    def speak() -> None:
        try:
            with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                               timeout=120) as client:
                done["audio"] = client.audio.speech.create(
                    model="tone", voice="tone", input="Hello there",
                    response_format="wav").read()
        except Exception as e:  # reported by the assertion below
            done["error"] = e

    thread = threading.Thread(target=speak)
    thread.start()
    try:
        expect(cell(page, "tone", "state")).to_contain_text("loading")
        expect(cell(page, "tone", "state").locator("progress")).to_be_attached()
        expect(cell(page, "tone", "state")).to_have_text("ready")
    finally:
        thread.join(120)
    assert "error" not in done, done
    assert done["audio"][:4] == b"RIFF"
    pid = server.model("tone")["pid"]
    expect(cell(page, "tone", "pid")).to_have_text(str(pid))
    expect(cell(page, "tone", "memory")).to_have_text(re.compile(r"\d+(\.\d)? MiB"))
    expect(page.locator('#timeline li[data-event="loaded"][data-model="tone"]')).to_contain_text(
        f"pid {pid}")
    expect(page.locator("#devices [data-device='cpu'] .bar span")).to_have_count(1)
    expect(page.locator("#memory-legend")).to_contain_text("tone")  # its line on the plot
    zygotes = server.status()["server"]["zygotes"]
    expect(page.locator("#zygotes tbody tr")).to_have_count(len(zygotes))
    if zygotes:
        expect(page.locator("#zygotes tbody tr").first).to_contain_text(zygotes[0]["kind"])
    assert page.evaluate("window.sameDocument") is True
    path = screenshot(page, "dashboard")
    assert path.stat().st_size > 10_000


def test_the_countdown_runs_and_the_model_unloads_when_it_ends(start_server, page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config(tone_timeout="8s"))
    open_dashboard(page, server)
    server.load("tone")
    expect(cell(page, "tone", "state")).to_have_text("ready")
    expect(cell(page, "tone", "expires")).to_have_text(re.compile(r"^[1-8]s$"))
    first = int(cell(page, "tone", "expires").inner_text().rstrip("s"))
    # It counts down (a later reading is lower) until the timer fires.
    expect(cell(page, "tone", "expires")).not_to_have_text(f"{first}s")
    expect(cell(page, "tone", "state")).to_have_text("unloaded")
    expect(cell(page, "tone", "expires")).to_have_text("-")
    expect(cell(page, "tone", "last-eviction")).to_contain_text("idle")
    expect(page.locator('#timeline li[data-event="unloaded"][data-model="tone"]')).to_contain_text(
        "reason: idle")


def test_the_unload_button_ends_the_worker_and_the_timeline_says_why(start_server, page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config())
    open_dashboard(page, server)
    pid = server.load("tone")["pid"]
    expect(cell(page, "tone", "pid")).to_have_text(str(pid))
    row(page, "tone").locator('[data-action="unload"]').click()
    expect(cell(page, "tone", "state")).to_have_text("unloaded")
    wait_for(lambda: pid_gone(pid), 30, what=f"worker {pid} to end")
    expect(cell(page, "tone", "pid")).to_have_text("-")
    expect(page.locator('#timeline li[data-event="unloaded"][data-model="tone"]')).to_contain_text(
        f"reason: manual, pid {pid}")
    expect(page.locator("#error")).to_be_hidden()


def test_timeouts_set_on_the_page_show_in_lemonade_status(start_server, page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config())
    open_dashboard(page, server)
    row(page, "tone").locator(".timeout-input").fill("7m")
    row(page, "tone").locator('[data-action="set-timeout"]').click()
    expect(cell(page, "tone", "timeout")).to_have_text("7m")
    expect(cell(page, "tone", "source")).to_have_text("runtime")
    page.locator("#global-timeout").fill("45m")
    page.locator("#set-global-timeout").click()
    expect(page.locator("#global-timeout-now")).to_have_text("now 45m, set by runtime")
    expect(cell(page, "chatty", "timeout")).to_have_text("45m")
    expect(page.locator("#error")).to_be_hidden()

    result = run_cli("status", "--url", server.url)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    assert lines["tone"][6:8] == ["7m", "runtime"], result.stdout
    assert lines["chatty"][6] == "45m", result.stdout


def test_pinning_stops_the_countdown_and_api_errors_are_shown(start_server, page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config(tone_timeout="10m"))
    open_dashboard(page, server)
    server.load("tone")
    expect(cell(page, "tone", "expires")).to_have_text(re.compile(r"^\d+m \d\ds$"))
    pin = row(page, "tone").locator('[data-action="pin"]')
    pin.click()
    expect(pin).to_have_text("Unpin")
    expect(cell(page, "tone", "expires")).to_have_text("pinned")
    assert server.model("tone")["pinned"] is True
    pin.click()
    expect(pin).to_have_text("Pin")
    expect(cell(page, "tone", "expires")).to_have_text(re.compile(r"^\d+m \d\ds$"))

    # The server's own message, naming the field, reaches the page.
    row(page, "tone").locator(".timeout-input").fill("soon")
    row(page, "tone").locator('[data-action="set-timeout"]').click()
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("400")
    expect(page.locator("#error-text")).to_contain_text("'idle_timeout'")
    expect(cell(page, "tone", "timeout")).to_have_text("10m")  # nothing changed


def test_with_an_api_key_the_page_asks_for_it(start_server, page) -> None:  # type: ignore[no-untyped-def]
    server = start_server(config(), env={"LEMONADE_API_KEY": "secret-key"})
    page.goto(server.url + "/ui")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-message")).to_have_text("This server needs an API key.")
    expect(page.locator("#dashboard")).to_be_hidden()
    expect(page.locator("#models tbody tr")).to_have_count(0)

    page.locator("#key-input").fill("wrong-key")
    page.locator("#key-submit").click()
    expect(page.locator("#login-message")).to_contain_text("refused")
    expect(page.locator("#dashboard")).to_be_hidden()

    page.locator("#key-input").fill("secret-key")
    page.locator("#key-submit").click()
    expect(page.locator("#dashboard")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#models tbody tr")).to_have_count(2)
    # The event stream is read with the key too (EventSource could not send it).
    expect(page.locator("#connection")).to_have_text("live")
    server.post("/api/v1/load", {"model_name": "tone"},
                headers={"Authorization": "Bearer secret-key"})
    expect(cell(page, "tone", "state")).to_have_text("ready")
    expect(page.locator('#timeline li[data-event="loaded"]')).to_have_count(1)
