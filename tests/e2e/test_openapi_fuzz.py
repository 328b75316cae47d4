"""``GET /openapi.json`` describes every route, and schemathesis fuzzing it finds no 500.

The server is a real ``lemonade serve`` subprocess with one synthetic model. Each operation
in the served document is fuzzed with schema-valid and schema-violating inputs (a few dozen
examples each, so the test stays within seconds); any 500, and any bug line in the server
log (the fixture checks that), fails the test.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.e2e.conftest import Server

CONFIG = """
[server]
auto_unload_timer = "5s"
stop_grace = "1s"
[models.tone]
recipe = "synthetic"
type = "tts"
"""
#: Streams that never end by themselves are not fuzzed.
SKIP = {"/api/v1/events"}
EXAMPLES = int(os.environ.get("LEMONADE_FUZZ_EXAMPLES", "10"))


def test_openapi_document_lists_every_registered_route(start_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server(CONFIG)
    result = server.get("/openapi.json")
    assert result.status == 200
    doc = result.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/models", "/v1/audio/speech", "/api/v1/load", "/api/v1/unload",
                 "/api/v1/status", "/health", "/metrics", "/openapi.json"):
        assert path in doc["paths"], path
    schemathesis.openapi.from_dict(doc).validate()  # a valid OpenAPI 3.0 document


@pytest.mark.slow
def test_fuzzing_every_operation_finds_no_500(start_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server(CONFIG)
    doc = server.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    session = requests.Session()
    session.trust_env = False  # never send loopback traffic to a proxy
    seen: dict[int, int] = {}
    failures: list[str] = []

    def fuzz(operation: Any, mode: GenerationMode) -> None:
        label = f"{operation.label} ({mode.value})"

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=server.url, session=session, timeout=20)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if response.status_code == 500:
                failures.append(f"{label}: {case.body!r:.200} -> {response.text[:300]}")

        try:
            run()
        except Unsatisfiable:
            pass  # nothing to violate (a GET without parameters, negative mode)

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIP:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode)
    session.close()
    assert not failures, "\n".join(failures[:10])
    assert sum(seen.values()) >= 2 * EXAMPLES  # it really ran
    assert server.alive()
