"""Every error a client can see, as one exception tree that knows its HTTP status.

Code anywhere in the supervisor raises one of these; a single middleware (``api/middleware``)
turns it into OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``, where
``param`` names the request field at fault (None when no one field is). Anything that is
not a :class:`LemonadeError` reaching that middleware is a bug and is logged as one.

    LemonadeError
    ├── BadRequest              400 invalid_request_error
    ├── Unauthorized            401 authentication_error
    ├── Forbidden               403 (Host or Origin not allowed)
    ├── ModelNotFound           404 model_not_found
    ├── Conflict                409 (pinned / protected by priority / can never fit)
    ├── PayloadTooLarge         413
    ├── RequestTimeout          408 (the body arrived too slowly)
    ├── TooManyRequests         429 + Retry-After (the model's max_queue is full)
    ├── WorkerFailed            502 (worker died, broke the protocol, or failed inside)
    ├── ServiceUnavailable      503 + Retry-After (load failed, busy, cooling down)
    └── GatewayTimeout          504 (load or call took too long)
"""

from __future__ import annotations

import math
import re


class LemonadeError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    #: Set when the error came from a worker's ``error`` message (workers.protocol.ErrorCode).
    worker_code: str | None = None

    def __init__(
        self, message: str, *, code: str | None = None, retry_after_s: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s
        #: The request field the error is about (OpenAI's ``error.param``), when one is.
        self.param = param

    def retry_after_header(self) -> str | None:
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


class BadRequest(LemonadeError):
    """400. ``param`` defaults to the field a message opens with (``'speed' must be ...``):
    every field check words its message that way, so each one names its field for OpenAI's
    ``error.param`` without repeating the name."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"

    def __init__(
        self, message: str, *, code: str | None = None, retry_after_s: float | None = None,
        param: str | None = None,
    ) -> None:
        if param is None:
            opening = _FIELD_OPENING.match(message)
            param = opening.group(1) if opening else None
        super().__init__(message, code=code, retry_after_s=retry_after_s, param=param)


#: ``'messages[0].content' must be ...``: a field name (with indexes and dots) in quotes.
_FIELD_OPENING = re.compile(r"'([A-Za-z_][A-Za-z0-9_]*(?:\[\d*\]|\.[A-Za-z_][A-Za-z0-9_]*)*)'")


class Unauthorized(LemonadeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(LemonadeError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class ModelNotFound(LemonadeError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Conflict(LemonadeError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(LemonadeError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class TooManyRequests(LemonadeError):
    status = 429
    type = "rate_limit_error"
    code = "model_queue_full"


class WorkerFailed(LemonadeError):
    status = 502
    type = "server_error"
    code = "worker_failed"


class RequestTimeout(LemonadeError):
    """408: the client sent its request body too slowly (``body_timeout``)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ServiceUnavailable(LemonadeError):
    status = 503
    type = "server_error"
    code = "unavailable"


class GatewayTimeout(LemonadeError):
    status = 504
    type = "server_error"
    code = "timeout"
