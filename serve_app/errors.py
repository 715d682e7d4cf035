"""One exception hierarchy, and the one table that maps it to HTTP.

Errors are raised where the problem is found, typed by what went wrong; `error_response`
is the only place that knows about status codes and the OpenAI envelope.
"""

from __future__ import annotations

from typing import Any


class ArtServeError(Exception):
    """Base class. `message` is shown to the client, so it never holds a path or a secret."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None
    # `x-should-retry` (honoured by the OpenAI SDKs): whether the same request can succeed
    # later. A 4xx is the request's fault (but 408/409/429 by default); a 5xx may pass.
    retryable = True
    default_retry_after_s: int | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def __reduce__(self):  # survive Ray's pickling with every field, whatever __init__ takes
        return (_rebuild, (type(self), dict(self.__dict__)))

    def response_headers(self) -> dict[str, str]:
        """What the HTTP response carries: the error's own headers, `Retry-After` where the
        class has a default and none was set, and `x-should-retry`."""
        headers = dict(self.headers)
        if self.default_retry_after_s is not None and not any(k.lower() == "retry-after" for k in headers):
            headers["Retry-After"] = str(self.default_retry_after_s)
        headers["x-should-retry"] = "true" if self.retryable else "false"
        return headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(cls: type[ArtServeError], state: dict[str, Any]) -> ArtServeError:
    error = cls.__new__(cls)
    Exception.__init__(error, state["message"])
    error.__dict__.update(state)
    return error


class InvalidRequestError(ArtServeError):
    status_code = 400
    retryable = False
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class AuthenticationError(ArtServeError):
    status_code = 401
    retryable = False
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(ArtServeError):
    """A signed image link that is tampered with, foreign or expired."""

    status_code = 403
    retryable = False
    error_type = "invalid_request_error"
    default_code = "invalid_signature"


class NotFoundError(ArtServeError):
    status_code = 404
    retryable = False
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
        )


class MethodNotAllowedError(ArtServeError):
    status_code = 405
    retryable = False
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLargeError(ArtServeError):
    """The body is larger than the route's limit; it was read no further than the limit."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"
    retryable = False


class IdempotencyConflictError(ArtServeError):
    """An `Idempotency-Key` reused with a different body: retrying the same cannot help."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "idempotency_key_reused"
    retryable = False


class RateLimitError(ArtServeError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    default_retry_after_s = 2


class ServiceUnavailableError(ArtServeError):
    status_code = 503
    error_type = "service_unavailable_error"
    default_code = "service_unavailable"
    default_retry_after_s = 5


class GenerationError(ArtServeError):
    """A bug or a failed generation: the client's request was fine."""

    status_code = 500
    error_type = "server_error"
    default_code = "server_error"
