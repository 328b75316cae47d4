"""Request and response schemas of Ollama's routes (:mod:`supervisor.api.ollama`).

The request schemas are what those routes check a body against first
(:func:`supervisor.api.schemas.read_valid_body`; :func:`components` is merged into
:func:`supervisor.api.schemas.components`), and what ``/openapi.json`` publishes under the
same names, so the document and the routes cannot drift. The handlers' own checks come
after, for what a schema cannot say. Ollama's names and types throughout: ``options`` is
open (an option this server does not use is ignored, as Ollama ignores it); fields the
routes cannot serve (``format``, ``tools``, ``images``, ...) accept only their empty /
false values, with a message saying why. Errors are Ollama's ``{"error": "message"}``.
"""

from __future__ import annotations

from typing import Any

from supervisor.api import generation_args as g
from supervisor.api import schemas
from supervisor.api.schemas import ERROR_KEY, keep_alive, model_name, nullable, ref

Schema = dict[str, Any]

#: Ollama's embed routes: at most this many inputs per request (OpenAI's limit).
MAX_EMBED_INPUTS = 2048


def _obj(properties: Schema, required: list[str] | None = None, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        out["required"] = required
    return out


def _refused(schema: Schema, why: str) -> Schema:
    return nullable({**schema, ERROR_KEY: why})


def _stop() -> Schema:
    one = {"type": "string", "minLength": 1, "maxLength": g.MAX_STOP_CHARS}
    return nullable({"anyOf": [one, {"type": "array", "maxItems": g.MAX_STOP_STRINGS,
                                     "items": one}],
                     ERROR_KEY: f"must be a string or an array of at most "
                                f"{g.MAX_STOP_STRINGS} strings of 1..{g.MAX_STOP_CHARS} "
                                f"characters"})


def _options() -> Schema:
    return nullable(_obj({
        "temperature": nullable(schemas.number(0, 2)),
        "top_p": nullable(schemas.number(0, 1, exclusive_low=True)),
        "top_k": nullable(schemas.integer(0, 1_000_000)),
        "seed": nullable(schemas.integer(-g.MAX_SEED, g.MAX_SEED)),
        "num_predict": nullable(schemas.integer(-g.MAX_TOKENS_LIMIT, g.MAX_TOKENS_LIMIT)),
        "repeat_penalty": nullable(schemas.number(1, 2)),
        "stop": _stop(),
    }, description="mapped: temperature, top_p, top_k, seed (negative: random), num_predict "
                   "(-> max_tokens; 0 or negative: the model's own limit), stop, "
                   "repeat_penalty (-> repetition_penalty); other options are ignored"))


def _generation_fields() -> Schema:
    return {
        "stream": nullable({"type": "boolean"}),
        "keep_alive": keep_alive(),
        "options": _options(),
        "format": _refused({"type": "string", "enum": [""]},
                           "is not supported by this server (no JSON mode or structured "
                           "output)"),
        "think": _refused({"type": "boolean", "enum": [False]},
                          "is not supported by this server's models"),
        "logprobs": _refused({"type": "boolean", "enum": [False]},
                             "is not supported by this server"),
        "top_logprobs": _refused({"type": "integer", "enum": [0]},
                                 "is not supported by this server"),
    }


def _message() -> Schema:
    return _obj({
        "role": {"type": "string", "enum": list(g.ROLES),
                 ERROR_KEY: f"must be one of {', '.join(g.ROLES)} (tools are not supported)"},
        "content": {"type": "string", "maxLength": g.MAX_CONTENT_CHARS},
        "images": _refused({"type": "array", "maxItems": 0},
                           "is not supported: images are not supported by this server"),
        "tool_calls": _refused({"type": "array", "maxItems": 0},
                               "is not supported: tools are not supported by this server"),
    }, ["role", "content"])


_DONE_REASONS = ["stop", "length", "load", "unload"]
_COUNTS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
           "eval_count", "eval_duration")


