"""The one request per model type that ``bench/swap.py`` times, over HTTP and in-process.

Each request is timed to its **first result**: the first audio byte of a streamed speech
request, the first streamed token of a chat request (``max_tokens = 1``), the whole answer of
an embedding or transcription request (neither streams a partial result). The HTTP side and
the in-process side send the same arguments, so the two arms do the same work.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from harness import stream_speech

SPEECH_TEXT = "Hello there."
CHAT_PROMPT = "Name three fruits."
EMBED_TEXT = "how to bake bread"
AUDIO = Path(__file__).resolve().parents[1] / "tests" / "data" / "quick_brown_fox.flac"


def call_args(model_type: str) -> tuple[str, dict[str, Any]]:
    """(op, args) of the worker call the HTTP request below turns into."""
    if model_type == "tts":
        return "speech", {"input": SPEECH_TEXT, "response_format": "pcm", "speed": 1.0,
                          "stream": True}
    if model_type == "llm":
        return "chat", {"messages": [{"role": "user", "content": CHAT_PROMPT}],
                        "max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "stop": [],
                        "stream": True}
    if model_type == "embedding":
        return "embed", {"input": [EMBED_TEXT], "encoding_format": "float"}
    if model_type == "asr":
        return "transcribe", {"audio": AUDIO.read_bytes(), "filename": AUDIO.name,
                              "word_timestamps": False}
    raise ValueError(f"no benchmark request for type {model_type!r}")


def http_first_result(port: int, model: str, model_type: str) -> float:
    """Seconds from sending the request to its first result; exits unless it is a 200."""
    if model_type == "tts":
        return float(stream_speech(port, {"model": model, "input": SPEECH_TEXT,
                                          "response_format": "pcm", "stream": True}
                                   )["first_byte_s"])
    if model_type == "llm":
        path, body = "/v1/chat/completions", {
            "model": model, "stream": True, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "user", "content": CHAT_PROMPT}]}
    elif model_type == "embedding":
        path, body = "/v1/embeddings", {"model": model, "input": [EMBED_TEXT]}
    elif model_type == "asr":
        return _transcribe(port, model)
    else:
        raise ValueError(f"no benchmark request for type {model_type!r}")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        started = time.perf_counter()
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise SystemExit(f"{model}: {response.status} {response.read()[:300]!r}")
        if model_type == "llm":
            while line := response.readline():  # the first SSE event with content
                if line.startswith(b"data: ") and b'"content"' in line:
                    break
        first = time.perf_counter() - started
        response.read()
        return first
    finally:
        conn.close()


def _transcribe(port: int, model: str) -> float:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{AUDIO.name}"'
        f'\r\nContent-Type: audio/flac\r\n\r\n',
    ]
    body = parts[0].encode() + parts[1].encode() + AUDIO.read_bytes() + (
        f"\r\n--{boundary}--\r\n").encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        started = time.perf_counter()
        conn.request("POST", "/v1/audio/transcriptions", body=body,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"{model}: {response.status} {data[:300]!r}")
        return time.perf_counter() - started
    finally:
        conn.close()


def inprocess_first_result(model: Any, model_type: str) -> float:
    """The same request as a direct call on a loaded :class:`workers.base.Model`."""
    from workers.base import CallContext

    op, args = call_args(model_type)
    first: list[float] = []

    def emit(_data: Any) -> None:
        if not first:
            first.append(time.perf_counter())

    started = time.perf_counter()
    model.call(op, args, CallContext(emit, threading.Event()))
    ended = time.perf_counter()
    streams = model_type in ("tts", "llm")
    return (first[0] if streams and first else ended) - started
