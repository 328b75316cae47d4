"""Ollama's native API on the same models and the same lifecycle as the OpenAI routes.

Routes: ``POST /api/chat``, ``POST /api/generate`` (NDJSON streams by default, one object
with ``"stream": false``), ``POST /api/embed``, the older ``POST /api/embeddings``, ``GET
/api/tags``, ``POST /api/show``, ``GET /api/ps``, ``GET /api/version``, and ``GET /`` (and
``HEAD /``): Ollama answers its root with a plain-text liveness line, which Ollama clients
use to see that a server is there, so it answers likewise, 200 ``text/plain``, in its own
words (``Lemonade Supervisor is running``); only a browser (an ``Accept`` that prefers
``text/html``) is redirected (303) to the dashboard at ``/ui``.

Each route is a thin adapter over :mod:`supervisor.api.inference` (the lease, the call, the
stream) and :mod:`supervisor.api.generation_args` (the checks), so a request reaches the
worker exactly as the matching OpenAI request would. What is Ollama's here:

* names: ``model`` as configured; ``NAME:latest`` is accepted for ``NAME`` (Ollama's default
  tag), and answers echo the name the request used;
* ``options``: ``temperature``, ``top_p``, ``top_k``, ``seed`` (a negative one means a random
  seed, as in Ollama), ``num_predict`` (-> ``max_tokens``; 0 or negative: no limit but the
  recipe's ``default_max_tokens`` and the context), ``stop``, ``repeat_penalty`` (->
  ``repetition_penalty``) map onto the worker's arguments; a bad value is a 400 naming the
  option; any other option is ignored (and logged at debug), as Ollama ignores options a
  model does not use;
* fields that would change the answer and cannot be served are refused, never ignored:
  ``format`` (other than ``""``), ``tools``, ``images``, ``think``, ``template``,
  ``suffix``, ``context``, ``logprobs``; ``system`` on ``generate`` is served (a system
  message before the prompt), and so is ``raw`` (the prompt goes to the model verbatim,
  without the chat template);
* ``keep_alive`` as Ollama means it (``"10m"``, seconds, negative = forever, 0 = unload once
  idle), through the same per-request idle timeout as every route; a ``chat`` with no
  messages or a ``generate`` with no prompt only loads the model (``done_reason: "load"``),
  and with ``keep_alive: 0`` unloads it (``done_reason: "unload"``; the worker process ends);
* timings in nanoseconds: ``load_duration`` is the wait for a ready worker (a load, a queue),
  ``prompt_eval_duration`` and ``eval_duration`` the worker's prefill and decoding time;
* checks: each body is checked first against its schema in :mod:`supervisor.api.
  ollama_schema` (the one ``/openapi.json`` publishes), then by the handler;
* errors: every route under ``/api/`` except Lemonade's ``/api/v1/`` answers Ollama's
  ``{"error": "message"}`` with the same status the OpenAI shape would carry (404 unknown
  model, 400 bad value or a model of the wrong type, 413 body too large, ...):
  :func:`ollama_errors_middleware` rewrites the shared error middleware's answer for those
  paths. A failure after a stream began ends it with one ``{"error": "..."}`` line, which
  is what Ollama's own clients raise on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from aiohttp import web

from supervisor import __version__
from supervisor.api import generation_args, schemas
from supervisor.api.body import Body
from supervisor.api.dashboard import UI_PATH, prefers_html
from supervisor.api.embeddings import as_floats, embed
from supervisor.api.inference import Inference, infer, relay, require_model_type, text_chunk
from supervisor.api.keys import MANAGER, STARTED_AT
from supervisor.api.ollama_schema import MAX_EMBED_INPUTS, OPENAPI_PATHS
from supervisor.errors import BadRequest, LemonadeError
from supervisor.lifecycle import Slot, State
from supervisor.manager import Manager
from supervisor.status import model_rows

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

__all__ = ["OPENAPI_PATHS", "is_ollama_path", "ollama_errors_middleware", "routes"]

LIVENESS_TEXT = "Lemonade Supervisor is running"
NDJSON = "application/x-ndjson"
#: Model types Ollama's API can serve (chat/generate and embed); /api/tags lists these.
SERVED_TYPES = ("llm", "embedding")
#: Ollama option -> the worker's argument it sets (the rest are ignored).
_KNOBS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
          "repetition_penalty": "repeat_penalty"}
_MAPPED_OPTIONS = frozenset({*_KNOBS.values(), "num_predict", "stop"})
_NS = 1_000_000_000


# --------------------------------------------------------------------------- errors


def is_ollama_path(path: str) -> bool:
    """Ollama's routes: ``/`` and anything under ``/api/`` but Lemonade's ``/api/v1``."""
    if path == "/":
        return True
    return path.startswith("/api/") and not (path == "/api/v1" or path.startswith("/api/v1/"))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def ollama_errors_middleware(request: web.Request,
                                   handler: Handler) -> web.StreamResponse:
    """Just outside the shared error middleware: its OpenAI-shaped JSON error becomes
    Ollama's ``{"error": "message"}`` on Ollama's paths (status and headers unchanged)."""
    response = await handler(request)
    if (response.status < 400 or response.prepared or not isinstance(response, web.Response)
            or not is_ollama_path(request.path)):
        return response
    try:
        data = json.loads(response.body) if isinstance(response.body, bytes) else None
    except ValueError:
        return response
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = data["error"].get("message")
        response.text = json.dumps({"error": message if isinstance(message, str)
                                    else response.reason})
    return response


# --------------------------------------------------------------------------- request parts


def _now_rfc3339() -> str:
    wall = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1e9):09d}Z"


def _resolve(manager: Manager, name: str) -> str:
    """The configured model a request's name means (``NAME:latest`` is ``NAME``)."""
    if name not in manager.slots and name.endswith(":latest"):
        base = name.removesuffix(":latest")
        if base in manager.slots:
            return base
    manager.slot(name)  # 404 naming the configured models
    return name


