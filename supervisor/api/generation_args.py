"""The arguments of a generation (``chat`` / ``complete`` ops), checked before any model loads.

Shared by the OpenAI routes (:mod:`supervisor.api.chat`) and Ollama's (:mod:`supervisor.api.
ollama`): both send the ``llm`` worker the same argument names (``messages`` or ``prompt``,
``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``,
``stop``), but read them from differently named request fields. So every checker here takes
the name the *request* used, and each error names that field (``'options.repeat_penalty'
must be ...``), never our internal one. The worker checks again; only it knows the context.

A sampling knob the request leaves out is not sent at all, so the worker applies the
recipe's default (``[models.X.options] temperature = 0.2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from supervisor.api.body import Body
from supervisor.errors import BadRequest

MAX_TOKENS_LIMIT = 1_048_576
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_CONTENT_CHARS = 1_000_000
MAX_SEED = 2**63 - 1
ROLES = ("system", "developer", "user", "assistant")

#: The worker's float knobs and their ranges (workers/llm.py checks the same ones).
FLOAT_KNOBS = (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("repetition_penalty", 1.0, 2.0))


def messages(value: Any, *, field: str = "messages") -> list[dict[str, Any]]:
    """Chat messages as ``[{"role", "content"}]``; text content (or text parts) only."""
    if value is None:
        raise BadRequest(f"'{field}' is required", code="missing_field")
    if not isinstance(value, list):
        raise BadRequest(f"'{field}' must be an array of message objects")
    if not value:
        raise BadRequest(f"'{field}' must not be empty")
    if len(value) > MAX_MESSAGES:
        raise BadRequest(f"'{field}' has {len(value)} items; the limit is {MAX_MESSAGES}")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
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
        if message.get("images"):
            raise BadRequest(f"'{where}.images': images are not supported by this server")
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


def integer(body: Body, name: str, *, low: int, high: int) -> int | None:
    """``body.data[name]`` as an int within [low, high] (``3.0`` counts as 3), or None."""
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


def stop_strings(value: Any, *, field: str = "stop") -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise BadRequest(f"'{field}' must be a string or an array of strings")
    if len(value) > MAX_STOP_STRINGS:
        raise BadRequest(f"'{field}' has {len(value)} strings; the limit is {MAX_STOP_STRINGS}")
    for s in value:
        if not s or len(s) > MAX_STOP_CHARS:
            raise BadRequest(f"each '{field}' string must be 1..{MAX_STOP_CHARS} characters long")
    return value


def prompt(value: Any, *, field: str = "prompt") -> str:
    if value is None:
        raise BadRequest(f"'{field}' is required", code="missing_field")
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise BadRequest(f"'{field}' must be a string (or an array of exactly one string); "
                             "token arrays and batches are not supported")
        value = value[0]
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string")
    if not value:
        raise BadRequest(f"'{field}' must not be empty")
    if len(value) > MAX_CONTENT_CHARS:
        raise BadRequest(f"'{field}' is longer than {MAX_CONTENT_CHARS} characters")
    return value


def sampling_knobs(body: Body, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The knobs the request sets, checked: ``temperature``, ``top_p``, ``top_k``,
    ``repetition_penalty``, ``seed``. ``names`` maps a knob to the field it is read from
    (default: the knob's own name); a field left out or null is not in the result."""
    names = names or {}
    args: dict[str, Any] = {}
    for knob, low, high in FLOAT_KNOBS:
        field = names.get(knob, knob)
        if body.data.get(field) is not None:
            args[knob] = body.number(field, default=low, low=low, high=high)
    if args.get("top_p") == 0.0:
        raise BadRequest(f"'{names.get('top_p', 'top_p')}' must be greater than 0 and at most "
                         f"1, got 0")
    top_k = integer(body, names.get("top_k", "top_k"), low=0, high=1_000_000)
    if top_k is not None:
        args["top_k"] = top_k
    seed = integer(body, names.get("seed", "seed"), low=-MAX_SEED, high=MAX_SEED)
    if seed is not None:
        args["seed"] = seed
    return args


def _unsupported(body: Body) -> None:
    """OpenAI fields we would otherwise silently ignore although they change the answer."""
    n = integer(body, "n", low=1, high=128)
    if n is not None and n != 1:
        raise BadRequest("'n' must be 1: this server returns one choice per request")
    best_of = integer(body, "best_of", low=1, high=128)
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


def openai_sampling(body: Body) -> dict[str, Any]:
    """The generation arguments of an OpenAI chat or completions request (plus
    ``include_usage``, which the route pops: it is about the stream, not the worker)."""
    _unsupported(body)
    max_tokens = integer(body, "max_tokens", low=1, high=MAX_TOKENS_LIMIT)
    max_completion = integer(body, "max_completion_tokens", low=1, high=MAX_TOKENS_LIMIT)
    if max_completion is not None:
        if max_tokens is not None and max_tokens != max_completion:
            raise BadRequest("'max_tokens' and 'max_completion_tokens' disagree; send one")
        max_tokens = max_completion
    args: dict[str, Any] = {
        "stop": stop_strings(body.data.get("stop")),
        "stream": body.boolean("stream", default=False),
    }
    # top_k and repetition_penalty are not OpenAI's; vLLM and llama.cpp accept them so.
    args.update(sampling_knobs(body))
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
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
