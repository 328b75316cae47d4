"""OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/audio/speech``.

A request names a model; the manager hands back a lease on a ready worker (loading it if
needed, joining a load in progress, or waiting for a stop to finish), and the handler relays
the worker's chunks to the client. Errors before the first byte become proper HTTP errors;
a failure after streaming began ends the connection without the final chunk, so the client
sees a truncated transfer rather than a short file that looks complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from supervisor.api import schemas
from supervisor.api.keys import MANAGER, STARTED_AT
from supervisor.errors import BadRequest, LemonadeError, WorkerFailed
from supervisor.lifecycle import State
from supervisor.manager import Manager
from workers.voice_catalog import static_voices

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: OpenAI's own limit for /v1/audio/speech.
MAX_SPEECH_INPUT_CHARS = 4096
AUDIO_CONTENT_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}

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
        ok={"description": "the audio, whole or streamed (chunked)",
            "headers": schemas.WORKER_PID_HEADER,
            "content": {media: {"schema": {"type": "string", "format": "binary"}}
                        for media in dict.fromkeys(AUDIO_CONTENT_TYPES.values())}},
        error_statuses=schemas.MODEL_ROUTE)},
    "/v1/audio/voices": {"get": schemas.operation(
        "The voices of a speech model (without loading it where the files tell)",
        ok=schemas.json_response("Voices"), parameters=_VOICES_PARAMETERS,
        error_statuses=("400", "401", "403", "404", "409", "429", "502", "503", "504"))},
}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    created = int(request.app[STARTED_AT])
    data = [
        {
            "id": slot.name,
            "object": "model",
            "created": created,
            "owned_by": "lemonade",
            "type": slot.recipe.type,
            "recipe": slot.recipe.kind,
            "state": slot.state.value,
        }
        for slot in manager.slots.values()
    ]
    return web.json_response({"object": "list", "data": data})


@routes.post("/v1/audio/speech")
async def speech(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER]
    body = await schemas.read_valid_body(request, "SpeechRequest")
    model = body.model_name("model")
    assert model is not None
    text = body.required_string("input", max_len=MAX_SPEECH_INPUT_CHARS)
    args = {
        "input": text,
        "voice": body.string("voice", max_len=256),
        "response_format": body.choice(
            "response_format", tuple(AUDIO_CONTENT_TYPES), default="wav"
        ),
        "speed": body.number("speed", default=1.0, low=0.25, high=4.0),
    }
    if args["voice"] is None:
        del args["voice"]  # the model's default voice
    stream_audio = body.boolean("stream", default=False)
    # The worker needs to know: a whole file carries its length in the header, a stream
    # cannot, and some formats can only be produced whole.
    args["stream"] = stream_audio
    keep_alive = body.keep_alive()
    require_model_type(manager, model, "tts", request.path)
    content_type = AUDIO_CONTENT_TYPES[str(args["response_format"])]
    started = time.monotonic()
    async with manager.use(model, keep_alive_s=keep_alive) as lease:
        call = lease.channel.call("speech", args, timeout_s=manager.settings.call_timeout_s)
        async with call:
            if not stream_audio:
                audio = b"".join([_audio_bytes(c, model) async for c in call])
                log.debug("speech from %s: %d bytes in %.3fs", model, len(audio),
                          time.monotonic() - started)
                return web.Response(body=audio, content_type=content_type,
                                    headers={"X-Lemonade-Worker-Pid": str(lease.pid)})
            first = await anext(call, None)  # errors here are still clean HTTP errors
            response = web.StreamResponse(headers={
                "Content-Type": content_type,
                "X-Accel-Buffering": "no",
                "X-Lemonade-Worker-Pid": str(lease.pid),
            })
            response.enable_chunked_encoding()
            await response.prepare(request)
            try:
                if first is not None:
                    await response.write(_audio_bytes(first, model))
                async for chunk in call:
                    await response.write(_audio_bytes(chunk, model))
            except LemonadeError as e:
                log.warning("speech stream from %s broke after it started: %s", model, e.message)
                # Drop the connection without the terminating chunk: the client must not take
                # a truncated file for a complete one.
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            return response


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
            return _voices_response(model, known.names, known.default, loaded=False)
    async with manager.use(model) as lease:
        call = lease.channel.call("voices", {}, timeout_s=manager.settings.call_timeout_s)
        async with call:
            await call.collect()
    result = call.result if isinstance(call.result, dict) else {}
    names = result.get("voices")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WorkerFailed(f"worker for '{model}' sent a malformed voice list")
    default = result.get("default")
    return _voices_response(model, names, default if isinstance(default, str) else None,
                            loaded=True)


def _voices_response(model: str, names: list[str], default: str | None, *,
                     loaded: bool) -> web.Response:
    return web.json_response({
        "model": model,
        "voices": names,
        "default": default,
        "loaded": loaded,
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


def require_model_type(manager: Manager, model: str, model_type: str, route: str) -> None:
    """404 for an unknown model, 400 when the model exists but serves another type."""
    slot = manager.slot(model)
    if slot.recipe.type != model_type:
        raise BadRequest(
            f"model '{model}' is {_a(slot.recipe.type)} model; "
            f"{route} needs {_a(model_type)} model",
            code="model_not_supported",
        )


def _a(model_type: str) -> str:
    """"an llm", "an asr", "a tts", "an embedding": the article goes by the sound."""
    vowel_sound = model_type[:1] in "aeiou" or model_type == "llm"  # "el-el-em"
    return ("an " if vowel_sound else "a ") + model_type


def _audio_bytes(chunk: object, model: str) -> bytes:
    if not isinstance(chunk, bytes):
        raise WorkerFailed(f"worker for '{model}' sent {type(chunk).__name__} instead of audio")
    return chunk
