"""The OpenAPI schema's shared parts: the answers every operation can give, and the bounds of
the parameters every list shares (drf-spectacular's ``POSTPROCESSING_HOOKS``).

The views document what is theirs (``wms.api.error_responses``: 400 of a body, 404 of an
object, 409 of a state). Some answers come from the layers every request passes through and
may meet any operation; they are added here, once, rather than on each view:

- 400 ``validation_failed``: a query parameter, a path or a body the request layer refuses
  (NUL bytes, bad page values, too deep JSON, ...);
- 401 / 403: no or bad credentials, not allowed (a pilot on a user endpoint, a user on the
  pilot protocol);
- 404: no such object, or a path whose parameter is not of its type (an unknown URL);
- 413 (operations with a body): the body exceeds the server's limit;
- 429: the caller's requests exceed its throttle (``Retry-After``);
- 503: the database or the message broker is unavailable (``Retry-After``).

Request bodies are documented as JSON only (the browsable API's HTML forms are a convenience
with DRF's form semantics, not the API). Every list's ``page`` / ``page_size`` parameters get
the bounds the paginators enforce, and every query parameter ``allowEmptyValue``: an empty
value is no value (``?state=`` filters nothing), as django-filter, the ordering and the
paginators read it.
"""

from __future__ import annotations

from typing import Any

from wms.api import _ERROR_DESCRIPTIONS, CursorPagination, PageNumberPagination

_METHODS = ("get", "put", "post", "patch", "delete")
_WITH_BODY = ("put", "post", "patch")

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    }
}

# The generic answers, with the description used where the views' own table has none.
GENERIC_ERRORS: dict[int, str] = {
    400: "Invalid input (`validation_failed`): `detail` maps each field or query parameter "
    "to its errors. Nothing was written.",
    401: "No or bad credentials (`not_authenticated`).",
    403: "Not allowed (`permission_denied`).",
    404: "No such object, or it belongs to another user (`not_found`).",
    413: "The body exceeds the server's limit (`request_too_large`). Nothing was read.",
    429: "Too many requests (`throttled`); the `Retry-After` header says when to try again.",
    503: "The database or the message broker is unavailable; the `Retry-After` header says "
    "when to try again. Nothing was written.",
}
_WITH_RETRY_AFTER = (429, 503)

MAX_PAGE_SIZE = min(PageNumberPagination.max_page_size or 0, CursorPagination.max_page_size or 0)
_PARAMETER_BOUNDS: dict[str, dict[str, Any]] = {
    "page": {"minimum": 1},
    "page_size": {"minimum": 1, "maximum": MAX_PAGE_SIZE},
}


def _error_response(code: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERROR_DESCRIPTIONS.get(code, GENERIC_ERRORS[code]),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if code in _WITH_RETRY_AFTER:
        response["headers"] = dict(_RETRY_AFTER)
    return response


def add_generic_answers(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the generic answers and the list parameters'
    bounds on every operation under /api/v1/."""
    for path, operations in result.get("paths", {}).items():
        if not path.startswith("/api/v1/"):
            continue
        for method, operation in operations.items():
            if method not in _METHODS:
                continue
            body = operation.get("requestBody", {}).get("content", {})
            if "application/json" in body:
                # The API's bodies are JSON. The browsable API's HTML forms are parsed with
                # DRF's form semantics (an empty field is no field, no nested objects), which
                # this schema does not describe: a client sends JSON.
                for media_type in list(body):
                    if media_type != "application/json":
                        del body[media_type]
            responses = operation.setdefault("responses", {})
            for code in GENERIC_ERRORS:
                if code == 413 and method not in _WITH_BODY:
                    continue
                responses.setdefault(str(code), _error_response(code))
                if code in _WITH_RETRY_AFTER:
                    responses[str(code)].setdefault("headers", dict(_RETRY_AFTER))
            for parameter in operation.get("parameters", ()):
                if parameter.get("in") != "query":
                    continue
                # An empty value is no value (django-filter, ordering, the paginators).
                parameter["allowEmptyValue"] = True
                bounds = _PARAMETER_BOUNDS.get(parameter.get("name", ""))
                if bounds:
                    parameter.setdefault("schema", {}).update(bounds)
    return result
