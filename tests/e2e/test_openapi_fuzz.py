"""``GET /openapi.json`` describes every route exactly, and the server keeps to it.

The server is a real ``lemonade serve`` subprocess with one synthetic speech model (the
default model, so the compat routes act on it). Every operation in the served document is
fuzzed by schemathesis with schema-valid and schema-violating inputs, and every response is
put through all of schemathesis's checks: no server error, a documented status code and
content type, the documented response schema and headers, invalid data rejected (4xx) and
valid data accepted (not a 400). The document names the configured models, so valid
requests reach the real speech model and the lifecycle routes really load and unload it;
routes of types no model here serves (chat, embeddings, transcriptions) answer valid requests
with their 404 and invalid ones with a 400 from the same schema.

``LEMONADE_FUZZ_EXAMPLES`` sets the examples per operation and mode (default 25: well under a
minute on two cores).
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
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES

from tests.e2e.conftest import Server

CONFIG = """
[server]
auto_unload_timer = "5s"
stop_grace = "1s"
default_model = "tone"
[models.tone]
recipe = "synthetic"
type = "tts"
"""
#: Streams that never end by themselves are not fuzzed.
SKIP = {"/api/v1/events"}
EXAMPLES = int(os.environ.get("LEMONADE_FUZZ_EXAMPLES", "25"))
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def test_openapi_document_lists_every_registered_route(start_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server(CONFIG)
    result = server.get("/openapi.json")
    assert result.status == 200
    doc = result.json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/models", "/v1/audio/speech", "/v1/audio/voices", "/v1/chat/completions",
                 "/v1/completions", "/v1/embeddings", "/v1/audio/transcriptions",
                 "/api/v1/load", "/api/v1/unload", "/api/v1/timeout", "/api/v1/status",
                 "/api/ps", "/dev/unload", "/model/unload", "/model/timeout", "/health",
                 "/metrics", "/openapi.json", "/api/v1/pin", "/ui", "/ui/dashboard.js"):
        assert path in doc["paths"], path
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "(undocumented)" not in operation["summary"], (method, path)
            assert "schema" in next(iter(operation["responses"]["200"]["content"].values()))
    upload = doc["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    assert list(upload) == ["multipart/form-data"]
    speech = doc["components"]["schemas"]["SpeechRequest"]["properties"]
    assert speech["model"]["enum"] == ["tone"]  # the configured speech model
    schemathesis.openapi.from_dict(doc).validate()  # a valid OpenAPI 3.0 document


def test_every_other_method_is_a_405_saying_what_is_allowed(start_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server(CONFIG)
    doc = server.get("/openapi.json").json()
    checked = 0
    with requests.Session() as session:
        session.trust_env = False
        for path, operations in doc["paths"].items():
            if "{" in path:
                continue
            documented = {m.upper() for m in operations}
            allowed = documented | ({"HEAD"} if "GET" in documented else set())
            for method in METHODS:
                if method in documented:
                    continue
                response = session.request(method, server.url + path, timeout=10)
                assert response.status_code == 405, (method, path, response.text)
                assert set(response.headers["Allow"].split(", ")) == allowed, (method, path)
                error = response.json()["error"]  # OpenAI's shape, or Ollama's string on /api/*
                assert error["code"] == "method_not_allowed" if isinstance(error, dict) else error
                checked += 1
    assert checked > 50


@pytest.mark.slow
def test_fuzzing_every_operation_passes_every_check(start_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server(CONFIG)
    doc = server.get("/openapi.json").json()
    # A body past the size limit is rejected too, with 413 (schemathesis counts 4xx but 413).
    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {
        "expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]}}})
    schema = schemathesis.openapi.from_dict(doc, config=config)
    session = requests.Session()
    session.trust_env = False  # never send loopback traffic to a proxy
    seen: dict[str, dict[int, int]] = {}
    failures: dict[str, str] = {}

    def fuzz(operation: Any, mode: GenerationMode) -> None:
        label = f"{operation.label} ({mode.value})"

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=server.url, session=session, timeout=30)
            counts = seen.setdefault(label, {})
            counts[response.status_code] = counts.get(response.status_code, 0) + 1
            try:
                case.validate_response(response)
            except BaseExceptionGroup as e:  # schemathesis's FailureGroup: checks failed
                # One report per operation, mode and kind of failure is enough to act on.
                kinds = ", ".join(sorted(type(f).__name__ for f in e.exceptions))
                report = str(e)[:1500]
                if response.status_code >= 500:  # the server's own account of it
                    log = server.log_text()
                    report += "\nserver log:\n" + log[log.rfind("Traceback"):][:3000]
                failures.setdefault(f"{label}: {kinds}", report)

        try:
            run()
        except Unsatisfiable:
            pass  # nothing to violate (a GET without parameters, negative mode)

    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path in SKIP:
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation, mode)
    finally:
        session.close()
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in list(failures.items())[:8])
    total = sum(sum(c.values()) for c in seen.values())
    assert total >= 10 * EXAMPLES, seen  # it really ran
    # Valid requests really reached the speech model and the lifecycle.
    assert seen["POST /v1/audio/speech (positive)"].get(200), seen
    assert seen["POST /api/v1/load (positive)"].get(200), seen
    assert any(s >= 400 for s in seen["POST /v1/audio/speech (negative)"]), seen
    assert server.alive()
