"""What OpenAI's published API schema requires of each response we serve, as small JSON schemas.

Written by hand from the required fields and types of OpenAI's schema (openai/openai-openapi):
only what a client may rely on, so a test fails when a required field is missing, a string
is null, or a null appears where the schema has none. Required-but-nullable fields
(``message.refusal``, ``error.param``, ``choices[].logprobs``) must be *present*; the
schemas below say so with ``required``, and :func:`check` validates with jsonschema.

The SSE helpers read a stream byte by byte: every event is exactly ``data: <json>\\n\\n``.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
NULLABLE_STRING: Schema = {"type": ["string", "null"]}
NULLABLE_OBJECT: Schema = {"type": ["object", "null"]}


def obj(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return {"type": "object", "properties": properties, "required": required or []}


def const(value: str) -> Schema:
    return {"type": "string", "enum": [value]}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


USAGE = obj({"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER},
            ["prompt_tokens", "completion_tokens", "total_tokens"])
_CHAT_FINISH = ["stop", "length", "tool_calls", "content_filter", "function_call"]
_TEXT_FINISH = ["stop", "length", "content_filter"]
_TOP = ["id", "object", "created", "model", "choices"]


def _completion(kind: str, choice: Schema, usage: Schema) -> Schema:
    # system_fingerprint is optional and typed string: absent is fine, null is not.
    return obj({"id": STRING, "object": const(kind), "created": INTEGER, "model": STRING,
                "system_fingerprint": STRING, "choices": array(choice), "usage": usage}, _TOP)


CHAT_COMPLETION = _completion("chat.completion", obj({
    "index": INTEGER, "finish_reason": {"enum": _CHAT_FINISH}, "logprobs": NULLABLE_OBJECT,
    "message": obj({"role": const("assistant"), "content": NULLABLE_STRING,
                    "refusal": NULLABLE_STRING}, ["role", "content", "refusal"]),
}, ["finish_reason", "index", "message", "logprobs"]), USAGE)

#: A chat chunk's usage is nullable: present (null) on every chunk when include_usage asks.
CHAT_CHUNK = _completion("chat.completion.chunk", obj({
    "index": INTEGER, "finish_reason": {"enum": [*_CHAT_FINISH, None]},
    "logprobs": NULLABLE_OBJECT,
    "delta": obj({"role": {"enum": ["developer", "system", "user", "assistant", "tool"]},
                  "content": NULLABLE_STRING, "refusal": NULLABLE_STRING}),
}, ["delta", "finish_reason", "index"]), {"anyOf": [USAGE, {"type": "null"}]})

TEXT_COMPLETION = _completion("text_completion", obj({
    "index": INTEGER, "text": STRING, "finish_reason": {"enum": _TEXT_FINISH},
    "logprobs": NULLABLE_OBJECT,
}, ["finish_reason", "index", "logprobs", "text"]), USAGE)

#: Streamed completions share the object's shape; finish_reason is null until the last
#: chunk (as OpenAI streams it), and usage is never null (only the extra last chunk has it).
TEXT_COMPLETION_CHUNK = _completion("text_completion", obj({
    "index": INTEGER, "text": STRING, "finish_reason": {"enum": [*_TEXT_FINISH, None]},
    "logprobs": NULLABLE_OBJECT,
}, ["finish_reason", "index", "logprobs", "text"]), USAGE)


def embeddings(encoding: str) -> Schema:
    vector = array(NUMBER) if encoding == "float" else STRING
    return obj({
        "object": const("list"), "model": STRING,
        "data": array(obj({"index": INTEGER, "object": const("embedding"), "embedding": vector},
                          ["index", "object", "embedding"])),
        "usage": obj({"prompt_tokens": INTEGER, "total_tokens": INTEGER},
                     ["prompt_tokens", "total_tokens"]),
    }, ["object", "model", "data", "usage"])


TRANSCRIPTION = obj({"text": STRING}, ["text"])
_SEGMENT = obj({"id": INTEGER, "seek": INTEGER, "start": NUMBER, "end": NUMBER, "text": STRING,
                "tokens": array(INTEGER), "temperature": NUMBER, "avg_logprob": NUMBER,
                "compression_ratio": NUMBER, "no_speech_prob": NUMBER},
               ["id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                "compression_ratio", "no_speech_prob"])
_WORD = obj({"word": STRING, "start": NUMBER, "end": NUMBER}, ["word", "start", "end"])
TRANSCRIPTION_VERBOSE = obj({"language": STRING, "duration": NUMBER, "text": STRING,
                             "segments": array(_SEGMENT), "words": array(_WORD)},
                            ["language", "duration", "text"])

MODEL = obj({"id": STRING, "object": const("model"), "created": INTEGER, "owned_by": STRING},
            ["id", "object", "created", "owned_by"])
MODEL_LIST = obj({"object": const("list"), "data": array(MODEL)}, ["object", "data"])

ERROR = obj({"error": obj({"message": STRING, "type": STRING, "param": NULLABLE_STRING,
                           "code": NULLABLE_STRING}, ["type", "message", "param", "code"])},
            ["error"])

SPEECH_DELTA = obj({"type": const("speech.audio.delta"), "audio": STRING}, ["type", "audio"])
SPEECH_DONE = obj({"type": const("speech.audio.done"), "usage": obj(
    {"input_tokens": INTEGER, "output_tokens": INTEGER, "total_tokens": INTEGER},
    ["input_tokens", "output_tokens", "total_tokens"])}, ["type", "usage"])


def check(schema: Schema, instance: Any) -> Any:
    """Fail with every violation when ``instance`` does not match ``schema``."""
    problems = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in jsonschema.Draft202012Validator(schema).iter_errors(instance)]
    assert not problems, f"{problems}\nin {json.dumps(instance)[:1500]}"
    return instance


def sse_data(raw: bytes) -> list[bytes]:
    """The payloads of a server-sent event stream, checked byte by byte: each event is
    one ``data: `` line ending in a blank line, nothing else (no CR, no comments)."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    assert b"\r" not in raw
    events = raw[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: "), event[:200]
        assert b"\n" not in event, event[:200]
    return [event[len(b"data: "):] for event in events]


def sse_json(raw: bytes, *, done: bool) -> list[Any]:
    """The JSON events of a stream; ``done``: it must end with ``data: [DONE]``."""
    payloads = sse_data(raw)
    if done:
        assert payloads[-1] == b"[DONE]", payloads[-1][:200]
        payloads = payloads[:-1]
    assert b"[DONE]" not in payloads
    return [json.loads(p) for p in payloads]