def _refuse(body: Body, *fields: str) -> None:
    """Fields that would change the answer and that this server cannot serve."""
    for field in fields:
        value = body.data.get(field)
        if value in (None, False, "", [], {}):
            continue
        reason = {
            "format": "structured output and JSON mode are not supported by this server",
            "tools": "tools are not supported by this server",
            "images": "images are not supported by this server",
            "think": "thinking is not supported by this server's models",
            "template": "the model's own chat template is always used",
            "suffix": "fill-in-the-middle is not supported by this server",
            "context": "the deprecated 'context' is not supported; send the conversation "
                       "to /api/chat as messages",
            "logprobs": "log probabilities are not supported by this server",
            "top_logprobs": "log probabilities are not supported by this server",
        }[field]
        raise BadRequest(f"'{field}': {reason}")


def _options(body: Body) -> dict[str, Any]:
    """Ollama's ``options`` as the worker's generation arguments."""
    options = body.data.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest("'options' must be an object")
    values = Body({f"options.{key}": value for key, value in options.items()})
    args = generation_args.sampling_knobs(
        values, {knob: f"options.{name}" for knob, name in _KNOBS.items()})
    if args.get("seed", 0) < 0:
        del args["seed"]  # Ollama's -1: a random seed
    num_predict = generation_args.integer(values, "options.num_predict",
                                          low=-generation_args.MAX_TOKENS_LIMIT,
                                          high=generation_args.MAX_TOKENS_LIMIT)
    if num_predict is not None and num_predict > 0:
        args["max_tokens"] = num_predict
    stop = generation_args.stop_strings(options.get("stop"), field="options.stop")
    if stop:
        args["stop"] = stop
    ignored = sorted(set(options) - _MAPPED_OPTIONS)
    if ignored:
        log.debug("ignoring Ollama options this server does not use: %s",
                  ", ".join(name[:40] for name in ignored[:20]))
    return args


