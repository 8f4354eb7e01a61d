"""The project's error tree.

Every error a client can see is an :class:`UnbrokenError`. Each subclass carries its OpenAI
``type``, its HTTP status and, optionally, a ``code`` and ``param``. They are turned into
OpenAI's error JSON in exactly one place (:func:`unbroken.http.error_response`) and into an
SSE error event in one other (:func:`unbroken.http.sse_error_event`).

``blames_replica`` tells the gateway whether an error returned by a replica counts against
that replica's health: a client's mistake never does.
"""

from __future__ import annotations

from typing import Any


class UnbrokenError(Exception):
    """Root of every error that can reach a client."""

    status: int = 500
    error_type: str = "server_error"
    code: str | None = None
    blames_replica: bool = True

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class ClientError(UnbrokenError):
    """The client's mistake: 4xx, never counted against a replica."""

    status = 400
    error_type = "invalid_request_error"
    blames_replica = False


class InvalidRequestError(ClientError):
    status = 400
    code = "invalid_request"


class ValidationError(ClientError):
    """Well-formed JSON whose values are of the wrong type or out of range."""

    status = 422
    code = "invalid_value"


class ContextLengthError(ClientError):
    status = 400
    code = "context_length_exceeded"


class ContentPolicyError(ClientError):
    """The model refused the request on a content policy: passed on, never retried on that model."""

    status = 400
    code = "content_policy_violation"


class PayloadTooLargeError(ClientError):
    status = 413
    code = "payload_too_large"


class RequestTimeoutError(ClientError):
    """The client did not send its whole request body in time."""

    status = 408
    code = "request_timeout"


class ModelNotFoundError(ClientError):
    status = 404
    code = "model_not_found"


class NotFoundError(ClientError):
    status = 404
    code = "not_found"


class StreamNotFoundError(NotFoundError):
    """A reconnect (``Last-Event-ID``) for a stream this caller has no state for: unknown or expired."""

    code = "stream_not_found"


class ConflictError(ClientError):
    """A repeated request (same ``X-Request-ID``) that is not the same request: another body or route,
    or a resume point the gateway cannot continue from exactly."""

    status = 409
    code = "request_conflict"


class AuthenticationError(ClientError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ClientError):
    status = 403
    error_type = "permission_error"
    code = "permission_denied"


class RateLimitError(ClientError):
    """The client exceeded its own limits (requests or tokens per minute)."""

    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class OverloadedError(UnbrokenError):
    """Capacity is short: shed with ``Retry-After``. Not the replica's fault."""

    status = 503
    error_type = "overloaded_error"
    code = "overloaded"
    blames_replica = False


class ShedError(OverloadedError):
    """Load shed by priority (429 so clients back off)."""

    status = 429
    code = "shed"


class DrainingError(OverloadedError):
    """The replica is draining (SIGTERM or admin drain) and takes no new work."""

    code = "draining"


class UpstreamError(UnbrokenError):
    """A replica failed: connection refused, 5xx, stall or timeout."""

    status = 502
    error_type = "server_error"
    code = "upstream_error"


class NoReplicaError(UnbrokenError):
    status = 503
    error_type = "server_error"
    code = "no_replica_available"
    blames_replica = False


class DeadlineExceededError(UnbrokenError):
    status = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"
    blames_replica = False


class InternalError(UnbrokenError):
    status = 500
    code = "internal_error"


_ERROR_CLASSES: tuple[type[UnbrokenError], ...] = (
    InvalidRequestError,
    ValidationError,
    ContextLengthError,
    ContentPolicyError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ModelNotFoundError,
    NotFoundError,
    StreamNotFoundError,
    ConflictError,
    AuthenticationError,
    PermissionDeniedError,
    RateLimitError,
    OverloadedError,
    ShedError,
    DrainingError,
    UpstreamError,
    NoReplicaError,
    DeadlineExceededError,
    InternalError,
)
# The one status table: (HTTP status, code) -> class, and code -> status for errors that arrive
# without a status (inside an SSE stream).
_BY_TYPE_AND_CODE: dict[tuple[int, str | None], type[UnbrokenError]] = {
    (cls.status, cls.code): cls for cls in _ERROR_CLASSES
}
_STATUS_BY_CODE: dict[str, int] = {cls.code: cls.status for cls in _ERROR_CLASSES if cls.code is not None}


def error_from_response(status: int, body: dict[str, Any] | None) -> UnbrokenError:
    """Rebuild an error from a peer's OpenAI error JSON (gateway reading a replica's answer)."""
    err = (body or {}).get("error") or {}
    message = str(err.get("message") or f"upstream answered {status}")
    code = err.get("code")
    cls = _BY_TYPE_AND_CODE.get((status, code))
    if cls is None:
        if 400 <= status < 500:
            cls = ClientError
        elif status == 503:
            cls = OverloadedError if code in ("overloaded", "draining") else UpstreamError
        else:
            cls = UpstreamError
    e = cls(message, param=err.get("param"), code=code)
    e.status = status
    return e


def error_from_event(body: dict[str, Any]) -> UnbrokenError:
    """Rebuild an error a peer sent inside an SSE stream, where there is no HTTP status: the
    status comes from the error's ``code`` (500 for an unknown one, 400 for an unknown
    ``invalid_request_error``)."""
    err = body.get("error") or {}
    code = err.get("code")
    status = _STATUS_BY_CODE.get(code, 500) if isinstance(code, str) else 500
    if status == 500 and err.get("type") == "invalid_request_error":
        status = 400
    return error_from_response(status, body)
