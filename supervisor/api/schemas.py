"""Request and response schemas of every route: what the routes check first, and what
``GET /openapi.json`` publishes.

One definition per request body, written in OpenAPI 3.0's schema dialect, serves both:

* :func:`read_valid_body` parses a JSON body (``supervisor.api.body``: no NaN, no duplicate
  keys, bounded depth) and checks it against the named schema before the handler looks at
  it; a violation is a 400 ``BadRequest`` naming the field (``'temperature' must be between
  0 and 2, got 3``). The handler's own checks stay for what a schema cannot say (e.g. a
  prompt too long for the model's context). So the document cannot accept what the route
  rejects for want of a rule here, and cannot reject what the route accepts;
* :data:`COMPONENT_SCHEMAS` become ``#/components/schemas`` of the document, and each route
  module's ``OPENAPI_PATHS`` refers to them through :func:`operation`.

The schemas are built on first use (:func:`components`), from the constants the route
modules themselves enforce (limits, formats, roles), so a limit changed in a route changes
its schema too.

Model names: a ``model`` field carries ``x-lemonade-model-type`` (the type of model the
route needs, or ``*``). The route checks only the name's spelling (an unknown name is the
route's 404); :func:`specialize` turns the marker into an ``enum`` of the names configured
on one server when the document is built, so a client (or a fuzzer) sees which names work.

Errors: ``#/components/schemas/Error`` is OpenAI's ``{"error": {"message", "type", "code",
"param"}}``; ``#/components/schemas/OllamaError`` is Ollama's ``{"error": "..."}`` for the
Ollama-shaped routes (:func:`ollama_errors`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
from aiohttp import web

from supervisor.api.body import Body, json_type, parse_json_object
from supervisor.config_values import MODEL_NAME_RE
from supervisor.errors import BadRequest

if TYPE_CHECKING:
    from supervisor.manager import Manager

Schema = dict[str, Any]

MODEL_TYPE_KEY = "x-lemonade-model-type"
#: A human sentence used instead of the generic one when this (sub)schema fails.
ERROR_KEY = "x-lemonade-error"
#: On a query parameter: required unless the server has a default model of this type.
DEFAULT_MODEL_KEY = "x-lemonade-default-model"

# --------------------------------------------------------------------------- building blocks


def nullable(schema: Schema) -> Schema:
    """``schema`` or JSON null (OpenAI's clients send ``null`` for "not set")."""
    out = {**schema, "nullable": True}
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


def text(max_length: int, *, blank: bool = False) -> Schema:
    """A string of at most ``max_length`` characters; unless ``blank``, not only spaces."""
    schema: Schema = {"type": "string", "maxLength": max_length}
    if not blank:
        schema["pattern"] = r"\S"
        schema["minLength"] = 1
    return schema


def number(low: float, high: float, *, exclusive_low: bool = False) -> Schema:
    schema: Schema = {"type": "number", "minimum": low, "maximum": high}
    if exclusive_low:
        schema["exclusiveMinimum"] = True
    return schema


def integer(low: int, high: int) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": high}


def model_name(model_type: str) -> Schema:
    """A model's name; ``model_type`` ("llm", "tts", ..., or "*") drives :func:`specialize`."""
    return {"type": "string", "minLength": 1, "maxLength": 128, "pattern": MODEL_NAME_RE.pattern,
            MODEL_TYPE_KEY: model_type,
            "description": "a configured model's name"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


#: A duration as supervisor.units parses it: "90s", "5m", "1h30m", "500ms", "1.5h".
_NUM = r"(\d+(\.\d*)?|\.\d+)"
_UNIT = r"([mM][sS]|[hH]|[mM]|[sS])"
_NEVER = r"[nN][eE][vV][eE][rR]"
#: Seconds beyond this are a mistake (and past float range they would be garbage).
MAX_SECONDS = 1e12


_KEEP_ALIVE_TEXT: Schema = {"type": "string", "maxLength": 32,
                            "pattern": rf"^([+-]?{_NUM}|[+-]?({_NUM}{_UNIT})+|{_NEVER})$"}


def keep_alive() -> Schema:
    """Ollama's ``keep_alive``: seconds or a duration; 0 = unload when idle, negative = never."""
    return nullable({
        "anyOf": [number(-MAX_SECONDS, MAX_SECONDS), dict(_KEEP_ALIVE_TEXT)],
        ERROR_KEY: 'must be seconds or a duration like "5m" (0 unloads as soon as idle, '
                   'a negative value or "never" never unloads)',
    })


def idle_timeout() -> Schema:
    """A configured-style idle timeout: seconds or a duration, 0 or "never" = never."""
    return {
        "anyOf": [
            number(0, MAX_SECONDS),
            {"type": "string", "maxLength": 32,
             "pattern": rf"^(\+?{_NUM}|\+?({_NUM}{_UNIT})+|{_NEVER})$"},
        ],
        ERROR_KEY: 'must be seconds (300), a duration like "5m", or 0/"never" for never',
    }


def _object(properties: Mapping[str, Schema], *, required: Sequence[str] = (),
            closed: bool = False, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": dict(properties), **extra}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


EMPTY_OBJECT: Schema = {"type": "object", "additionalProperties": False,
                        "description": "no body, or an empty JSON object"}

# --------------------------------------------------------------------------- the definitions


def _requests() -> dict[str, Schema]:
    # Imported here, not at the top: the route modules import this one.
    from supervisor.api import compat, embeddings, openai, transcriptions
    from workers import speech_formats

    try:  # where the generation limits live (shared by the OpenAI and Ollama routes)
        from supervisor.api import generation_args as chat
    except ImportError:  # pragma: no cover - before that module existed
        from supervisor.api import chat  # type: ignore[no-redef]

    common = {
        "keep_alive": keep_alive(),
        "ttl": keep_alive(),
    }
    sampling = {
        "stream": nullable({"type": "boolean"}),
        "stream_options": nullable(_object({
            "include_usage": nullable({"type": "boolean"}),
        }, description="only with stream: true")),
        "max_tokens": nullable(integer(1, chat.MAX_TOKENS_LIMIT)),
        "max_completion_tokens": nullable(integer(1, chat.MAX_TOKENS_LIMIT)),
        "temperature": nullable(number(0.0, 2.0)),
        "top_p": nullable(number(0.0, 1.0, exclusive_low=True)),
        "top_k": nullable(integer(0, 1_000_000)),
        "repetition_penalty": nullable(number(1.0, 2.0)),
        "seed": nullable(integer(-chat.MAX_SEED, chat.MAX_SEED)),
        "stop": nullable({
            "anyOf": [
                text(chat.MAX_STOP_CHARS, blank=True) | {"minLength": 1},
                {"type": "array", "maxItems": chat.MAX_STOP_STRINGS,
                 "items": text(chat.MAX_STOP_CHARS, blank=True) | {"minLength": 1}},
            ],
            ERROR_KEY: f"must be a string or an array of at most {chat.MAX_STOP_STRINGS} "
                       f"strings of 1..{chat.MAX_STOP_CHARS} characters",
        }),
        # Fields this server does not implement: only the value that changes nothing.
        "n": nullable(integer(1, 1) | {ERROR_KEY: "must be 1: this server returns one "
                                                  "choice per request"}),
        "best_of": nullable(integer(1, 1) | {ERROR_KEY: "must be 1"}),
        "logprobs": {"enum": [False, 0, None], "nullable": True,
                     ERROR_KEY: "is not supported by this server (false or 0 only)"},
        "echo": {"enum": [False, None], "nullable": True,
                 ERROR_KEY: "is not supported by this server (false only)"},
        "suffix": {"enum": ["", None], "nullable": True,
                   ERROR_KEY: "is not supported by this server"},
        "tools": nullable({"type": "array", "maxItems": 0,
                           ERROR_KEY: "are not supported by this server"}),
        "functions": nullable({"type": "array", "maxItems": 0,
                               ERROR_KEY: "are not supported by this server"}),
        "response_format": nullable(_object(
            {"type": {"type": "string", "enum": ["text"]}}, required=["type"])
            | {ERROR_KEY: "must be {\"type\": \"text\"}: structured output is not supported "
                          "by this server"}),
        "presence_penalty": nullable(number(0, 0) | {ERROR_KEY: "is not supported by this "
                                                                "server (only 0)"}),
        "frequency_penalty": nullable(number(0, 0) | {ERROR_KEY: "is not supported by this "
                                                                 "server (only 0)"}),
        "user": nullable(text(256)),
        **common,
    }
    sampling_rules = [
        {"not": {"required": ["max_tokens", "max_completion_tokens"],
                 "properties": {"max_tokens": {"type": "integer"},
                                "max_completion_tokens": {"type": "integer"}}},
         ERROR_KEY: "'max_tokens' and 'max_completion_tokens': send one of them"},
        {"not": {"required": ["stream_options"],
                 "properties": {"stream_options": {"type": "object"},
                                "stream": {"not": {"type": "boolean", "enum": [True]}}}},
         ERROR_KEY: "'stream_options' is only allowed when 'stream' is true"},
    ]
    text_part = _object({"type": {"type": "string", "enum": ["text"]},
                         "text": {"type": "string", "maxLength": chat.MAX_CONTENT_CHARS}},
                        required=["type", "text"])
    message = _object({
        "role": {"type": "string", "enum": list(chat.ROLES),
                 ERROR_KEY: f"must be one of {', '.join(chat.ROLES)} (tools are not "
                            f"supported)"},
        "content": {
            "anyOf": [{"type": "string", "maxLength": chat.MAX_CONTENT_CHARS},
                      {"type": "array", "items": text_part}],
            ERROR_KEY: "must be a string or an array of text parts {\"type\": \"text\", "
                       "\"text\": ...}; images and audio are not supported",
        },
        "name": nullable({"type": "string", "maxLength": 256}),
        "tool_calls": nullable({"type": "array", "maxItems": 0,
                                ERROR_KEY: "tools are not supported by this server"}),
        "function_call": nullable({"type": "object", "maxProperties": 0,
                                   ERROR_KEY: "tools are not supported by this server"}),
    }, required=["role", "content"])
    prompt_text = {"type": "string", "minLength": 1, "maxLength": chat.MAX_CONTENT_CHARS}
    embedding_text = {"type": "string", "minLength": 1}

    return {
        "ChatCompletionRequest": _object({
            "model": model_name("llm"),
            "messages": {"type": "array", "minItems": 1, "maxItems": chat.MAX_MESSAGES,
                         "items": message},
            **sampling,
        }, required=["model", "messages"], allOf=sampling_rules),
        "CompletionRequest": _object({
            "model": model_name("llm"),
            "prompt": {
                "anyOf": [prompt_text,
                          {"type": "array", "minItems": 1, "maxItems": 1,
                           "items": prompt_text}],
                ERROR_KEY: "must be a non-empty string (or an array of exactly one string); "
                           "token arrays and batches are not supported",
            },
            **sampling,
        }, required=["model", "prompt"], allOf=sampling_rules),
        "EmbeddingsRequest": _object({
            "model": model_name("embedding"),
            "input": {
                "anyOf": [embedding_text,
                          {"type": "array", "minItems": 1, "maxItems": embeddings.MAX_INPUTS,
                           "items": embedding_text}],
                ERROR_KEY: f"must be a non-empty string or an array of 1..{embeddings.MAX_INPUTS}"
                           f" non-empty strings; this server embeds text only, not token ids",
            },
            "encoding_format": {"type": "string", "enum": ["float", "base64", None],
                                "nullable": True},
            "dimensions": nullable(integer(1, embeddings.MAX_DIMENSIONS)),
            "user": nullable(text(256)),
            **common,
        }, required=["model", "input"]),
        "SpeechRequest": _object({
            "model": model_name("tts"),
            "input": text(openai.MAX_SPEECH_INPUT_CHARS),
            "voice": nullable(text(256) | {"description": "a voice of the model (see "
                                                          "GET /v1/audio/voices)"}),
            # Every format OpenAI names; which ones a model can produce goes by its kind (a
            # 400 naming them, before any load); the document lists those (specialize).
            "response_format": {"type": "string", "nullable": True,
                                "enum": [*speech_formats.OPENAI_FORMATS, None]},
            "speed": nullable(number(speech_formats.MIN_SPEED, speech_formats.MAX_SPEED)),
            "stream": nullable({"type": "boolean"}),
            "stream_format": {"type": "string", "nullable": True,
                              "enum": [*speech_formats.STREAM_FORMATS, None],
                              "description": "audio: the bytes (chunked with stream: true); "
                                             "sse: server-sent events with base64 audio"},
            **common,
        }, required=["model", "input"]),
        "TranscriptionRequest": _object({
            "model": model_name("asr"),
            "file": {"type": "string", "format": "binary", "minLength": 1,
                     "description": "the audio file (not empty)"},
            "language": {"type": "string", "pattern": r"^([a-z]{2,3})?$",
                         ERROR_KEY: "must be an ISO-639-1 code such as 'en'"},
            "prompt": {"type": "string", "maxLength": transcriptions.MAX_PROMPT_CHARS},
            "response_format": {"type": "string",
                                "enum": list(transcriptions.RESPONSE_FORMATS)},
            "temperature": number(0.0, 1.0),
            "stream": {"type": "boolean", "enum": [False],
                       ERROR_KEY: "is not supported for transcriptions; leave it out or false"},
            "timestamp_granularities[]": {"type": "array", "maxItems": 2,
                                          "items": {"type": "string",
                                                    "enum": ["segment", "word"]}},
            "keep_alive": _KEEP_ALIVE_TEXT | {ERROR_KEY: 'must be seconds or a duration like "5m"'},
            "ttl": _KEEP_ALIVE_TEXT | {ERROR_KEY: 'must be seconds or a duration like "5m"'},
            # OpenAI's, accepted and ignored.
            # (A form has at most transcriptions.MAX_PARTS parts: arrays are bounded.)
            **{name: {"type": "array", "maxItems": 4, "items": {"type": "string"}}
               if name.endswith("[]")
               else {"type": "string"} for name in sorted(transcriptions.IGNORED_FIELDS)},
        }, required=["model", "file"], closed=True, anyOf=[
            {"required": ["response_format"],
             "properties": {"response_format": {"enum": ["verbose_json"]}}},
            {"properties": {"timestamp_granularities[]": {"items": {"enum": ["segment"]}}}},
        ]),
        "LoadRequest": _object({
            "model_name": model_name("*"),
            "pinned": nullable({"type": "boolean"}),
            "idle_timeout": nullable(idle_timeout()),
        }, required=["model_name"], closed=True),
        "UnloadRequest": _object({
            "model_name": nullable(model_name("*")),
            "force": nullable({"type": "boolean"}),
        }, closed=True, description="no body unloads every model"),
        "TimeoutRequest": _object({
            "model_name": nullable(model_name("*")),
            "idle_timeout": idle_timeout(),
        }, required=["idle_timeout"], closed=True),
        "PinRequest": _object({
            "model_name": model_name("*"),
            "pinned": {"type": "boolean"},
        }, required=["model_name", "pinned"], closed=True),
        "ModelTimeoutRequest": _object({
            "timeout_seconds": number(compat.MIN_TIMEOUT_S, 365 * 86400),
        }, required=["timeout_seconds"], closed=True),
        "EmptyRequest": EMPTY_OBJECT,
    }


_NULLABLE_STRING = {"type": "string", "nullable": True}
_NULLABLE_INT = {"type": "integer", "nullable": True}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}
_USAGE = _object({"prompt_tokens": {"type": "integer"},
                  "completion_tokens": {"type": "integer"},
                  "total_tokens": {"type": "integer"}},
                 required=["prompt_tokens", "completion_tokens", "total_tokens"])
_FINISH = {"type": "string", "enum": ["stop", "length"]}


def _responses() -> dict[str, Schema]:
    def completion_base(obj: str) -> dict[str, Schema]:
        return {"id": {"type": "string"}, "object": {"type": "string", "enum": [obj]},
                "created": {"type": "integer"}, "model": {"type": "string"},
                "system_fingerprint": {"type": "string"}}

    base_required = ["id", "object", "created", "model", "choices"]
    return {
        "Error": _object({"error": _object({
            "message": {"type": "string"},
            "type": {"type": "string"},
            "code": _NULLABLE_STRING,
            "param": _NULLABLE_STRING,
        }, required=["message", "type", "param", "code"])}, required=["error"],
            description="OpenAI's error shape"),
        "OllamaError": _object({"error": {"type": "string"}}, required=["error"],
                               description="Ollama's error shape"),
        "Model": _object({
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"}, "owned_by": {"type": "string"},
            "type": {"type": "string"}, "recipe": {"type": "string"},
            "state": {"type": "string"},
        }, required=["id", "object", "created", "owned_by"]),
        "ModelList": _object({"object": {"type": "string", "enum": ["list"]},
                              "data": {"type": "array", "items": ref("Model")}},
                             required=["object", "data"]),
        "ChatCompletion": _object({
            **completion_base("chat.completion"),
            "choices": {"type": "array", "items": _object({
                "index": {"type": "integer"},
                "message": _object({"role": {"type": "string", "enum": ["assistant"]},
                                    "content": _NULLABLE_STRING,
                                    "refusal": _NULLABLE_STRING},
                                   required=["role", "content", "refusal"]),
                "logprobs": {"type": "object", "nullable": True},
                "finish_reason": _FINISH,
            }, required=["index", "message", "finish_reason", "logprobs"])},
            "usage": _USAGE,
        }, required=base_required),
        "ChatCompletionChunk": _object({
            **completion_base("chat.completion.chunk"),
            "choices": {"type": "array", "items": _object({
                "index": {"type": "integer"},
                "delta": _object({"role": {"type": "string", "enum": ["assistant"]},
                                  "content": _NULLABLE_STRING,
                                  "refusal": _NULLABLE_STRING}),
                "logprobs": {"type": "object", "nullable": True},
                "finish_reason": nullable(_FINISH),
            }, required=["index", "delta", "finish_reason"])},
            "usage": nullable(_USAGE),
        }, required=base_required, description="one `data:` event of a streamed chat"),
        "Completion": _object({
            **completion_base("text_completion"),
            "choices": {"type": "array", "items": _object({
                "index": {"type": "integer"}, "text": {"type": "string"},
                "logprobs": {"type": "object", "nullable": True},
                "finish_reason": _FINISH,
            }, required=["index", "text", "finish_reason", "logprobs"])},
            "usage": _USAGE,
        }, required=base_required),
        "CompletionChunk": _object({
            **completion_base("text_completion"),
            "choices": {"type": "array", "items": _object({
                "index": {"type": "integer"}, "text": {"type": "string"},
                "logprobs": {"type": "object", "nullable": True},
                "finish_reason": nullable(_FINISH),
            }, required=["index", "text", "finish_reason"])},
            "usage": _USAGE,
        }, required=base_required, description="one `data:` event of a streamed completion"),
        "Embeddings": _object({
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _object({
                "object": {"type": "string", "enum": ["embedding"]},
                "index": {"type": "integer"},
                "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                        {"type": "string", "format": "byte"}]},
            }, required=["object", "index", "embedding"])},
            "model": {"type": "string"},
            "usage": _object({"prompt_tokens": {"type": "integer"},
                              "total_tokens": {"type": "integer"}},
                             required=["prompt_tokens", "total_tokens"]),
        }, required=["object", "data", "model", "usage"]),
        "Transcription": _object({
            "text": {"type": "string"},
            "task": {"type": "string"},
            "language": _NULLABLE_STRING,
            "duration": _NULLABLE_NUMBER,
            "segments": {"type": "array", "items": _object(
                {"start": {"type": "number"}, "end": {"type": "number"},
                 "text": {"type": "string"}}, required=["start", "end", "text"])},
            "words": {"type": "array", "items": {"type": "object"}},
        }, required=["text"], description="json: text only; verbose_json: all fields"),
        "Voices": _object({
            "model": {"type": "string"},
            "voices": {"type": "array", "items": {"type": "string"}},
            "default": _NULLABLE_STRING,
            "loaded": {"type": "boolean"},
            "data": {"type": "array", "items": _object(
                {"id": {"type": "string"}, "name": {"type": "string"},
                 "object": {"type": "string", "enum": ["voice"]}},
                required=["id", "name", "object"])},
        }, required=["model", "voices", "default", "loaded", "data"]),
        "Health": _object({"status": {"type": "string", "enum": ["ok"]}}, required=["status"]),
        "LemonadeHealth": _object({
            "status": {"type": "string", "enum": ["ok", "unhealthy"]},
            "version": {"type": "string"},
            "problems": {"type": "array", "items": {"type": "string"},
                         "description": "why it is unhealthy (503)"},
            "model_loaded": _NULLABLE_STRING,
            "all_models_loaded": {"type": "array", "items": _object({
                "model_name": {"type": "string"}, "type": {"type": "string"},
                "pid": _NULLABLE_INT, "device": _NULLABLE_STRING},
                required=["model_name", "type"])},
        }, required=["status", "version", "model_loaded", "all_models_loaded"]),
        "ModelStatus": _object({
            "name": {"type": "string"}, "kind": {"type": "string"},
            "type": {"type": "string"},
            "state": {"type": "string",
                      "enum": ["unloaded", "loading", "ready", "stopping", "failed"]},
            "pid": _NULLABLE_INT, "in_flight": {"type": "integer"},
            "waiting": {"type": "integer"}, "device": _NULLABLE_STRING,
            "node": _NULLABLE_STRING,
            "idle_timeout_s": _NULLABLE_NUMBER, "idle_timeout_source": {"type": "string"},
            "expires_at": _NULLABLE_STRING, "last_used": _NULLABLE_STRING,
            "loaded_at": _NULLABLE_STRING, "load_seconds": _NULLABLE_NUMBER,
            "progress": {"type": "object", "nullable": True},
            "memory": _object({"rss_bytes": {"type": "integer"},
                               "vram_bytes": {"type": "integer"}}),
            "pinned": {"type": "boolean"}, "restarts": {"type": "integer"},
            "failures": {"type": "integer"}, "last_error": {"nullable": True},
            "info": {"type": "object", "nullable": True},
        }, required=["name", "kind", "type", "state", "pid", "memory", "pinned"]),
        "Status": _object({"server": _object({"version": {"type": "string"},
                                              "pid": {"type": "integer"},
                                              "uptime_s": {"type": "number"},
                                              "time": {"type": "string"}},
                                             required=["version", "pid"]),
                           "models": {"type": "array", "items": ref("ModelStatus")},
                           "recent_events": {
                               "type": "array", "description": "the last lifecycle events "
                               "(as /api/v1/events sent them), oldest first",
                               "items": _object({"event": {"type": "string"},
                                                 "model": _NULLABLE_STRING,
                                                 "at": {"type": "number"}},
                                                required=["event", "at"])},
                           "cluster": {"type": "object", "nullable": True}},
                          required=["server", "models"]),
        "LoadResult": _object({
            "status": {"type": "string", "enum": ["success"]},
            "model_name": {"type": "string"}, "state": {"type": "string"},
            "pid": _NULLABLE_INT, "load_seconds": _NULLABLE_NUMBER,
            "pinned": {"type": "boolean"},
        }, required=["status", "model_name", "state", "pid", "pinned"]),
        "UnloadResult": _object({
            "status": {"type": "string", "enum": ["success"]},
            "model_name": {"type": "string"},
            "unloaded": {"type": "array", "items": {"type": "string"}},
            "message": _NULLABLE_STRING,
        }, required=["status", "unloaded"]),
        "PinResult": _object({
            "status": {"type": "string", "enum": ["success"]},
            "model_name": {"type": "string"}, "pinned": {"type": "boolean"},
            "state": {"type": "string"},
        }, required=["status", "model_name", "pinned", "state"]),
        "TimeoutResult": _object({
            "status": {"type": "string", "enum": ["success"]},
            "model_name": _NULLABLE_STRING,
            "idle_timeout_s": {**_NULLABLE_NUMBER, "description": "null: never"},
        }, required=["status", "model_name", "idle_timeout_s"]),
        "RunningModels": _object({"models": {"type": "array", "items": _object({
            "name": {"type": "string"}, "model": {"type": "string"},
            "size": {"type": "integer"}, "size_vram": {"type": "integer"},
            "digest": {"type": "string"}, "details": {"type": "object"},
            "expires_at": _NULLABLE_STRING,
        }, required=["name", "model", "size", "size_vram"])}}, required=["models"],
            description="Ollama's /api/ps"),
        "KokoroUnloaded": _object({"status": {"type": "string"}}, required=["status"]),
        "TorchTSStatus": _object({
            "model": {"type": "string"}, "model_loaded": {"type": "boolean"},
            "device": _NULLABLE_STRING, "unload_timeout": _NULLABLE_NUMBER,
            "time_since_last_activity": _NULLABLE_NUMBER, "is_loading": {"type": "boolean"},
            "available_languages": {"type": "array", "items": {"type": "string"}},
            "gpu_memory_allocated": {"type": "integer"},
            "gpu_memory_reserved": {"type": "integer"},
            "memory_rss_bytes": {"type": "integer"},
        }, required=["model", "model_loaded", "is_loading"]),
        "Message": _object({"message": {"type": "string"}}, required=["message"]),
        "OpenAPIDocument": _object({"openapi": {"type": "string"},
                                    "info": {"type": "object"},
                                    "paths": {"type": "object"}},
                                   required=["openapi", "info", "paths"]),
    }


@lru_cache(maxsize=1)
def components() -> dict[str, Schema]:
    """``#/components/schemas``: every request and response schema, by name."""
    from supervisor.api import ollama_schema  # Ollama's routes keep their schemas there

    return {**_requests(), **_responses(), **ollama_schema.components()}


# --------------------------------------------------------------------------- operations

#: ``#/components/responses``: OpenAI-shaped errors, by name and status.
ERROR_RESPONSES: dict[str, tuple[str, str]] = {
    "400": ("BadRequest", "malformed or invalid request (the message names the field)"),
    "401": ("Unauthorized", "missing or wrong API key"),
    "403": ("Forbidden", "Host or Origin not allowed"),
    "404": ("NotFound", "unknown model or route"),
    "409": ("Conflict", "pinned, protected, or can never fit"),
    "413": ("PayloadTooLarge", "body over the limit"),
    "429": ("TooManyRequests", "the model's max_queue is full (Retry-After)"),
    "502": ("WorkerFailed", "the worker died or broke the protocol"),
    "503": ("Unavailable", "load failed, busy, cooling down or shutting down (Retry-After)"),
    "504": ("Timeout", "load or call took too long"),
}


def response_components() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, (name, description) in ERROR_RESPONSES.items():
        response: dict[str, Any] = {"description": description,
                                    "content": {"application/json": {"schema": ref("Error")}}}
        if status in ("429", "503"):
            response["headers"] = {"Retry-After": {"schema": {"type": "string"},
                                                   "description": "seconds"}}
        if status == "401":
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"},
                                                        "required": True}}
        out[name] = response
    return out