def _generation_request(body: Body, *, chat: bool) -> tuple[str, dict[str, Any] | None]:
    """``(op, args)`` for a chat or generate body; args None: nothing to generate (a load)."""
    _refuse(body, "format", "tools", "think", "logprobs", "top_logprobs")
    if chat:
        raw_messages = body.data.get("messages")
        if raw_messages is None or raw_messages == []:
            return "chat", None
        args: dict[str, Any] = {"messages": generation_args.messages(raw_messages)}
        op = "chat"
    else:
        _refuse(body, "images", "template", "suffix", "context")
        raw = body.boolean("raw", default=False)
        system = body.string("system", max_len=generation_args.MAX_CONTENT_CHARS,
                             allow_empty=True)
        text = body.data.get("prompt")
        if text is None or text == "":
            return ("complete" if raw else "chat"), None
        text = generation_args.prompt(text)
        if raw:
            if system:
                raise BadRequest("'system' cannot be used with 'raw': true (the prompt goes "
                                 "to the model as it is)")
            op, args = "complete", {"prompt": text}
        else:
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": text})
            op, args = "chat", {"messages": messages}
    args["stream"] = body.boolean("stream", default=True)
    args.update(_options(body))
    return op, args


# --------------------------------------------------------------------------- chat, generate


def _stats(job: Inference) -> dict[str, Any]:
    """The final object's counts and durations (nanoseconds)."""
    generation = job.generation()
    ended = job.ended_at if job.ended_at is not None else job.admitted_at
    first = job.first_chunk_at if job.first_chunk_at is not None else ended
    prompt_s = generation.prompt_seconds
    eval_s = generation.eval_seconds
    if prompt_s is None or eval_s is None:  # a worker without a clock: ours
        prompt_s, eval_s = first - job.admitted_at, ended - first
    return {
        "done_reason": generation.finish_reason,
        "total_duration": _ns(ended - job.asked_at),
        "load_duration": _ns(job.wait_seconds),
        "prompt_eval_count": generation.prompt_tokens,
        "prompt_eval_duration": _ns(prompt_s),
        "eval_count": generation.completion_tokens,
        "eval_duration": _ns(eval_s),
    }


def _ns(seconds: float) -> int:
    return max(0, round(seconds * _NS))


def _piece(chat: bool, name: str, text: str, *, done: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "created_at": _now_rfc3339()}
    if chat:
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out["done"] = done
    return out


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def _ndjson(job: Inference, chat: bool, name: str) -> AsyncGenerator[bytes, None]:
    async for piece in job.chunks():
        yield _line(_piece(chat, name, text_chunk(piece, job.model), done=False))
    final = _piece(chat, name, "", done=True)
    final.update(_stats(job))
    yield _line(final)


def _ndjson_error(e: LemonadeError) -> bytes:
    return _line({"error": e.message})


async def _load_or_unload(request: web.Request, model: str, name: str, *, chat: bool,
                          keep_alive: float | None) -> web.Response:
    """Ollama's idioms: nothing to generate loads the model; with keep_alive 0, unloads it."""
    manager = request.app[MANAGER]
    require_model_type(manager, model, "llm", request.path)
    out = _piece(chat, name, "", done=True)
    if keep_alive == 0:
        await manager.retire(manager.slot(model), "keep_alive_0")
        out["done_reason"] = "unload"
    else:
        async with manager.use(model, keep_alive_s=keep_alive):
            pass  # loaded (or already resident); the idle timer starts on release
        out["done_reason"] = "load"
    return web.json_response(out)


async def _generate(request: web.Request, *, chat: bool) -> web.StreamResponse:
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(
        request, "OllamaChatRequest" if chat else "OllamaGenerateRequest")
    name = body.model_name("model")
    assert name is not None
    model = _resolve(manager, name)
    op, args = _generation_request(body, chat=chat)
    keep_alive = body.keep_alive()
    if args is None:
        return await _load_or_unload(request, model, name, chat=chat, keep_alive=keep_alive)
    async with infer(request, model=model, model_type="llm", op=op, args=args,
                     keep_alive_s=keep_alive) as job:
        if not args["stream"]:
            await job.collect()
            whole = _piece(chat, name, job.text(), done=True)
            whole.update(_stats(job))
            return web.json_response(whole, headers=job.headers)
        await job.first(token=True)
        return await relay(request, job, _ndjson(job, chat, name),
                           headers={"Content-Type": NDJSON, "Cache-Control": "no-cache",
                                    "X-Accel-Buffering": "no"},
                           on_break=_ndjson_error)


