"""The API's guard at the door: what is refused before a body is read or a URL resolved.

:class:`ApiRequestGuard` sits first in ``MIDDLEWARE`` and looks only at requests under
``/api/``:

- a ``Content-Length`` over ``WMS_API_MAX_BODY`` answers **413** ``request_too_large`` (the body
  is never read); a body without ``Content-Length`` (``Transfer-Encoding: chunked``) is read up
  to the same limit, and answers 413 beyond it;
- the NUL character in the path or in a query parameter (name or value) answers **400**
  ``validation_failed`` naming ``path`` or the parameter: PostgreSQL cannot store or compare
  text holding it.

What the body holds (JSON depth, NUL in strings, non-finite numbers, form fields) is the
parsers' business (``wms.parsers``); errors raised outside DRF's views are answered by the
handlers in ``wms.api``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.handlers.wsgi import LimitedStream
from django.http import HttpRequest, HttpResponse, JsonResponse

from wms.parsers import NUL_MESSAGE

API_PREFIX = "/api/"
_CHUNK = 64 * 1024


def is_api_request(request: HttpRequest) -> bool:
    return request.path_info.startswith(API_PREFIX)


def error_json(code: str, detail: Any, status: int, **headers: str) -> JsonResponse:
    response = JsonResponse({"error": code, "detail": detail}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def too_large(limit: int) -> JsonResponse:
    # The rest of the body is not read: the connection cannot carry another request.
    return error_json(
        "request_too_large",
        f"The request body exceeds the limit of {limit} bytes.",
        413,
        Connection="close",
    )


class ApiRequestGuard:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info.startswith(API_PREFIX):
            refusal = self.refusal(request)
            if refusal is not None:
                return refusal
        return self.get_response(request)

    def refusal(self, request: HttpRequest) -> HttpResponse | None:
        if "\x00" in request.path_info:
            return error_json("validation_failed", {"path": [NUL_MESSAGE]}, 400)
        query = request.META.get("QUERY_STRING", "")
        if "%00" in query or "\x00" in query:
            names = sorted(
                {
                    key
                    for key, values in request.GET.lists()
                    if "\x00" in key or any("\x00" in v for v in values)
                }
            )
            if names:
                return error_json("validation_failed", {n: [NUL_MESSAGE] for n in names}, 400)
        limit: int = settings.WMS_API_MAX_BODY
        length = request.META.get("CONTENT_LENGTH")
        if length:
            try:
                size = int(length)
            except ValueError:
                size = -1
            if size < 0:
                return error_json("bad_request", "Content-Length is not a valid length.", 400)
            if size > limit:
                return too_large(limit)
        elif request.META.get("HTTP_TRANSFER_ENCODING"):
            return self.bound_unsized_body(request, limit)
        return None

    def bound_unsized_body(self, request: HttpRequest, limit: int) -> HttpResponse | None:
        """A body of unknown length (chunked): read up to the limit, then let it through as
        a body of known length. Under WSGI the server must have decoded the chunks and
        marked the end (``wsgi.input_terminated``, as gunicorn does); otherwise Django
        reads no body at all and there is nothing to bound."""
        environ = getattr(request, "environ", None)
        if environ is not None:
            if not environ.get("wsgi.input_terminated"):
                return None
            source = environ["wsgi.input"]
        else:  # ASGI: the server handed over the whole body already
            source = request._stream  # type: ignore[attr-defined]
        buffer = io.BytesIO()
        while True:
            chunk = source.read(min(_CHUNK, limit + 1 - buffer.tell()))
            if not chunk:
                break
            buffer.write(chunk)
            if buffer.tell() > limit:
                return too_large(limit)
        size = buffer.tell()
        buffer.seek(0)
        request.META["CONTENT_LENGTH"] = str(size)
        request._stream = LimitedStream(buffer, size)  # type: ignore[attr-defined,assignment]
        return None
