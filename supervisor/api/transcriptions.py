"""``POST /v1/audio/transcriptions``: OpenAI's speech-to-text route over an ``asr`` worker.

The upload is ``multipart/form-data`` and may be far larger than the 1 MiB the application
allows for JSON bodies, so the form is streamed part by part (``request.multipart()``) and
the file's bytes are counted as they arrive: past :data:`MAX_UPLOAD_BYTES` the request ends
with 413 before the rest is read. Text fields get a small limit of their own. The raw file
goes to the worker, which decodes it (a bad file is the worker's 400, naming the file) and
streams one map per segment; this module turns the segments into OpenAI's response formats.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from supervisor.api import schemas
from supervisor.api.inference import infer
from supervisor.api.keys import SETTINGS
from supervisor.config_values import MODEL_NAME_RE
from supervisor.errors import BadRequest, PayloadTooLarge, RequestTimeout, WorkerFailed
from supervisor.units import parse_keep_alive

T = TypeVar("T")

routes = web.RouteTableDef()

#: OpenAI's own limit for audio uploads (25 MB). workers.protocol's frame limit for calls
#: must stay above this plus the other fields.
MAX_UPLOAD_BYTES = 25 * 1000 * 1000
#: Any single text field (prompt, language, ...).
MAX_FIELD_BYTES = 16 * 1024
#: A form with more parts than this is not a transcription request.
MAX_PARTS = 32
MAX_PROMPT_CHARS = 4096
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
_TEXT_FIELDS = frozenset({"model", "language", "prompt", "response_format", "temperature",
                          "keep_alive", "ttl", "stream"})
_GRANULARITIES = "timestamp_granularities[]"
#: OpenAI's fields this server accepts and has no use for; any other field is a 400.
IGNORED_FIELDS = frozenset({"include[]", "chunking_strategy", "known_speaker_names[]",
                            "known_speaker_references[]"})
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}$")
_READ_CHUNK = 64 * 1024

#: This module's routes for GET /openapi.json. The form is checked by :func:`validate`, field
#: by field as the schema (``TranscriptionRequest`` in supervisor/api/schemas.py) says.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/v1/audio/transcriptions": {"post": schemas.operation(
        "Speech to text (OpenAI)", request="TranscriptionRequest", media="multipart/form-data",
        ok={"description": "json / verbose_json: an object; text / srt: text/plain; vtt: "
                           "text/vtt",
            "content": {"application/json": {"schema": schemas.ref("Transcription")},
                        "text/plain": {"schema": {"type": "string"}},
                        "text/vtt": {"schema": {"type": "string"}}}},
        error_statuses=schemas.MODEL_ROUTE)},
}


@dataclass
class TranscriptionForm:
    """The fields of one upload, as read off the wire (not yet validated)."""

    file: bytes | None = None
    filename: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    granularities: list[str] = field(default_factory=list)
    #: Fields nobody defined (the schema refuses them).
    unknown: list[str] = field(default_factory=list)


async def read_form(request: web.Request) -> TranscriptionForm:
    """Stream the multipart body with per-part limits; every problem is a 400 or 413.

    A body that stops arriving for ``body_timeout`` is a 408: stall-based, so that a 25 MB
    upload on a slow link is not cut off, while a client that dribbles nothing is.
    """
    stall_s = request.app[SETTINGS].body_timeout_s
    if request.content_type != "multipart/form-data":
        raise BadRequest(
            "this route takes multipart/form-data with a 'file' part and a 'model' field, "
            f"not {request.content_type or 'an untyped body'}"
        )
    form = TranscriptionForm()
    try:
        reader = await request.multipart()
        parts = 0
        while (part := await _within(stall_s, reader.next())) is not None:
            parts += 1
            if parts > MAX_PARTS:
                raise BadRequest(f"the form has more than {MAX_PARTS} parts")
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart parts are not supported")
            await _read_part(part, form, stall_s)
    except (ValueError, AssertionError, KeyError, HttpProcessingError) as e:
        # aiohttp's multipart reader reports a missing boundary, broken framing or a bad
        # part header this way.
        raise BadRequest(f"malformed multipart/form-data body: {e}"[:300]) from None
    return form


async def _within(stall_s: float, read: Awaitable[T]) -> T:
    try:
        async with asyncio.timeout(stall_s):
            return await read
    except TimeoutError:
        raise RequestTimeout(f"the upload sent nothing for body_timeout ({stall_s:g}s)") from None


async def _read_part(part: BodyPartReader, form: TranscriptionForm, stall_s: float) -> None:
    name = part.name
    if name is None:
        raise BadRequest("a form part has no name (Content-Disposition: form-data; name=...)")
    if name == "file":
        if form.file is not None:
            raise BadRequest("'file' is given twice")
        form.filename = part.filename or ""
        form.file = await _read_limited(part, MAX_UPLOAD_BYTES, stall_s, too_large=PayloadTooLarge(
            f"'file' is larger than the upload limit of {MAX_UPLOAD_BYTES} bytes "
            f"({MAX_UPLOAD_BYTES // 1_000_000} MB)"))
        return
    raw = await _read_limited(part, MAX_FIELD_BYTES, stall_s, too_large=BadRequest(
        f"form field '{name[:64]}' is longer than {MAX_FIELD_BYTES} bytes"))
    if name not in _TEXT_FIELDS and name != _GRANULARITIES:
        if name not in IGNORED_FIELDS:
            form.unknown.append(name)
        return
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"'{name}' is not valid UTF-8") from None
    if name == _GRANULARITIES:
        form.granularities.append(value)
    elif name in form.fields:
        raise BadRequest(f"'{name}' is given twice")
    else:
        form.fields[name] = value


async def _read_limited(part: BodyPartReader, limit: int, stall_s: float, *,
                        too_large: Exception) -> bytes:
    """Read one part, stopping as soon as it passes ``limit`` bytes."""
    buffer = bytearray()
    while chunk := await _within(stall_s, part.read_chunk(_READ_CHUNK)):
        buffer += chunk
        if len(buffer) > limit:
            raise too_large
    return bytes(buffer)


@dataclass(frozen=True)
class TranscriptionRequest:
    model: str
    response_format: str
    args: dict[str, Any]
    keep_alive_s: float | None
    words: bool


def validate(form: TranscriptionForm) -> TranscriptionRequest:
    """The form as worker arguments; a 400 naming the field for anything wrong."""
    fields = form.fields
    # The schema of the published document first (supervisor/api/schemas.py), on the fields
    # as this function reads them (trimmed; an empty response_format is the default).
    trimmed = {k: (v.strip() if k in ("model", "language", "response_format") else v)
               for k, v in fields.items()}
    if not trimmed.get("response_format"):
        trimmed.pop("response_format", None)
    trimmed.update({name: "" for name in form.unknown})
    schemas.check_form("TranscriptionRequest", trimmed,
                       {_GRANULARITIES: form.granularities} if form.granularities else {},
                       ["file"] if form.file is not None else [])
    model = fields.get("model", "").strip()
    if not model:
        raise BadRequest("'model' is required", code="missing_field")
    if not MODEL_NAME_RE.match(model):
        raise BadRequest("'model' must be a model name (letters, digits and . _ : - only, "
                         "at most 128 characters)")
    if form.file is None:
        raise BadRequest("'file' is required: upload the audio as a form part named 'file'",
                         code="missing_field")
    if not form.file:
        raise BadRequest("'file' is empty; upload an audio file")
    response_format = fields.get("response_format", "json").strip() or "json"
    if response_format not in RESPONSE_FORMATS:
        raise BadRequest(f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}; "
                         f"got '{response_format[:64]}'")
    if fields.get("stream", "false").strip().lower() not in ("false", "0", ""):
        raise BadRequest("'stream' is not supported for transcriptions; leave it out or false")
    args: dict[str, Any] = {"audio": form.file, "filename": form.filename[:256]}
    language = fields.get("language", "").strip()
    if language:
        if not _LANGUAGE_RE.match(language):
            raise BadRequest(f"'language' must be an ISO-639-1 code such as 'en', "
                             f"got '{language[:16]}'")
        args["language"] = language
    prompt = fields.get("prompt")
    if prompt is not None:
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"'prompt' is {len(prompt)} characters long; "
                             f"the limit is {MAX_PROMPT_CHARS}")
        args["prompt"] = prompt
    if "temperature" in fields:
        args["temperature"] = _number(fields["temperature"], "temperature", 0.0, 1.0)
    bad = [g for g in form.granularities if g not in ("segment", "word")]
    if bad:
        raise BadRequest(f"'timestamp_granularities[]' must be 'segment' or 'word', "
                         f"got '{bad[0][:32]}'")
    words = "word" in form.granularities
    if words and response_format != "verbose_json":
        raise BadRequest("'timestamp_granularities[]' needs response_format 'verbose_json'")
    args["word_timestamps"] = words
    return TranscriptionRequest(model, response_format, args, _keep_alive(fields), words)


def _number(text: str, name: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"'{name}' must be a number, got '{text[:32]}'") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low:g} and {high:g}, got {text[:32]}")
    return value


def _keep_alive(fields: dict[str, str]) -> float | None:
    for name in ("keep_alive", "ttl"):
        if name in fields:
            try:
                return parse_keep_alive(fields[name].strip(), where=name)
            except ValueError as e:
                raise BadRequest(str(e)) from None
    return None


@routes.post("/v1/audio/transcriptions")
async def transcriptions(request: web.Request) -> web.Response:
    req = validate(await read_form(request))
    async with infer(request, model=req.model, model_type="asr", op="transcribe",
                     args=req.args, keep_alive_s=req.keep_alive_s) as job:
        segments = [_segment(chunk, req.model) async for chunk in job.chunks()]
        result = job.result
    return render(req.response_format, segments, result, words=req.words)


def _segment(chunk: object, model: str) -> dict[str, Any]:
    segment = chunk.get("segment") if isinstance(chunk, dict) else None
    if (not isinstance(segment, dict) or not isinstance(segment.get("text"), str)
            or not all(isinstance(segment.get(k), int | float) for k in ("start", "end"))):
        raise WorkerFailed(f"worker for '{model}' sent a malformed transcription segment")
    return segment


# ----------------------------------------------------------------------------- formats


def render(fmt: str, segments: list[dict[str, Any]], result: dict[str, Any], *,
           words: bool = False) -> web.Response:
    text = "".join(s["text"] for s in segments).strip()
    if fmt == "json":
        return web.json_response({"text": text})
    if fmt == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if fmt == "srt":
        return web.Response(text=to_srt(segments), content_type="text/plain")
    if fmt == "vtt":
        return web.Response(text=to_vtt(segments), content_type="text/vtt")
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": result.get("language"),
        "duration": result.get("duration"),
        "text": text,
        "segments": [{k: v for k, v in s.items() if k != "words"} for s in segments],
    }
    if words:
        body["words"] = [w for s in segments for w in s.get("words", [])]
    return web.json_response(body)


def timestamp(seconds: float, separator: str) -> str:
    """``01:02:03,456`` (SRT, separator ",") or ``01:02:03.456`` (WebVTT, ".")."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: list[dict[str, Any]]) -> str:
    blocks = [
        f"{i}\n{timestamp(s['start'], ',')} --> {timestamp(s['end'], ',')}\n{s['text'].strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(segments: list[dict[str, Any]]) -> str:
    blocks = [
        f"{timestamp(s['start'], '.')} --> {timestamp(s['end'], '.')}\n{s['text'].strip()}\n"
        for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)