def _final_fields() -> Schema:
    return {
        "model": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "done": {"type": "boolean"},
        "done_reason": {"type": "string", "enum": _DONE_REASONS},
        **{name: {"type": "integer", "minimum": 0,
                  "description": "nanoseconds" if name.endswith("duration") else "tokens"}
           for name in _COUNTS},
    }


def _details() -> Schema:
    return _obj({
        **{key: {"type": "string"} for key in ("parent_model", "format", "family",
                                              "parameter_size", "quantization_level")},
        "families": {"type": "array", "items": {"type": "string"}},
    })


def components() -> dict[str, Schema]:
    """``#/components/schemas`` of Ollama's routes, by name."""
    vector = {"type": "array", "items": {"type": "number"}}
    item = {"type": "string", "minLength": 1}
    return {
        "OllamaChatRequest": _obj({
            "model": model_name("llm"),
            "messages": nullable({"type": "array", "maxItems": g.MAX_MESSAGES,
                                  "items": _message(),
                                  "description": "empty or left out: only load the model "
                                                 "(with keep_alive 0: unload it)"}),
            "tools": _refused({"type": "array", "maxItems": 0},
                              "is not supported: tools are not supported by this server"),
            **_generation_fields(),
        }, ["model"]),
        "OllamaGenerateRequest": _obj({
            "model": model_name("llm"),
            "prompt": nullable({"type": "string", "maxLength": g.MAX_CONTENT_CHARS,
                                "description": "empty or left out: only load the model "
                                               "(with keep_alive 0: unload it)"}),
            "system": nullable({"type": "string", "maxLength": g.MAX_CONTENT_CHARS}),
            "raw": nullable({"type": "boolean"}),
            "images": _refused({"type": "array", "maxItems": 0},
                               "is not supported: images are not supported by this server"),
            "template": _refused({"type": "string", "enum": [""]},
                                 "is not supported: the model's own chat template is used"),
            "suffix": _refused({"type": "string", "enum": [""]},
                               "is not supported (no fill-in-the-middle)"),
            "context": _refused({"type": "array", "maxItems": 0},
                                "is not supported: send the conversation to /api/chat"),
            **_generation_fields(),
        }, ["model"]),
        "OllamaEmbedRequest": _obj({
            "model": model_name("embedding"),
            "input": nullable({"anyOf": [{"type": "string"},
                                         {"type": "array", "maxItems": MAX_EMBED_INPUTS,
                                          "items": item}]}),
            "truncate": _refused({"type": "boolean", "enum": [True]},
                                 "cannot be false: longer inputs are always truncated"),
            "dimensions": nullable(schemas.integer(1, 65536)),
            "keep_alive": keep_alive(),
            "options": nullable({"type": "object"}),
        }, ["model"]),
        "OllamaEmbeddingsRequest": _obj({
            "model": model_name("embedding"),
            "prompt": nullable({"type": "string", "maxLength": g.MAX_CONTENT_CHARS}),
            "keep_alive": keep_alive(),
            "options": nullable({"type": "object"}),
        }, ["model"]),
        "OllamaShowRequest": _obj({"model": model_name("*"),
                                   "verbose": nullable({"type": "boolean"})}, ["model"]),
        "OllamaChatResponse": _obj({
            **_final_fields(),
            "message": _obj({"role": {"type": "string", "enum": ["assistant"]},
                             "content": {"type": "string"}}, ["role", "content"]),
        }, ["model", "created_at", "message", "done"],
            description="one object, or each NDJSON line of a stream (the last: done true)"),
        "OllamaGenerateResponse": _obj({**_final_fields(), "response": {"type": "string"}},
                                       ["model", "created_at", "response", "done"],
                                       description="one object, or each NDJSON line of a "
                                                   "stream (the last: done true)"),
        "OllamaEmbedResponse": _obj({
            "model": {"type": "string"}, "embeddings": {"type": "array", "items": vector},
            **{k: {"type": "integer", "minimum": 0}
               for k in ("total_duration", "load_duration", "prompt_eval_count")},
        }, ["model", "embeddings"]),
        "OllamaEmbeddingsResponse": _obj({"embedding": vector}, ["embedding"]),
        "OllamaTags": _obj({"models": {"type": "array", "items": _obj({
            "name": {"type": "string"}, "model": {"type": "string"},
            "modified_at": {"type": "string", "format": "date-time"},
            "size": {"type": "integer"}, "digest": {"type": "string"}, "details": _details(),
        }, ["name", "model", "modified_at", "size", "digest", "details"])}}, ["models"]),
        "OllamaShow": _obj({
            "modelfile": {"type": "string"}, "parameters": {"type": "string"},
            "template": {"type": "string"}, "details": _details(),
            "model_info": {"type": "object"},
            "capabilities": {"type": "array", "items": {"type": "string"}},
            "modified_at": {"type": "string", "format": "date-time"},
        }, ["modelfile", "parameters", "template", "details", "model_info", "capabilities"]),
        "OllamaVersion": _obj({"version": {"type": "string"}}, ["version"]),
    }


