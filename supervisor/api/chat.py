"""``POST /v1/chat/completions`` and ``POST /v1/completions``, served by an ``llm`` model.

Every field is checked here, before any model is loaded, so a bad request is a fast 400 that
names the field; the worker checks again (and is the only one that knows the context size).

Streaming is OpenAI's server-sent events: ``data: {json}\\n\\n`` per chunk
(``chat.completion.chunk`` or ``text_completion`` objects), a last chunk with the
``finish_reason``, with ``stream_options.include_usage`` one more chunk with empty
``choices`` and the ``usage``, and ``data: [DONE]``. Errors before the first event are plain
HTTP errors; a failure after the stream began ends it with one ``data: {"error": {...}}``
event (no ``[DONE]``), because the status line has already been sent. A client that hangs up
cancels the handler, which leaves the call early and so cancels the generation in the worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from supervisor.api.access_log import note_first_token
from supervisor.api import schemas
from supervisor.api.body import Body
from supervisor.api.keys import MANAGER, METRICS
from supervisor.api.openai import require_model_type
from supervisor.errors import BadRequest, LemonadeError, WorkerFailed

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

MAX_TOKENS_LIMIT = 1_048_576
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_CONTENT_CHARS = 1_000_000
MAX_SEED = 2**63 - 1
ROLES = ("system", "developer", "user", "assistant")


# --------------------------------------------------------------------------- validation


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise BadRequest("'messages' is required", code="missing_field")
    if not isinstance(value, list):
        raise BadRequest("'messages' must be an array of message objects")
    if not value:
        raise BadRequest("'messages' must not be empty")
    if len(value) > MAX_MESSAGES:
        raise BadRequest(f"'messages' has {len(value)} items; the limit is {MAX_MESSAGES}")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{where}' must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"'{where}.role' is required: one of {', '.join(ROLES)}")
        if role not in ROLES:
            extra = " (tools are not supported)" if role in ("tool", "function") else ""
            raise BadRequest(f"'{where}.role' must be one of {', '.join(ROLES)}, "
                             f"got '{role[:40]}'{extra}")
        if message.get("tool_calls") or message.get("function_call"):
            raise BadRequest(f"'{where}.tool_calls': tools are not supported by this server")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise BadRequest(f"'{where}.content[{j}]' must be a text part "
                                     f"{{\"type\": \"text\", \"text\": ...}}; "
                                     f"images and audio are not supported")
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"'{where}.content[{j}].text' must be a string")
            text = "\n".join(part["text"] for part in content)
        elif isinstance(content, str):
            text = content
        elif content is None:
            raise BadRequest(f"'{where}.content' is required", code="missing_field")
        else:
            raise BadRequest(f"'{where}.content' must be a string or an array of text parts")
        if len(text) > MAX_CONTENT_CHARS:
            raise BadRequest(f"'{where}.content' is longer than {MAX_CONTENT_CHARS} characters")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequest(f"'{where}.name' must be a string")
        out.append({"role": role, "content": text})
    return out


def _integer(body: Body, name: str, *, low: int, high: int) -> int | None:
    value = body.data.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise BadRequest(f"'{name}' must be an integer, not {str(value)[:40]}")
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {value}")
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise BadRequest("'stop' must be a string or an array of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise BadRequest(f"'stop' has {len(value)} strings; the limit is {MAX_STOP_STRINGS}")
    for s in value:
        if not s or len(s) > MAX_STOP_CHARS:
            raise BadRequest(f"each 'stop' string must be 1..{MAX_STOP_CHARS} characters long")
    return value


def _unsupported(body: Body) -> None:
    """Fields we would otherwise silently ignore although they change the answer."""
    n = _integer(body, "n", low=1, high=128)
    if n is not None and n != 1:
        raise BadRequest("'n' must be 1: this server returns one choice per request")
    best_of = _integer(body, "best_of", low=1, high=128)
    if best_of is not None and best_of != 1:
        raise BadRequest("'best_of' must be 1: this server returns one choice per request")
    logprobs = body.data.get("logprobs")
    if logprobs not in (None, False, 0):
        raise BadRequest("'logprobs' is not supported by this server")
    if body.data.get("tools") or body.data.get("functions"):
        raise BadRequest("'tools' are not supported by this server")
    if body.data.get("echo") not in (None, False):
        raise BadRequest("'echo' is not supported by this server")
    if body.data.get("suffix") not in (None, ""):
        raise BadRequest("'suffix' is not supported by this server")
    fmt = body.data.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise BadRequest("'response_format' must be {\"type\": \"text\"}: structured output "
                         "is not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.number(name, default=0.0, low=-2.0, high=2.0)
        if value != 0.0:
            raise BadRequest(f"'{name}' is not supported by this server (only 0)")


def _sampling(body: Body) -> dict[str, Any]:
    _unsupported(body)
    max_tokens = _integer(body, "max_tokens", low=1, high=MAX_TOKENS_LIMIT)
    max_completion = _integer(body, "max_completion_tokens", low=1, high=MAX_TOKENS_LIMIT)
    if max_completion is not None:
        if max_tokens is not None and max_tokens != max_completion:
            raise BadRequest("'max_tokens' and 'max_completion_tokens' disagree; send one")
        max_tokens = max_completion
    args: dict[str, Any] = {
        "stop": _stop(body.data.get("stop")),
        "stream": body.boolean("stream", default=False),
    }
    # Sampling knobs go to the worker only when the request sets them: one it leaves out
    # takes the recipe's default there ([models.X.options] temperature = 0.2, ...).
    # top_k and repetition_penalty are not OpenAI's; vLLM and llama.cpp accept them so.
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0),
                            ("repetition_penalty", 1.0, 2.0)):
        if body.data.get(name) is not None:
            args[name] = body.number(name, default=low, low=low, high=high)
    if args.get("top_p") == 0.0:
        raise BadRequest("'top_p' must be greater than 0 and at most 1, got 0")
    top_k = _integer(body, "top_k", low=0, high=1_000_000)
    if top_k is not None:
        args["top_k"] = top_k
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
    seed = _integer(body, "seed", low=-MAX_SEED, high=MAX_SEED)
    if seed is not None:
        args["seed"] = seed
    options = body.data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object")
        if not args["stream"]:
            raise BadRequest("'stream_options' is only allowed when 'stream' is true")
        include_usage = Body(options).boolean("include_usage", default=False)
    args["include_usage"] = include_usage
    body.string("user", max_len=256)  # accepted and ignored
    return args


def _prompt(value: Any) -> str:
    if value is None:
        raise BadRequest("'prompt' is required", code="missing_field")
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise BadRequest("'prompt' must be a string (or an array of exactly one string); "
                             "token arrays and batches are not supported")
        value = value[0]
    if not isinstance(value, str):
        raise BadRequest("'prompt' must be a string")
    if not value:
        raise BadRequest("'prompt' must not be empty")
    if len(value) > MAX_CONTENT_CHARS:
        raise BadRequest(f"'prompt' is longer than {MAX_CONTENT_CHARS} characters")
    return value


# --------------------------------------------------------------------------- responses


def _usage(result: Any, model: str) -> tuple[str, dict[str, int]]:
    if not isinstance(result, dict):
        raise WorkerFailed(f"worker for '{model}' ended a generation without a result")
    finish = result.get("finish_reason")
    prompt, completion = result.get("prompt_tokens"), result.get("completion_tokens")
    if (finish not in ("stop", "length") or type(prompt) is not int
            or type(completion) is not int):
        raise WorkerFailed(f"worker for '{model}' sent a malformed generation result")
    return finish, {"prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": prompt + completion}


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


class _Shape:
    """Builds the JSON objects of one chat or text completion."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            out = self._base("chat.completion")
            out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
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
        if usage:
            out["usage"] = None
        return out


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(
        request, "ChatCompletionRequest" if chat else "CompletionRequest")
    model = body.model_name("model")
    assert model is not None
    if chat:
        args: dict[str, Any] = {"messages": _messages(body.data.get("messages"))}
    else:
        args = {"prompt": _prompt(body.data.get("prompt"))}
    args.update(_sampling(body))
    include_usage = args.pop("include_usage")
    keep_alive = body.keep_alive()
    require_model_type(manager, model, "llm", request.path)
    shape = _Shape(chat, model)
    op = "chat" if chat else "complete"
    async with manager.use(model, keep_alive_s=keep_alive) as lease:
        call = lease.channel.call(op, args, timeout_s=manager.settings.call_timeout_s)
        async with call:
            if not args["stream"]:
                async for _ in call:  # a whole call sends no chunks; drain defensively
                    pass
                finish, usage = _usage(call.result, model)
                _count_tokens(request, model, usage)
                text = call.result.get("text")
                if not isinstance(text, str):
                    raise WorkerFailed(f"worker for '{model}' sent no text")
                return web.json_response(shape.whole(text, finish, usage),
                                         headers={"X-Lemonade-Worker-Pid": str(lease.pid)})
            # The first piece is awaited before the 200 goes out: a prompt that is too long
            # for the context, or a load that fails, is still a proper HTTP error.
            first = await anext(call, None)
            if first is not None:
                note_first_token(request)
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Lemonade-Worker-Pid": str(lease.pid),
            })
            await response.prepare(request)
            try:
                if chat:
                    await response.write(_sse(shape.chunk("", None, first=True,
                                                          usage=include_usage)))
                if first is not None:
                    await response.write(_sse(shape.chunk(_text(first, model), None,
                                                          usage=include_usage)))
                async for piece in call:
                    await response.write(_sse(shape.chunk(_text(piece, model), None,
                                                          usage=include_usage)))
                finish, usage = _usage(call.result, model)
                _count_tokens(request, model, usage)
                await response.write(_sse(shape.chunk(None if chat else "", finish,
                                                      usage=include_usage)))
                if include_usage:
                    final = shape._base(
                        "chat.completion.chunk" if chat else "text_completion")
                    final["choices"] = []
                    final["usage"] = usage
                    await response.write(_sse(final))
                await response.write(b"data: [DONE]\n\n")
            except LemonadeError as e:
                log.warning("%s stream from %s broke after it started: %s", op, model, e.message)
                with contextlib.suppress(ConnectionResetError):
                    await response.write(_sse({"error": {"message": e.message, "type": e.type,
                                                         "code": e.code}}))
            except ConnectionResetError:
                log.info("%s stream to a client that left (%s)", op, model)
                return response  # leaving `async with call` cancels the generation
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
            return response


def _count_tokens(request: web.Request, model: str, usage: dict[str, int]) -> None:
    request.app[METRICS].count_tokens(model, usage["prompt_tokens"], usage["completion_tokens"])


def _text(chunk: object, model: str) -> str:
    if not isinstance(chunk, str):
        raise WorkerFailed(f"worker for '{model}' sent {type(chunk).__name__} instead of text")
    return chunk


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
                        "text/event-stream": {"schema": {"type": "string"}}}}


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