#: Statuses every route can answer: auth and Host/Origin checks.
ANY_ROUTE = ("401", "403")
#: Routes that take a JSON body.
BODY_ROUTE = ("400", "401", "403", "413")
#: Routes that use a model (load it, wait for it, call it).
MODEL_ROUTE = (*BODY_ROUTE, "404", "409", "429", "502", "503", "504")


def errors(statuses: Iterable[str]) -> dict[str, Any]:
    """OpenAI-shaped error responses for these statuses."""
    return {s: {"$ref": f"#/components/responses/{ERROR_RESPONSES[s][0]}"} for s in statuses}


def ollama_errors(statuses: Iterable[str]) -> dict[str, Any]:
    """Ollama-shaped (``{"error": "..."}``) error responses for these statuses."""
    return {s: {"description": ERROR_RESPONSES[s][1],
                "content": {"application/json": {"schema": ref("OllamaError")}}}
            for s in statuses}


def json_response(schema_name: str, description: str = "success",
                  headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": ref(schema_name)}}}
    if headers:
        response["headers"] = dict(headers)
    return response


def sse_events(data: str | None = None) -> dict[str, Any]:
    """A ``text/event-stream`` media type: OpenAPI 3.0 has its schema describe one event
    (``data``, ``event``, ``id``); ``data`` is the JSON of component ``data`` where named."""
    data_schema: Schema = {"type": "string"}
    if data is not None:
        data_schema["description"] = f"JSON: #/components/schemas/{data} (or [DONE] at the end)"
        data_schema["x-lemonade-json"] = ref(data)
    return {"schema": _object({"data": data_schema, "event": {"type": "string"},
                               "id": {"type": "string"}}, required=["data"])}


WORKER_PID_HEADER = {"X-Lemonade-Worker-Pid": {
    "description": "pid of the worker process that answered",
    "schema": {"type": "string", "pattern": "^[0-9]+$"}, "required": True}}


def operation(summary: str, *, ok: dict[str, Any], request: str | None = None,
              request_required: bool = True, media: str = "application/json",
              error_statuses: Iterable[str] = ANY_ROUTE,
              parameters: list[dict[str, Any]] | None = None,
              description: str | None = None) -> dict[str, Any]:
    """One operation of ``OPENAPI_PATHS``: ``request`` names a schema of :func:`components`."""
    out: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **errors(error_statuses)}}
    if description:
        out["description"] = description
    if request is not None:
        out["requestBody"] = {"required": request_required,
                              "content": {media: {"schema": ref(request)}}}
    if parameters:
        out["parameters"] = parameters
    return out