_MODEL_STATUSES = schemas.MODEL_ROUTE
_READ_STATUSES = ("400", "401", "403", "404", "413")


def _op(summary: str, response: str, *, request: str | None = None, ndjson: bool = False,
        statuses: tuple[str, ...] = _MODEL_STATUSES) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": ref(response)}}
    if ndjson:
        content["application/x-ndjson"] = {"schema": {
            "type": "string", "description": f"one {response} per line; the last has done: "
                                             f"true, or is {{\"error\": \"...\"}}"}}
    ok: dict[str, Any] = {"description": "success", "content": content}
    if request is not None and response != "OllamaShow":
        ok["headers"] = {"X-Lemonade-Worker-Pid": {
            "description": "pid of the worker that answered (absent for a load or unload)",
            "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    out: dict[str, Any] = {"summary": summary,
                           "responses": {"200": ok, **schemas.ollama_errors(statuses)}}
    if request is not None:
        out["requestBody"] = {"required": True,
                              "content": {"application/json": {"schema": ref(request)}}}
    return out


#: Ollama's routes for GET /openapi.json (see supervisor/api/openapi.py).
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/api/chat": {"post": _op("Chat (Ollama): an NDJSON stream unless stream is false; no "
                              "messages loads the model, with keep_alive 0 unloads it",
                              "OllamaChatResponse", request="OllamaChatRequest", ndjson=True)},
    "/api/generate": {"post": _op("Generate (Ollama): an NDJSON stream unless stream is "
                                  "false; no prompt loads the model, with keep_alive 0 "
                                  "unloads it", "OllamaGenerateResponse",
                                  request="OllamaGenerateRequest", ndjson=True)},
    "/api/embed": {"post": _op("Embeddings of one or more inputs (Ollama); no input loads "
                               "the model", "OllamaEmbedResponse",
                               request="OllamaEmbedRequest")},
    "/api/embeddings": {"post": _op("One embedding (Ollama's older route)",
                                    "OllamaEmbeddingsResponse",
                                    request="OllamaEmbeddingsRequest")},
    "/api/tags": {"get": _op("The models Ollama's API can serve (llm and embedding)",
                             "OllamaTags", statuses=schemas.ANY_ROUTE)},
    "/api/show": {"post": _op("What is known of one model (Ollama)", "OllamaShow",
                              request="OllamaShowRequest", statuses=_READ_STATUSES)},
    "/api/ps": {"get": _op("Resident models (Ollama): size, size_vram, expires_at (null: "
                           "no idle timer runs)", "RunningModels", statuses=schemas.ANY_ROUTE)},
    "/api/version": {"get": _op("The server's version (Ollama's route)", "OllamaVersion",
                                statuses=schemas.ANY_ROUTE)},
    "/": {"get": {"summary": "Liveness, as Ollama answers it (plain text); a browser "
                             "(Accept prefers text/html) is redirected to the dashboard",
                  "responses": {"200": {"description": "running", "content": {
                      "text/plain": {"schema": {"type": "string"}}}},
                      "303": {"description": "to the dashboard (/ui), for a browser",
                              "headers": {"Location": {"schema": {"type": "string"}}}},
                      **schemas.ollama_errors(schemas.ANY_ROUTE)}}},
}
