"""OpenAI-compatible routes: ``GET /v1/models`` (and one model), ``POST /v1/audio/speech``,
``GET /v1/audio/voices``.

A request names a model; the manager hands back a lease on a ready worker (loading it if
needed, joining a load in progress, or waiting for a stop to finish), and the handler relays
the worker's chunks to the client. Errors before the first byte become proper HTTP errors;
a failure after streaming began ends the connection without the final chunk, so the client
sees a truncated transfer rather than a short file that looks complete (with OpenAI's
``stream_format: "sse"`` an error event says so instead).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from supervisor.api import schemas
from supervisor.api.inference import Inference, infer, relay, require_model_type
from supervisor.api.keys import MANAGER, STARTED_AT
from supervisor.errors import BadRequest, LemonadeError, WorkerFailed
from supervisor.lifecycle import Slot, State
from supervisor.manager import Manager
from workers import speech_formats, voice_aliases
from workers.voice_catalog import Voices, static_voices

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: OpenAI's own limit for /v1/audio/speech (workers.speech_formats: the kinds check the same).
MAX_SPEECH_INPUT_CHARS = speech_formats.MAX_INPUT_CHARS
#: Every format some speech kind can produce, and its Content-Type. Which of them a model
#: can produce depends on its kind; a format outside this table (OpenAI's aac) none can.
AUDIO_CONTENT_TYPES = {fmt: speech_formats.CONTENT_TYPES[fmt]
                       for fmt in speech_formats.ALL_FORMATS}

_VOICES_PARAMETERS = [{
    "name": "model", "in": "query",
    "description": "a speech model (default: the default model, or the only speech model)",
    # Any spelling: a name that is not configured is this route's 404.
    "schema": {"type": "string", "minLength": 1, schemas.MODEL_TYPE_KEY: "tts"},
    schemas.DEFAULT_MODEL_KEY: "tts",
}]

#: This module's routes for GET /openapi.json; bodies are checked against these schemas.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/v1/models": {"get": schemas.operation("List the configured models (OpenAI)",
                                            ok=schemas.json_response("ModelList"))},
    "/v1/models/{model}": {"get": schemas.operation(
        "One configured model (OpenAI)", ok=schemas.json_response("Model"),
        error_statuses=(*schemas.ANY_ROUTE, "404"),
        parameters=[{"name": "model", "in": "path", "required": True,
                     "schema": schemas.model_name("*")}])},
    "/v1/audio/speech": {"post": schemas.operation(
        "Text to speech (OpenAI)", request="SpeechRequest",
        ok={"description": "the audio, whole or streamed (chunked); with stream_format: sse, "
                           "server-sent events (speech.audio.delta with base64 audio, then "
                           "speech.audio.done)",
            "headers": schemas.WORKER_PID_HEADER,
            "content": {**{media: {"schema": {"type": "string", "format": "binary"}}
                           for media in dict.fromkeys(AUDIO_CONTENT_TYPES.values())},
                        "text/event-stream": schemas.sse_events()}},
        error_statuses=schemas.MODEL_ROUTE)},
    "/v1/audio/voices": {"get": schemas.operation(
        "The voices of a speech model (without loading it where the files tell)",
        ok=schemas.json_response("Voices"), parameters=_VOICES_PARAMETERS,
        error_statuses=("400", "401", "403", "404", "409", "429", "502", "503", "504"))},
}


def _model_object(slot: Slot, created: int) -> dict[str, Any]:
    """OpenAI's Model object (id, object, created, owned_by), plus what this server knows."""
    return {
        "id": slot.name,
        "object": "model",
        "created": created,
        "owned_by": "lemonade",
        "type": slot.recipe.type,
        "recipe": slot.recipe.kind,
        "state": slot.state.value,
    }


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    created = int(request.app[STARTED_AT])
    data = [_model_object(slot, created) for slot in manager.slots.values()]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model}")
async def retrieve_model(request: web.Request) -> web.Response:
    """One configured model (``client.models.retrieve``); an unknown name is a 404."""
    slot = request.app[MANAGER].slot(request.match_info["model"])
    return web.json_response(_model_object(slot, int(request.app[STARTED_AT])))


