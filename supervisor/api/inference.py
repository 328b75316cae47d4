"""The one path of every inference route: lease a model of a type, call an op, relay the answer.

OpenAI's routes (chat, completions, embeddings, speech, transcriptions) and Ollama's
(``/api/chat``, ``/api/generate``, ``/api/embed``) differ only in how they read a request
and how they write the answer. What happens in between is the same and lives here:

* :func:`infer` checks the model's type (404 unknown, 400 another type) before anything
  loads, holds a lease (``manager.use``, with the request's ``keep_alive``) and one worker
  call for the block, and times the wait for the model (Ollama's ``load_duration``);
* :class:`Inference` is that call: :meth:`~Inference.collect` for a whole answer,
  :meth:`~Inference.first` then :meth:`~Inference.chunks` for a stream, :attr:`~Inference.
  result`, :meth:`~Inference.generation` (an llm's finish reason and token counts, counted
  once into the metrics), and the ``X-Lemonade-Worker-Pid`` header;
* :func:`relay` writes a stream: the first chunk is awaited *before* the status line, so a
  prompt too long for the context or a load that fails is still a proper HTTP error in the
  route's own shape; after that a failure ends the stream with the route's error frame (or,
  for bytes such as audio, by dropping the connection before the last chunk, so a truncated
  file never looks complete), and a client that hangs up ends the call, which cancels the
  work in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from supervisor.api.access_log import note_first_token
from supervisor.api.keys import MANAGER, METRICS
from supervisor.channel import CallStream
from supervisor.errors import BadRequest, LemonadeError, WorkerFailed
from supervisor.manager import Lease, Manager

log = logging.getLogger(__name__)

_NOTHING = object()


@dataclass(frozen=True)
class Generation:
    """What an llm call reports at its end (``workers/llm.py``)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: The worker's own clock, when it reports one: prefill and decoding seconds.
    prompt_seconds: float | None = None
    eval_seconds: float | None = None

    def usage(self) -> dict[str, int]:
        """OpenAI's ``usage`` object."""
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Inference:
    """One worker call made for one request, under that request's lease."""

    def __init__(self, request: web.Request, lease: Lease, op: str, call: CallStream, *,
                 asked_at: float, admitted_at: float) -> None:
        self.request = request
        self.lease = lease
        self.op = op
        self.call = call
        self.model = lease.name
        #: Loop times: the request asked for the model, got it, got its first chunk, ended.
        self.asked_at = asked_at
        self.admitted_at = admitted_at
        self.first_chunk_at: float | None = None
        self.ended_at: float | None = None
        self._first: object = _NOTHING
        self._generation: Generation | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Lemonade-Worker-Pid": str(self.lease.pid)}

    @property
    def wait_seconds(self) -> float:
        """How long the request waited for a ready worker (a load, a queue, a stop)."""
        return self.admitted_at - self.asked_at

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def collect(self) -> list[object]:
        """Every chunk of the call (a whole answer sends none or a few), then its end."""
        chunks = [chunk async for chunk in self.chunks()]
        return chunks

    async def first(self, *, token: bool = False) -> None:
        """Wait for the first chunk before a stream's status line goes out.

        ``token``: the chunk is generated text (a chat or completion stream), which the
        access log and metrics time as the first token.
        """
        chunk = await anext(self.call, None)
        self.first_chunk_at = self._now()
        if chunk is None:
            self.ended_at = self.first_chunk_at
            return
        self._first = chunk
        if token:
            note_first_token(self.request)

    async def chunks(self) -> AsyncIterator[object]:
        """The call's chunks in order (the one :meth:`first` took, if any, comes first)."""
        if self._first is not _NOTHING:
            chunk, self._first = self._first, _NOTHING
            yield chunk
        async for chunk in self.call:
            if self.first_chunk_at is None:
                self.first_chunk_at = self._now()
            yield chunk
        self.ended_at = self._now()

    @property
    def result(self) -> dict[str, Any]:
        """The call's end result (after the chunks); a worker that sent none is broken."""
        result = self.call.result
        if not isinstance(result, dict):
            raise WorkerFailed(f"worker for '{self.model}' ended the call without a result")
        return result

    def generation(self) -> Generation:
        """An llm call's finish reason and token counts; counted in the metrics once."""
        if self._generation is not None:
            return self._generation
        result = self.result
        finish = result.get("finish_reason")
        prompt, completion = result.get("prompt_tokens"), result.get("completion_tokens")
        if (finish not in ("stop", "length") or type(prompt) is not int
                or type(completion) is not int):
            raise WorkerFailed(f"worker for '{self.model}' sent a malformed generation result")
        self._generation = Generation(finish, prompt, completion,
                                      _seconds(result.get("prompt_seconds")),
                                      _seconds(result.get("eval_seconds")))
        self.request.app[METRICS].count_tokens(self.model, prompt, completion)
        return self._generation

    def text(self) -> str:
        """The generated text of a whole (not streamed) llm call."""
        text = self.result.get("text")
        if not isinstance(text, str):
            raise WorkerFailed(f"worker for '{self.model}' sent no text")
        return text


