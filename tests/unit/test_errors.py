import pickle

import pytest

from serve_app import errors

TABLE = [
    (errors.InvalidRequestError("bad", param="n"), 400, "invalid_request_error", "invalid_value"),
    (errors.AuthenticationError("no"), 401, "invalid_request_error", "invalid_api_key"),
    (errors.PermissionDeniedError("expired"), 403, "invalid_request_error", "invalid_signature"),
    (errors.ModelNotFoundError("x"), 404, "invalid_request_error", "model_not_found"),
    (errors.NotFoundError("route"), 404, "invalid_request_error", "not_found"),
    (errors.RateLimitError("busy"), 429, "rate_limit_error", "rate_limit_exceeded"),
    (errors.ServiceUnavailableError("down"), 503, "service_unavailable_error", "service_unavailable"),
    (errors.GenerationError("boom"), 500, "server_error", "server_error"),
]


@pytest.mark.parametrize(("error", "status", "type_", "code"), TABLE)
def test_error_table(error, status, type_, code):
    body = error.body()
    assert error.status_code == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["type"], body["error"]["code"]) == (type_, code)


def test_model_not_found_names_the_model_param():
    body = errors.ModelNotFoundError("flux-pro").body()["error"]
    assert body["param"] == "model" and "flux-pro" in body["message"]


@pytest.mark.parametrize(("error", "status", "type_", "code"), TABLE)
def test_errors_survive_pickling_across_ray(error, status, type_, code):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.body() == error.body() and copy.headers == error.headers


def test_headers_are_kept():
    error = errors.RateLimitError("busy", headers={"Retry-After": "2"})
    assert pickle.loads(pickle.dumps(error)).headers == {"Retry-After": "2"}


@pytest.mark.parametrize(("error", "should_retry", "retry_after"), [
    (errors.InvalidRequestError("bad"), "false", None),
    (errors.AuthenticationError("no"), "false", None),
    (errors.PermissionDeniedError("expired"), "false", None),
    (errors.ModelNotFoundError("x"), "false", None),
    (errors.MethodNotAllowedError("x"), "false", None),
    (errors.PayloadTooLargeError("big"), "false", None),
    (errors.IdempotencyConflictError("reused"), "false", None),
    (errors.RateLimitError("busy", headers={"Retry-After": "3"}), "true", "3"),
    (errors.RateLimitError("busy"), "true", "2"),
    (errors.ServiceUnavailableError("down"), "true", "5"),
    (errors.GenerationError("boom"), "true", None),
])
def test_retry_headers(error, should_retry, retry_after):
    """`x-should-retry: false` where the same request cannot succeed; 429/503 say when."""
    headers = pickle.loads(pickle.dumps(error)).response_headers()
    assert headers["x-should-retry"] == should_retry
    assert headers.get("Retry-After") == retry_after
    assert error.status_code in (400, 401, 403, 404, 405, 409, 413, 429, 500, 503)