# --------------------------------------------------------------------------- validation


def to_json_schema(schema: Any, definitions: Mapping[str, Schema] | None = None) -> Any:
    """OpenAPI 3.0's dialect as plain JSON Schema (draft 2020-12): ``$ref`` inlined,
    ``nullable`` as a ``null`` branch, boolean ``exclusiveMinimum`` as a number."""
    definitions = components() if definitions is None else definitions
    if isinstance(schema, list):
        return [to_json_schema(s, definitions) for s in schema]
    if not isinstance(schema, dict):
        return schema
    target = schema.get("$ref")
    if isinstance(target, str) and target.startswith("#/components/schemas/"):
        return to_json_schema(definitions[target.rsplit("/", 1)[1]], definitions)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: to_json_schema(v, definitions) for k, v in value.items()}
        elif key in ("items", "not", "additionalProperties", "anyOf", "oneOf", "allOf"):
            out[key] = to_json_schema(value, definitions)
        elif key != "nullable":
            out[key] = value
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if out.get(exclusive) is True:
            out[exclusive] = out.pop(bound)
        elif out.get(exclusive) is False:
            del out[exclusive]
    if schema.get("nullable") and (not isinstance(out.get("enum"), list) or None in out["enum"]):
        message = out.get(ERROR_KEY)
        out = {"anyOf": [out, {"type": "null"}]}
        if message:
            out[ERROR_KEY] = message
    return out