def _seconds(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def require_model_type(manager: Manager, model: str, model_type: str, route: str) -> None:
    """404 for an unknown model, 400 when the model exists but serves another type."""
    slot = manager.slot(model)
    if slot.recipe.type != model_type:
        raise BadRequest(
            f"model '{model}' is {_a(slot.recipe.type)} model; "
            f"{route} needs {_a(model_type)} model",
            code="model_not_supported", param="model",
        )


def _a(model_type: str) -> str:
    """"an llm", "an asr", "a tts", "an embedding": the article goes by the sound."""
    vowel_sound = model_type[:1] in "aeiou" or model_type == "llm"  # "el-el-em"
    return ("an " if vowel_sound else "a ") + model_type


@contextlib.asynccontextmanager
async def infer(request: web.Request, *, model: str, model_type: str, op: str,
                args: Mapping[str, Any], keep_alive_s: float | None) -> AsyncIterator[Inference]:
    """Hold a lease of ``model`` (which must be of ``model_type``) and one ``op`` call."""
    manager = request.app[MANAGER]
    require_model_type(manager, model, model_type, request.path)
    loop = asyncio.get_running_loop()
    asked_at = loop.time()
    async with manager.use(model, keep_alive_s=keep_alive_s) as lease:
        admitted_at = loop.time()
        async with lease.channel.call(op, dict(args),
                                      timeout_s=manager.settings.call_timeout_s) as call:
            yield Inference(request, lease, op, call, asked_at=asked_at, admitted_at=admitted_at)


def text_chunk(chunk: object, model: str) -> str:
    """A chunk of generated text, as an llm worker streams it."""
    if not isinstance(chunk, str):
        raise WorkerFailed(f"worker for '{model}' sent {type(chunk).__name__} instead of text")
    return chunk


async def relay(request: web.Request, job: Inference, frames: AsyncGenerator[bytes, None], *,
                headers: Mapping[str, str], on_break: Callable[[LemonadeError], bytes] | None,
                chunked: bool = False) -> web.StreamResponse:
    """Send the status line, then every frame; end as the module docstring says.

    ``on_break`` turns an error after the stream began into the route's last frame; None
    drops the connection instead (for byte streams, where no frame can say "error").
    Call :meth:`Inference.first` before this, inside the :func:`infer` block.
    """
    response = web.StreamResponse(headers={**headers, **job.headers})
    if chunked:
        response.enable_chunked_encoding()
    await response.prepare(request)
    async with contextlib.aclosing(frames):
        try:
            async for frame in frames:
                await response.write(frame)
        except LemonadeError as e:
            log.warning("%s stream from %s broke after it started: %s", job.op, job.model,
                        e.message)
            if on_break is None:
                if request.transport is not None:
                    request.transport.close()
                return response
            with contextlib.suppress(ConnectionResetError):
                await response.write(on_break(e))
        except ConnectionResetError:
            log.info("%s stream to a client that left (%s)", job.op, job.model)
            return response  # leaving the call's block cancels the work in the worker
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response
