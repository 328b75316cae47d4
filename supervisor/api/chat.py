"""``POST /v1/chat/completions`` and ``POST /v1/completions``, served by an ``llm`` model.

Every field is checked here (:mod:`supervisor.api.generation_args`), before any model is
loaded, so a bad request is a fast 400 that names the field; the worker checks again (and is
the only one that knows the context size). The lease, the call and the stream's rules are
:mod:`supervisor.api.inference`'s, shared with Ollama's routes.

Streaming is OpenAI's server-sent events: ``data: {json}\\n\\n`` per chunk
(``chat.completion.chunk`` or ``text_completion`` objects), a last chunk with the
``finish_reason``, with ``stream_options.include_usage`` one more chunk with empty
``choices`` and the ``usage``, and ``data: [DONE]``. Errors before the first event are plain
HTTP errors; a failure after the stream began ends it with one ``data: {"error": {...}}``
event (no ``[DONE]``), because the status line has already been sent. A client that hangs up
cancels the handler, which leaves the call early and so cancels the generation in the worker.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from supervisor.api import generation_args, schemas
from supervisor.api.inference import Inference, infer, relay, text_chunk
from supervisor.errors import LemonadeError

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


# --------------------------------------------------------------------------- responses


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


class _Shape:
    """Builds the JSON objects of one chat or text completion, as OpenAI's schemas have them.

    ``system_fingerprint`` is left out (the schemas type it as a string, never null); a chat
    message carries ``refusal: null`` (required, nullable); ``usage`` appears on a chat chunk
    only when ``stream_options.include_usage`` asked for it (null until the extra last
    chunk, as the chat chunk schema allows), and never on a text-completion chunk, whose
    schema has no null ``usage``: there it is only in the extra last chunk.
    """

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            out = self._base("chat.completion")
            out["choices"] = [{"index": 0,
                               "message": {"role": "assistant", "content": text,
                                           "refusal": None},
                               "logprobs": None, "finish_reason": finish}]
        else:
            out = self._base("text_completion")
            out["choices"] = [{"index": 0, "text": text, "logprobs": None,
                               "finish_reason": finish}]
        out["usage"] = usage
        return out

    def chunk(self, text: str | None, finish: str | None, *, first: bool = False,
              usage: bool = False) -> dict[str, Any]:
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                               "finish_reason": finish}]
        else:
            out["choices"] = [{"index": 0, "text": text or "", "logprobs": None,
                               "finish_reason": finish}]
        if usage and self.chat:
            out["usage"] = None
        return out


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    body = await schemas.read_valid_body(
        request, "ChatCompletionRequest" if chat else "CompletionRequest")
    model = body.model_name("model")
    assert model is not None
    if chat:
        args: dict[str, Any] = {"messages": generation_args.messages(body.data.get("messages"))}
    else:
        args = {"prompt": generation_args.prompt(body.data.get("prompt"))}
    args.update(generation_args.openai_sampling(body))
    include_usage = args.pop("include_usage")
    keep_alive = body.keep_alive()
    shape = _Shape(chat, model)
    op = "chat" if chat else "complete"
    async with infer(request, model=model, model_type="llm", op=op, args=args,
                     keep_alive_s=keep_alive) as job:
        if not args["stream"]:
            await job.collect()  # a whole call sends no chunks; drained defensively
            generation = job.generation()
            return web.json_response(
                shape.whole(job.text(), generation.finish_reason, generation.usage()),
                headers=job.headers)
        await job.first(token=True)
        return await relay(request, job, _sse_frames(job, shape, include_usage),
                           headers=SSE_HEADERS, on_break=_sse_error)


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


async def _sse_frames(job: Inference, shape: _Shape,
                      include_usage: bool) -> AsyncGenerator[bytes, None]:
    chat = shape.chat
    if chat:
        yield _sse(shape.chunk("", None, first=True, usage=include_usage))
    async for piece in job.chunks():
        yield _sse(shape.chunk(text_chunk(piece, job.model), None, usage=include_usage))
    generation = job.generation()
    yield _sse(shape.chunk(None if chat else "", generation.finish_reason, usage=include_usage))
    if include_usage:
        final = shape._base("chat.completion.chunk" if chat else "text_completion")
        final["choices"] = []
        final["usage"] = generation.usage()
        yield _sse(final)
    yield b"data: [DONE]\n\n"


def _sse_error(e: LemonadeError) -> bytes:
    return _sse({"error": {"message": e.message, "type": e.type, "param": e.param,
                           "code": e.code}})


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


def _generation_ok(whole: str, chunk: str) -> dict[str, Any]:
    return {"description": f"a {whole} object, or with stream: true server-sent events, each "
                           f"`data: <{chunk}>` and a last `data: [DONE]`",
            "headers": schemas.WORKER_PID_HEADER,
            "content": {"application/json": {"schema": schemas.ref(whole)},
                        "text/event-stream": schemas.sse_events(chunk)}}


#: This module's routes for GET /openapi.json; bodies are checked against these schemas.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"post": schemas.operation(
        "Chat completion (OpenAI), streamed with stream: true",
        request="ChatCompletionRequest",
        ok=_generation_ok("ChatCompletion", "ChatCompletionChunk"),
        error_statuses=schemas.MODEL_ROUTE)},
    "/v1/completions": {"post": schemas.operation(
        "Text completion (OpenAI legacy), streamed with stream: true",
        request="CompletionRequest", ok=_generation_ok("Completion", "CompletionChunk"),
        error_statuses=schemas.MODEL_ROUTE)},
}
