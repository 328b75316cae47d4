"""``POST /v1/embeddings``: OpenAI's embeddings endpoint, served by an ``embedding`` model.

The request is checked here before any model is loaded (a bad field is a 400 naming it), then
again by the worker. The worker sends each vector as little-endian float32 bytes; this route
answers them as JSON floats, or, for ``encoding_format="base64"``, as base64 of those very
bytes, which is what OpenAI returns and what the ``openai`` client decodes. :func:`embed`
reads the vectors off a call; Ollama's ``/api/embed`` uses it too.
"""

from __future__ import annotations

import array
import base64
import sys
from typing import Any

from aiohttp import web

from supervisor.api import schemas
from supervisor.api.inference import Inference, infer
from supervisor.errors import BadRequest, WorkerFailed

routes = web.RouteTableDef()

#: OpenAI's own limits: 2048 inputs per request.
MAX_INPUTS = 2048
MAX_DIMENSIONS = 65536

#: This module's routes for GET /openapi.json; bodies are checked against these schemas.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/v1/embeddings": {"post": schemas.operation(
        "Embeddings (OpenAI): float arrays or base64 of little-endian float32",
        request="EmbeddingsRequest",
        ok=schemas.json_response("Embeddings", headers=schemas.WORKER_PID_HEADER),
        error_statuses=schemas.MODEL_ROUTE)},
}


def _inputs(value: Any) -> list[str]:
    if value is None:
        raise BadRequest("'input' is required", code="missing_field")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise BadRequest("'input' must be a string or an array of strings")
    if not value:
        raise BadRequest("'input' must not be an empty array")
    if len(value) > MAX_INPUTS:
        raise BadRequest(f"'input' has {len(value)} items; the limit is {MAX_INPUTS}")
    for i, item in enumerate(value):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise BadRequest("'input' holds token ids; this server embeds text only: send "
                             "a string or an array of strings")
        if not isinstance(item, str):
            raise BadRequest(f"'input[{i}]' must be a string")
        if not item:
            raise BadRequest(f"'input[{i}]' must not be an empty string")
    return value


def _dimensions(value: Any) -> int | None:
    if value is None:
        return None
    value = int(value) if isinstance(value, float) and value.is_integer() else value  # 8.0
    if type(value) is not int or not 1 <= value <= MAX_DIMENSIONS:
        raise BadRequest(f"'dimensions' must be a positive integer, got {str(value)[:40]}")
    return value


def vector_bytes(chunk: object, model: str) -> tuple[int, list[bytes]]:
    if (not isinstance(chunk, dict) or type(chunk.get("index")) is not int
            or not isinstance(chunk.get("vectors"), list)
            or not all(isinstance(v, bytes) for v in chunk["vectors"])):
        raise WorkerFailed(f"worker for '{model}' sent a malformed embeddings chunk")
    return chunk["index"], chunk["vectors"]


async def embed(job: Inference, count: int) -> tuple[list[bytes], int]:
    """The call's vectors (float32 bytes, one per input, in order) and its prompt tokens."""
    vectors: list[bytes] = []
    async for chunk in job.chunks():
        index, pieces = vector_bytes(chunk, job.model)
        if index != len(vectors):
            raise WorkerFailed(f"worker for '{job.model}' sent embeddings out of order")
        vectors.extend(pieces)
    result = job.result
    if len(vectors) != count:
        raise WorkerFailed(f"worker for '{job.model}' returned {len(vectors)} embeddings "
                           f"for {count} inputs")
    tokens = result.get("prompt_tokens")
    return vectors, tokens if type(tokens) is int and tokens >= 0 else 0


def as_floats(raw: bytes) -> list[float]:
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    body = await schemas.read_valid_body(request, "EmbeddingsRequest")
    model = body.model_name("model")
    assert model is not None
    texts = _inputs(body.data.get("input"))
    encoding = body.choice("encoding_format", ("float", "base64"), default="float")
    dimensions = _dimensions(body.data.get("dimensions"))
    body.string("user", max_len=256)  # accepted and ignored, as a field OpenAI defines
    keep_alive = body.keep_alive()
    args: dict[str, Any] = {"input": texts}
    if dimensions is not None:
        args["dimensions"] = dimensions
    async with infer(request, model=model, model_type="embedding", op="embed", args=args,
                     keep_alive_s=keep_alive) as job:
        vectors, tokens = await embed(job, len(texts))
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(raw).decode("ascii") if encoding == "base64"
            else as_floats(raw),
        }
        for i, raw in enumerate(vectors)
    ]
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers=job.headers,
    )
