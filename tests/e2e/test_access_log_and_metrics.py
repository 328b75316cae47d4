"""Requests you can count: the access log and the request metrics, end to end.

A real ``lemonade serve`` with synthetic models answers real HTTP; the tests read its log
lines (``supervisor.access``) and its ``/metrics`` text as a user or a Prometheus server
would. The one test that needs tokens runs the real SmolLM2 ``llm`` kind (the synthetic kind
only speaks), so it is marked slow.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config import ConfigError, load_settings
from tests.e2e.conftest import Server, launch_server, wait_for
from tests.helpers import shared_data_dir

CONFIG = """
[server]
auto_unload_timer = "10m"
[models.tone]
recipe = "synthetic"
type = "tts"
[models.tone.options]
load_seconds = 0.6
[models.slowtone]
recipe = "synthetic"
type = "tts"
[models.slowtone.options]
latency_ms = 1500
chunks = 3
"""
#: method, path, model (optional), status, seconds, bytes
LINE_RE = re.compile(
    r"supervisor\.access: (\S+) (\S+)(?: model=(\S+))? (\d{3}) (\d+\.\d{3})s (\d+B|-)$"
)
WAIT_S = 30.0  # only catches a hang


def access_lines(server: Server) -> list[re.Match[str]]:
    return [m for m in map(LINE_RE.search, list(server.log_lines)) if m]


def lines_for(server: Server, method: str, path: str) -> list[re.Match[str]]:
    return [m for m in access_lines(server) if (m.group(1), m.group(2)) == (method, path)]


def wait_lines(server: Server, method: str, path: str, count: int) -> list[re.Match[str]]:
    wait_for(lambda: len(lines_for(server, method, path)) >= count, WAIT_S,
             what=f"{count} access line(s) for {method} {path}")
    return lines_for(server, method, path)


def samples(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    result = server.get("/metrics")
    assert result.status == 200
    out = {}
    for family in text_string_to_metric_families(result.body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def label_values(found: dict[tuple[str, frozenset[tuple[str, str]]], float],
                 label: str) -> set[str]:
    return {v for (_, labels) in found for k, v in labels if k == label}


@pytest.fixture
def server(start_server: Any) -> Server:
    return start_server(CONFIG)  # type: ignore[no-any-return]


# ===================================================================== the access log


def test_a_request_is_one_line_with_its_fields(server: Server) -> None:
    result = server.speech("tone", "a quiet sentence nobody should find in the log")
    assert result.status == 200
    (line,) = wait_lines(server, "POST", "/v1/audio/speech", 1)
    _method, _path, model, status, seconds, sent = line.groups()
    assert (model, status) == ("tone", "200")
    assert float(seconds) >= 0.5  # it waited for the 0.6 s load
    # What aiohttp wrote: the body and the status line and headers.
    assert len(result.body) < int(sent.removesuffix("B")) < len(result.body) + 4096
    assert "a quiet sentence" not in server.log_text()

    assert server.get("/health").status == 200
    (health,) = wait_lines(server, "GET", "/health", 1)
    assert health.group(3) is None and health.group(4) == "200"
    time.sleep(0.5)  # a second line for the same request would come right after the first
    assert len(lines_for(server, "POST", "/v1/audio/speech")) == 1
    assert len(lines_for(server, "GET", "/health")) == 1


def test_errors_are_logged_with_their_status_and_no_model(server: Server) -> None:
    assert server.speech("nosuch").status == 404
    (line,) = wait_lines(server, "POST", "/v1/audio/speech", 1)
    assert line.group(3) is None and line.group(4) == "404"
    # An unknown route: the raw path as it came (percent-encoded), never the query string.
    assert server.get("/no/such%0aroute?token=abc123").status == 404
    (line,) = wait_lines(server, "GET", "/no/such%0aroute", 1)
    assert line.group(4) == "404"
    assert server.post("/v1/audio/speech", data=b"{not json").status == 400
    assert [m.group(4) for m in wait_lines(server, "POST", "/v1/audio/speech", 2)] == \
        ["404", "400"]
    assert "abc123" not in server.log_text()


def test_api_keys_are_never_logged_and_a_401_is(start_server: Any) -> None:
    server = start_server(CONFIG, env={"LEMONADE_API_KEY": "key-in-a-header-7781"})
    assert server.get("/v1/models", headers={"Authorization": "Bearer wrong-key-3390"}).status \
        == 401
    ok = server.get("/v1/models", headers={"Authorization": "Bearer key-in-a-header-7781"})
    assert ok.status == 200
    assert [m.group(4) for m in wait_lines(server, "GET", "/v1/models", 2)] == ["401", "200"]
    assert "key-in-a-header-7781" not in server.log_text()
    assert "wrong-key-3390" not in server.log_text()


def test_a_stream_is_logged_when_it_ends(server: Server) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    try:
        body = json.dumps({"model": "slowtone", "input": "streamed", "stream": True})
        conn.request("POST", "/v1/audio/speech", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        # The headers come with the first of three chunks; two more take ~1 s of the
        # worker's latency, so the stream cannot have ended (and been logged) yet.
        assert lines_for(server, "POST", "/v1/audio/speech") == []
        received = len(response.read())
    finally:
        conn.close()
    (line,) = wait_lines(server, "POST", "/v1/audio/speech", 1)
    assert (line.group(3), line.group(4)) == ("slowtone", "200")
    assert float(line.group(5)) >= 1.0  # the whole stream, not the time to its headers
    assert int(line.group(6).removesuffix("B")) > received


def test_a_client_that_hangs_up_mid_stream_is_a_499(server: Server) -> None:
    assert server.speech("slowtone", "warm up").status == 200  # loaded: no load in the way
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "slowtone", "input": "left early", "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the stream began
    lines = wait_lines(server, "POST", "/v1/audio/speech", 2)
    assert [(m.group(3), m.group(4)) for m in lines] == [("slowtone", "200"), ("slowtone", "499")]
    assert lines[1].group(6) == "-"  # it never ended, so there is no size to tell
    found = samples(server)
    assert value(found, "lemonade_requests_total", route="/v1/audio/speech", method="POST",
                 model="slowtone", status="499") == 1.0


@pytest.mark.parametrize("how", ["flag", "env", "config"])
def test_the_access_log_can_be_turned_off(start_server: Any, how: str) -> None:
    config, env, args = CONFIG, {}, []
    if how == "flag":
        args = ["--no-access-log"]
    elif how == "env":
        env = {"LEMONADE_ACCESS_LOG": "false"}
    else:
        config = CONFIG.replace('auto_unload_timer = "10m"',
                                'auto_unload_timer = "10m"\naccess_log = false')
    server = start_server(config, env=env, args=args)
    assert server.speech("tone").status == 200
    assert server.get("/health").status == 200
    # The metrics still count what the log no longer shows.
    found = samples(server)
    assert value(found, "lemonade_requests_total", route="/v1/audio/speech", method="POST",
                 model="tone", status="200") == 1.0
    assert access_lines(server) == []
    assert "supervisor.access" not in server.log_text()


def test_a_bad_access_log_value_names_where_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "lemonade.toml").write_text("[server]\naccess_log = \"sometimes\"\n")
    with pytest.raises(ConfigError, match=r"\[server\] access_log: expected true or false"):
        load_settings(cli={}, env={}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="env LEMONADE_ACCESS_LOG: expected true or false"):
        load_settings(cli={}, env={"LEMONADE_ACCESS_LOG": "maybe"}, cwd=tmp_path / "none")
    settings = load_settings(cli={"access_log": True}, env={"LEMONADE_ACCESS_LOG": "off"},
                             cwd=tmp_path / "none")
    assert (settings.access_log, settings.sources["access_log"]) == (True, "cli --access-log")
    settings = load_settings(cli={}, env={"LEMONADE_ACCESS_LOG": "0"}, cwd=tmp_path / "none")
    assert (settings.access_log, settings.sources["access_log"]) == (False,
                                                                     "env LEMONADE_ACCESS_LOG")


# ===================================================================== /metrics


def test_metrics_count_requests_latency_first_byte_and_queue_wait(server: Server) -> None:
    assert server.speech("tone").status == 200  # cold: waits for the 0.6 s load
    assert server.speech("tone", stream=True).status == 200  # warm, streamed
    assert server.speech("nosuch").status == 404
    assert server.get("/no/such/path-4471").status == 404
    found = samples(server)

    def requests(**labels: str) -> float | None:
        return value(found, "lemonade_requests_total", **labels)

    assert requests(route="/v1/audio/speech", method="POST", model="tone", status="200") == 2.0
    # A name nobody configured never becomes a label; the status is still counted.
    assert requests(route="/v1/audio/speech", method="POST", model="", status="404") == 1.0
    assert requests(route="unmatched", method="GET", model="", status="404") == 1.0
    assert "nosuch" not in label_values(found, "model")
    assert not any("path-4471" in v for v in label_values(found, "route"))

    speech = {"route": "/v1/audio/speech", "model": "tone"}
    assert value(found, "lemonade_request_seconds_count", **speech) == 2.0
    assert value(found, "lemonade_request_seconds_sum", **speech) >= 0.5  # type: ignore[operator]
    # Only the streamed answer has a time to first byte.
    assert value(found, "lemonade_time_to_first_byte_seconds_count", **speech) == 1.0
    assert value(found, "lemonade_time_to_first_token_seconds_count", **speech) is None

    wait = {"model": "tone"}
    assert value(found, "lemonade_queue_wait_seconds_count", **wait) == 2.0
    # The cold request waited for the load; the warm one did not wait for anything.
    assert value(found, "lemonade_queue_wait_seconds_sum", **wait) >= 0.5  # type: ignore[operator]
    assert value(found, "lemonade_queue_wait_seconds_bucket", le="0.25", **wait) == 1.0


def test_concurrent_cold_requests_all_wait_for_the_one_load(server: Server) -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: server.speech("tone").status, range(3)))
    assert results == [200, 200, 200]
    assert server.status()["server"]["spawns"] == 1
    found = samples(server)
    wait = {"model": "tone"}
    assert value(found, "lemonade_queue_wait_seconds_count", **wait) == 3.0
    # Each of the three waited for the one 0.6 s load (none were in the fastest buckets).
    assert value(found, "lemonade_queue_wait_seconds_bucket", le="0.25", **wait) == 0.0


# ===================================================================== tokens (real LLM)

LLM_CONFIG = """
[server]
auto_unload_timer = "10m"
[models.smol]
recipe = "llm"
type = "llm"
max_concurrency = 1
"""


@pytest.fixture
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"LEMONADE_DATA_DIR": str(shared_data_dir(tmp_path_factory))}
    server = launch_server(LLM_CONFIG, Path(tmp_path_factory.mktemp("access-llm")), env=env)
    try:
        yield server
    finally:
        problems = server.stop()
        assert not problems, problems


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chat_tokens_and_time_to_first_token(llm_server: Server) -> None:
    server = llm_server
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = server.post("/v1/chat/completions",
                        {"model": "smol", "messages": messages, "max_tokens": 4},
                        timeout=600)
    assert whole.status == 200, whole.body[:300]
    usage = whole.json()["usage"]
    streamed = server.post("/v1/chat/completions",
                           {"model": "smol", "messages": messages, "max_tokens": 3,
                            "stream": True, "stream_options": {"include_usage": True}},
                           timeout=120)
    assert streamed.status == 200
    events = [json.loads(line.removeprefix(b"data: ")) for line in streamed.body.split(b"\n\n")
              if line.startswith(b"data: {")]
    stream_usage = events[-1]["usage"]

    found = samples(server)
    assert value(found, "lemonade_prompt_tokens_total", model="smol") == \
        usage["prompt_tokens"] + stream_usage["prompt_tokens"]
    assert value(found, "lemonade_completion_tokens_total", model="smol") == \
        usage["completion_tokens"] + stream_usage["completion_tokens"]
    chat = {"route": "/v1/chat/completions", "model": "smol"}
    assert value(found, "lemonade_time_to_first_token_seconds_count", **chat) == 1.0
    assert value(found, "lemonade_time_to_first_byte_seconds_count", **chat) == 1.0
    lines = wait_lines(server, "POST", "/v1/chat/completions", 2)
    assert [(m.group(3), m.group(4)) for m in lines] == [("smol", "200"), ("smol", "200")]