@cache
def validator(name: str) -> jsonschema.protocols.Validator:
    schema = to_json_schema(components()[name])
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema)


_TYPE_WORDS = {"string": "a string", "number": "a number", "integer": "an integer",
               "boolean": "true or false", "object": "an object", "array": "an array",
               "null": "null"}


def _where(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any) -> str:
    return repr(value)[:40]


def _number(value: float) -> str:
    """A bound as a person writes it: 1000000, not 1e+06; 0.25 stays 0.25."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _describe(error: jsonschema.ValidationError, root: str = "the request body",
              ) -> tuple[str, str | None, str]:
    """(message, the field it names, the error code) for one validation error."""
    where = _where(error.absolute_path)
    field = where or None
    name = f"'{where}'" if where else root
    schema = error.schema if isinstance(error.schema, dict) else {}
    kind, value, instance = error.validator, error.validator_value, error.instance
    if kind == "required":
        missing = next((k for k in value if isinstance(instance, dict) and k not in instance),
                       value[0])
        full = f"{where}.{missing}" if where else missing
        return f"'{full}' is required", full, "missing_field"
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(instance) - set(allowed)) if isinstance(instance, dict) else []
        unknown = ", ".join(f"'{k[:40]}'" for k in extra)
        return (f"{unknown} {'is not a field' if len(extra) == 1 else 'are not fields'} of "
                f"this request; known fields: {', '.join(allowed) or 'none'}",
                extra[0] if extra else field, "unknown_field")
    if kind == "not" and isinstance(schema.get(ERROR_KEY), str):
        return schema[ERROR_KEY], field, "invalid_request"
    own = schema.get(ERROR_KEY)
    if kind in ("anyOf", "oneOf") and error.context:
        # An alternative that got inside the value (an array whose item 1 is wrong) says
        # more than "must be one of these shapes": name that item, keep the shape as context.
        deeper = [e for e in error.context if len(e.absolute_path) > len(error.absolute_path)]
        if deeper:
            best = max(deeper, key=lambda e: len(e.absolute_path))
            message, inner_field, code = _describe(best, root)
            if isinstance(own, str):
                message += f" ({name} {own})"
            return message, inner_field, code
    if isinstance(own, str):
        return f"{name} {own}, got {_short(instance)}", field, "invalid_request"
    if kind == "type":
        types = value if isinstance(value, list) else [value]
        words = " or ".join(_TYPE_WORDS.get(str(t), str(t)) for t in types if t != "null")
        return f"{name} must be {words}, not {json_type(instance)}", field, "invalid_request"
    if kind == "enum":
        choices = ", ".join(str(v) for v in value if v is not None)
        return f"{name} must be one of {choices}; got {_short(instance)}", field, \
            "invalid_request"
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if low is not None and high is not None:
            if low == high:
                return f"{name} must be {_number(low)}, got {_short(instance)}", field, \
                    "invalid_request"
            lower = "greater than" if "exclusiveMinimum" in schema else "between"
            joint = "and at most" if "exclusiveMinimum" in schema else "and"
            return (f"{name} must be {lower} {_number(low)} {joint} {_number(high)}, "
                    f"got {_short(instance)}", field, "invalid_request")
        return f"{name}: {error.message}", field, "invalid_request"
    if kind == "maxLength" and isinstance(instance, str):
        return (f"{name} is {len(instance)} characters long; the limit is {value}", field,
                "invalid_request")
    if kind in ("minLength", "pattern") and isinstance(instance, str) and not instance.strip():
        return f"{name} must not be empty", field, "invalid_request"
    if kind == "pattern" and schema.get(MODEL_TYPE_KEY):
        return (f"{name} must be a model name (letters, digits and . _ : - only, at most 128 "
                f"characters)", field, "invalid_request")
    if kind == "minItems":
        return f"{name} must not be empty" if value == 1 else \
            f"{name} needs at least {value} items", field, "invalid_request"
    if kind == "maxItems":
        count = len(instance) if isinstance(instance, list) else "too many"
        return f"{name} has {count} items; the limit is {value}", field, "invalid_request"
    if kind in ("anyOf", "oneOf") and error.context:
        # A nullable field's other branch says what was wrong.
        real = [e for e in error.context if not (e.validator == "type" and e.validator_value
                                                  == "null")]
        if real:
            return _describe(jsonschema.exceptions.best_match(real), root)
    return f"{name}: {error.message[:200]}", field, "invalid_request"


def check(name: str, data: Any) -> None:
    """Raise a 400 ``BadRequest`` naming the field when ``data`` violates schema ``name``."""
    errors_ = sorted(validator(name).iter_errors(data),
                     key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors_:
        return
    # Missing and unknown fields first, then the shallowest problem.
    first = next((e for e in errors_ if e.validator in ("required", "additionalProperties")),
                 errors_[0])
    message, field, code = _describe(first)
    raise BadRequest(message, code=code, param=field)  # param: OpenAI's error.param


def check_form(name: str, fields: Mapping[str, str], lists: Mapping[str, list[str]],
               files: Iterable[str]) -> None:
    """Check a ``multipart/form-data`` request against schema ``name``: each text field is read
    as the schema's type says (a number from its digits, a boolean from true/false/1/0),
    ``lists`` hold the repeated fields (``timestamp_granularities[]``), ``files`` name the
    file parts that were sent."""
    properties = components()[name].get("properties", {})
    instance: dict[str, Any] = {}
    for key, raw in fields.items():
        kind = properties.get(key, {}).get("type")
        value: Any = raw
        if kind == "number":
            try:
                value = float(raw)
            except ValueError:
                pass  # left a string: the schema then says it must be a number
        elif kind == "boolean":
            value = {"true": True, "1": True, "false": False, "0": False, "": False}.get(
                raw.strip().lower(), raw)
        instance[key] = value
    instance.update({key: list(values) for key, values in lists.items()})
    instance.update({key: "<file>" for key in files})
    check(name, instance)


async def read_valid_body(request: web.Request, name: str, *,
                          allow_empty: bool = False) -> Body:
    """The JSON body, parsed strictly and checked against schema ``name``."""
    raw = await request.read()
    if allow_empty and raw and not raw.strip():
        # No body means no body: blank bytes are not JSON, and not what a client meant.
        raise BadRequest("request body is blank; send no body at all or a JSON object")
    data = parse_json_object(raw, allow_empty=allow_empty)
    check(name, data)
    return Body(data)


def check_query(request: web.Request, parameters: Sequence[Mapping[str, Any]]) -> None:
    """Check the query parameters an operation declares (``in: query``); others are ignored."""
    for parameter in parameters:
        if parameter.get("in") != "query":
            continue
        name = parameter["name"]
        values = request.query.getall(name, [])
        if not values:
            continue
        if len(values) > 1:
            raise BadRequest(f"query parameter '{name}' is given {len(values)} times")
        schema = to_json_schema(parameter["schema"])
        problem = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(values[0]))
        if problem is not None:
            message, _, code = _describe(problem, root=f"query parameter '{name}'")
            raise BadRequest(message, code=code)


# --------------------------------------------------------------------------- per server


def _configured(manager: Manager, model_type: str) -> list[str]:
    return sorted(s.name for s in manager.slots.values()
                  if model_type == "*" or s.recipe.type == model_type)


def _tts_voices(manager: Manager) -> list[str] | None:
    """Every voice name (aliases such as ``alloy`` included) the configured speech models
    are known to take, or None when some model's voices are open-ended (the Kokoro kinds take
    blends, "a(2)+b") or known only once it is loaded (a plugin)."""
    from workers import voice_aliases
    from workers.voice_catalog import static_voices

    names: set[str] = set()
    for slot in manager.slots.values():
        recipe = slot.recipe
        if recipe.type != "tts":
            continue
        if recipe.kind != "synthetic":
            return None
        known = static_voices(recipe.kind, recipe.options, Path(manager.settings.data_dir))
        if known is None:
            return None
        names.update(known.names)
        names.update(voice_aliases.table(recipe.kind, recipe.options, known))
    return sorted(names) or None


def _tts_formats(manager: Manager) -> list[str] | None:
    """The audio formats the configured speech models can produce (each model only its
    kind's: a format only another kind produces is still that model's 400)."""
    from workers import speech_formats

    kinds = {s.recipe.kind for s in manager.slots.values() if s.recipe.type == "tts"}
    produced = {f for kind in kinds for f in speech_formats.for_kind(kind).formats}
    return [f for f in speech_formats.OPENAI_FORMATS if f in produced] or None


def specialize(document: dict[str, Any], manager: Manager) -> None:
    """Fit ``document`` (built from these schemas) to one server's configuration, in place:
    model names become an ``enum`` of the configured models of the right type, and so on."""

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        model_type = node.get(MODEL_TYPE_KEY)
        if isinstance(model_type, str):
            names = _configured(manager, model_type)
            if names:
                node.pop("pattern", None)
                node["enum"] = [*names, None] if node.get("nullable") else names
        for value in node.values():
            walk(value)

    walk(document.get("components", {}).get("schemas", {}))
    walk(document.get("paths", {}))
    speech = document.get("components", {}).get("schemas", {}).get("SpeechRequest")
    if isinstance(speech, dict):
        props = speech["properties"]
        voices = _tts_voices(manager)
        if voices:
            props["voice"] = nullable({"type": "string", "enum": voices})
        formats = _tts_formats(manager)
        if formats:
            props["response_format"] = nullable({"type": "string", "enum": formats})
    for operations in document.get("paths", {}).values():
        for op in operations.values():
            for parameter in op.get("parameters", []):
                default_type = parameter.pop(DEFAULT_MODEL_KEY, None)
                if default_type is not None:
                    parameter["required"] = not _has_default(manager, default_type)


def _has_default(manager: Manager, model_type: str) -> bool:
    default = manager.settings.default_model
    if default is not None and default in manager.slots \
            and manager.slots[default].recipe.type == model_type:
        return True
    return len(_configured(manager, model_type)) == 1


def deep_copy_components() -> dict[str, Schema]:
    return copy.deepcopy(components())


__all__ = [
    "ANY_ROUTE", "BODY_ROUTE", "MODEL_ROUTE", "WORKER_PID_HEADER", "check", "check_query",
    "components", "errors", "json_response", "model_name", "nullable", "ollama_errors",
    "operation", "read_valid_body", "ref", "response_components", "specialize",
    "to_json_schema",
]