@routes.post("/api/chat")
async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


@routes.post("/api/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


# --------------------------------------------------------------------------- embeddings


def _embed_inputs(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise BadRequest("'input' must be a string or an array of strings")
    if len(value) > MAX_EMBED_INPUTS:
        raise BadRequest(f"'input' has {len(value)} items; the limit is {MAX_EMBED_INPUTS}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRequest(f"'input[{i}]' must be a string")
        if not item:
            raise BadRequest(f"'input[{i}]' must not be an empty string")
    return value


async def _embed(request: web.Request, body: Body, texts: list[str], dimensions: int | None
                 ) -> tuple[str, list[list[float]], dict[str, Any], dict[str, str]]:
    """``(name, vectors, stats, headers)``; no texts only loads the model (Ollama's idiom)."""
    manager = request.app[MANAGER]
    name = body.model_name("model")
    assert name is not None
    model = _resolve(manager, name)
    keep_alive = body.keep_alive()
    options = body.data.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'options' must be an object")
    require_model_type(manager, model, "embedding", request.path)
    if not texts:
        started = time.monotonic()
        async with manager.use(model, keep_alive_s=keep_alive):
            pass
        return name, [], {"load_duration": _ns(time.monotonic() - started)}, {}
    args: dict[str, Any] = {"input": texts}
    if dimensions is not None:
        args["dimensions"] = dimensions
    async with infer(request, model=model, model_type="embedding", op="embed", args=args,
                     keep_alive_s=keep_alive) as job:
        vectors, tokens = await embed(job, len(texts))
        ended = job.ended_at if job.ended_at is not None else job.admitted_at
        stats = {"total_duration": _ns(ended - job.asked_at),
                 "load_duration": _ns(job.wait_seconds), "prompt_eval_count": tokens}
    return name, [as_floats(raw) for raw in vectors], stats, job.headers


@routes.post("/api/embed")
async def embed_route(request: web.Request) -> web.Response:
    body = await schemas.read_valid_body(request, "OllamaEmbedRequest")
    texts = _embed_inputs(body.data.get("input"))
    if body.boolean("truncate", default=True) is False:
        raise BadRequest("'truncate': false is not supported: inputs longer than the model's "
                         "max_seq_length are always truncated")
    dimensions = generation_args.integer(body, "dimensions", low=1, high=65536)
    name, vectors, stats, headers = await _embed(request, body, texts, dimensions)
    return web.json_response({"model": name, "embeddings": vectors, **stats}, headers=headers)


@routes.post("/api/embeddings")
async def embeddings_route(request: web.Request) -> web.Response:
    """The older route: one ``prompt``, one ``embedding`` (an empty prompt only loads)."""
    body = await schemas.read_valid_body(request, "OllamaEmbeddingsRequest")
    text = body.string("prompt", max_len=generation_args.MAX_CONTENT_CHARS, allow_empty=True)
    _, vectors, _, headers = await _embed(request, body, [text] if text else [], None)
    return web.json_response({"embedding": vectors[0] if vectors else []}, headers=headers)


# --------------------------------------------------------------------------- models


def _digest(slot: Slot) -> str:
    """A stable id of the model's configuration (Ollama's is its manifest's sha256)."""
    recipe = slot.recipe
    text = json.dumps({"kind": recipe.kind, "type": recipe.type,
                       "options": dict(recipe.options)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _parameter_size(count: object) -> str:
    if not isinstance(count, int) or count <= 0:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}".replace(".0", "")
    return str(count)


def _details(slot: Slot) -> dict[str, Any]:
    """Ollama's ``details``, from what the worker reported when it last loaded."""
    info = slot.info
    family = info.get("architecture") if isinstance(info.get("architecture"), str) else None
    family = family or slot.recipe.kind
    dtype = info.get("dtype")
    return {
        "parent_model": "",
        "format": "gguf" if info.get("gguf") else "",  # "" until known (loaded once)
        "family": family,
        "families": [family],
        "parameter_size": _parameter_size(info.get("parameters")),
        # The weights' dtype as it runs ("F32", "BF16"); a GGUF is de-quantized on load.
        "quantization_level": dtype.upper().replace("FLOAT", "F")
        if isinstance(dtype, str) else "",
    }


def _modified_at(request: web.Request, slot: Slot) -> str:
    try:
        wall = os.path.getmtime(slot.recipe.source)
    except (OSError, TypeError, ValueError):
        wall = request.app[STARTED_AT]
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


@routes.get("/api/tags")
async def tags(request: web.Request) -> web.Response:
    """The models Ollama's API can serve (chat/generate: llm; embed: embedding)."""
    manager = request.app[MANAGER]
    models = [
        {"name": slot.name, "model": slot.name, "modified_at": _modified_at(request, slot),
         "size": slot.cost_bytes(), "digest": _digest(slot), "details": _details(slot)}
        for slot in manager.slots.values() if slot.recipe.type in SERVED_TYPES
    ]
    return web.json_response({"models": models})


def _capabilities(slot: Slot) -> list[str]:
    return {"llm": ["completion"], "embedding": ["embedding"]}.get(slot.recipe.type, [])


def _model_info(slot: Slot) -> dict[str, Any]:
    info = slot.info
    arch = info.get("architecture") if isinstance(info.get("architecture"), str) else None
    arch = arch or slot.recipe.kind
    out: dict[str, Any] = {"general.architecture": arch}
    if isinstance(info.get("parameters"), int):
        out["general.parameter_count"] = info["parameters"]
    for key, ours in (("context_length", "context"), ("context_length", "max_seq_length"),
                      ("embedding_length", "dimensions")):
        if isinstance(info.get(ours), int):
            out[f"{arch}.{key}"] = info[ours]
    return out


def _parameters_text(slot: Slot) -> str:
    lines = []
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k"), ("repetition_penalty", "repeat_penalty"),
                         ("default_max_tokens", "num_predict")):
        value = slot.recipe.options.get(ours)
        if isinstance(value, int | float) and not isinstance(value, bool):
            lines.append(f"{theirs:<30} {value:g}")
    return "\n".join(lines)


@routes.post("/api/show")
async def show(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(request, "OllamaShowRequest")
    name = body.model_name("model")
    assert name is not None
    body.boolean("verbose", default=False)
    slot = manager.slot(_resolve(manager, name))
    recipe = slot.recipe
    parameters = _parameters_text(slot)
    modelfile = (f"# Lemonade recipe '{recipe.name}': kind {recipe.kind}, type {recipe.type}"
                 f"{', from ' + recipe.source if recipe.source else ''}\n"
                 f"FROM {slot.info.get('path') or recipe.options.get('model') or recipe.kind}\n"
                 + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()))
    return web.json_response({
        "modelfile": modelfile,
        "parameters": parameters,
        "template": "",
        "details": _details(slot),
        "model_info": _model_info(slot),
        "capabilities": _capabilities(slot),
        "modified_at": _modified_at(request, slot),
    })


@routes.get("/api/ps")
async def ps(request: web.Request) -> web.Response:
    """The resident models, so Ollama tooling can read what is loaded and until when."""
    manager = request.app[MANAGER]
    models: list[dict[str, Any]] = []
    for row in model_rows(manager):
        if row["state"] != State.READY.value:
            continue
        slot = manager.slot(row["name"])
        memory = row["memory"]
        models.append({
            "name": row["name"],
            "model": row["name"],
            "size": memory["rss_bytes"] + memory["vram_bytes"],
            "size_vram": memory["vram_bytes"],
            "digest": _digest(slot),
            "details": _details(slot),
            "expires_at": row["expires_at"],  # null: no idle timer runs (busy, pinned, never)
            **({"context_length": slot.info["context"]}
               if isinstance(slot.info.get("context"), int) else {}),
        })
    return web.json_response({"models": models})


@routes.get("/api/version")
async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    """Ollama's liveness line (Ollama clients probe ``/``); a browser is sent to the
    dashboard instead (``/ui``, see :func:`supervisor.api.dashboard.prefers_html`)."""
    if prefers_html(request.headers.get("Accept")):
        raise web.HTTPSeeOther(UI_PATH)
    return web.Response(text=LIVENESS_TEXT)