@routes.post("/v1/audio/speech")
async def speech(request: web.Request) -> web.StreamResponse:
    """Text to speech: the whole file, a chunked byte stream (``stream: true``), or OpenAI's
    server-sent events (``stream_format: "sse"``: ``speech.audio.delta`` events carrying
    base64 audio, then one ``speech.audio.done`` with the usage).

    Everything is checked before the model is loaded, the format against what this model's
    kind can produce (:mod:`workers.speech_formats`); an OpenAI voice name is mapped onto
    the model's voices (:mod:`workers.voice_aliases`).
    """
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(request, "SpeechRequest")
    model = body.model_name("model")
    assert model is not None
    text = body.required_string("input", max_len=MAX_SPEECH_INPUT_CHARS)
    voice = body.string("voice", max_len=256)
    fmt = body.string("response_format", max_len=64)  # checked against the model's kind
    speed = body.number("speed", default=1.0, low=speech_formats.MIN_SPEED,
                        high=speech_formats.MAX_SPEED)
    sse = body.choice("stream_format", speech_formats.STREAM_FORMATS, default="audio") == "sse"
    stream_audio = body.boolean("stream", default=False)
    keep_alive = body.keep_alive()
    require_model_type(manager, model, "tts", request.path)
    recipe = manager.slot(model).recipe
    formats = speech_formats.for_kind(recipe.kind)
    fmt = formats.default if fmt is None else fmt
    problem = formats.problem(fmt, recipe.kind)
    if problem is not None:
        raise BadRequest(problem, code="unsupported_response_format", param="response_format")
    # The worker needs to know whether it streams: a whole file carries its length in the
    # header, a stream cannot, and some formats can only be produced whole.
    args: dict[str, Any] = {"input": text, "response_format": fmt, "speed": speed,
                            "stream": stream_audio or sse}
    if voice is not None:  # else the model's default voice
        args["voice"] = _voice_for(manager, recipe.kind, recipe.options, voice)
    content_type = AUDIO_CONTENT_TYPES[fmt]
    started = time.monotonic()
    async with infer(request, model=model, model_type="tts", op="speech", args=args,
                     keep_alive_s=keep_alive) as job:
        if not args["stream"]:
            audio = b"".join([_audio_bytes(c, model) async for c in job.chunks()])
            log.debug("speech from %s: %d bytes in %.3fs", model, len(audio),
                      time.monotonic() - started)
            return web.Response(body=audio, content_type=content_type, headers=job.headers)
        await job.first()  # errors here are still clean HTTP errors
        headers = {"X-Accel-Buffering": "no"}
        if sse:
            headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        else:
            headers["Content-Type"] = content_type
        # A broken SSE stream ends with an error event (and no speech.audio.done); a broken
        # byte stream is dropped without its last chunk, so a truncated file never looks whole.
        return await relay(request, job, _speech_frames(job, sse, len(text)), headers=headers,
                           on_break=_speech_error if sse else None, chunked=not sse)


async def _speech_frames(job: Inference, sse: bool,
                         characters: int) -> AsyncGenerator[bytes, None]:
    async for chunk in job.chunks():
        yield _speech_piece(_audio_bytes(chunk, job.model), sse)
    if sse:
        # No tokenizer for speech here: the input is counted in characters.
        yield _sse_event({"type": "speech.audio.done", "usage": {
            "input_tokens": characters, "output_tokens": 0, "total_tokens": characters}})


def _speech_error(e: LemonadeError) -> bytes:
    return _sse_event({"type": "error", "error": {"message": e.message, "type": e.type,
                                                  "param": e.param, "code": e.code}})


def _voice_for(manager: Manager, kind: str, options: Mapping[str, Any], voice: str) -> str:
    """``voice``, or the model's voice an alias (``alloy``, a recipe's own) stands for."""
    if not voice_aliases.is_alias(kind, options, voice):
        return voice
    known = static_voices(kind, options, Path(manager.settings.data_dir))
    return voice_aliases.resolve(kind, options, voice, known)


def _sse_event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _speech_piece(audio: bytes, sse: bool) -> bytes:
    if not sse:
        return audio
    return _sse_event({"type": "speech.audio.delta",
                       "audio": base64.b64encode(audio).decode("ascii")})


@routes.get("/v1/audio/voices")
async def voices(request: web.Request) -> web.Response:
    """The voices a speech model offers (``?model=NAME``; default: the default model).

    A loaded model is asked (its worker knows what its weights really have). A model that is
    not loaded is answered from the files on disk (:mod:`workers.voice_catalog`) without
    loading it, so a client filling a voice menu never evicts anybody; only a kind the
    catalog does not know (a plugin) is loaded to ask it.
    """
    manager = request.app[MANAGER]
    schemas.check_query(request, _VOICES_PARAMETERS)
    model = request.query.get("model") or _default_tts_model(manager)
    require_model_type(manager, model, "tts", request.path)
    slot = manager.slot(model)
    if slot.state is not State.READY:
        known = static_voices(slot.recipe.kind, slot.recipe.options,
                              Path(manager.settings.data_dir))
        if known is not None:
            return _voices_response(slot, known, loaded=False)
    async with manager.use(model) as lease:
        call = lease.channel.call("voices", {}, timeout_s=manager.settings.call_timeout_s)
        async with call:
            await call.collect()
    result = call.result if isinstance(call.result, dict) else {}
    names = result.get("voices")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WorkerFailed(f"worker for '{model}' sent a malformed voice list")
    default = result.get("default")
    return _voices_response(slot, Voices(names, default if isinstance(default, str) else None),
                            loaded=True)


def _voices_response(slot: Slot, known: Voices, *, loaded: bool) -> web.Response:
    """The voices, and ``aliases``: each name a request may also use (OpenAI's ``alloy``, ...,
    and the recipe's ``voice_aliases``) with the voice it stands for on this model."""
    names = known.names
    return web.json_response({
        "model": slot.name,
        "voices": names,
        "default": known.default,
        "loaded": loaded,
        "aliases": voice_aliases.table(slot.recipe.kind, slot.recipe.options, known),
        "data": [{"id": name, "name": name, "object": "voice"} for name in names],
    })


def _default_tts_model(manager: Manager) -> str:
    default = manager.settings.default_model
    if default is not None and manager.slot(default).recipe.type == "tts":
        return default
    speech = [s.name for s in manager.slots.values() if s.recipe.type == "tts"]
    if len(speech) == 1:
        return speech[0]
    raise BadRequest("query parameter 'model' is required: name one of the speech models ("
                     + (", ".join(speech) or "none configured") + ")")


def _audio_bytes(chunk: object, model: str) -> bytes:
    if not isinstance(chunk, bytes):
        raise WorkerFailed(f"worker for '{model}' sent {type(chunk).__name__} instead of audio")
    return chunk
