"""The API's guard at the door: what is refused before a body is read or a URL resolved.

:class:`ApiRequestGuard` sits first in ``MIDDLEWARE`` and looks only at requests under
``/api/``:

- a ``Content-Length`` over ``WMS_API_MAX_BODY`` answers **413** ``request_too_large`` (the body
  is never read); a body without ``Content-Length`` (``Transfer-Encoding: chunked``) is read up
  to the same limit, and answers 413 beyond it;
- the NUL character in the path or in a query parameter (name or value) answers **400**
  ``validation_failed`` naming ``path`` or the parameter: PostgreSQL cannot store or compare
  text holding it.

:class:`TokenRequestPath` sits right after it: a call with a token of one of the schemes in
``WMS_LEAN_AUTH_SCHEMES`` (``Authorization: Pilot <token>``) to a path of
``WMS_LEAN_PATHS`` (the pilot protocol's endpoints, which take that token only) goes through
the short chain ``WMS_LEAN_MIDDLEWARE`` instead of the rest of ``MIDDLEWARE``: no session,
CSRF, user, messages, static files, lockout or per-request log lines, which serve browsers
and users, never a pilot (its calls carry no cookie). Every call is still authenticated by
its view (the token is checked there), and errors are still logged (below).

What the body holds (JSON depth, NUL in strings, non-finite numbers, form fields) is the
parsers' business (``wms.parsers``); errors raised outside DRF's views are answered by the
handlers in ``wms.api``.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

import structlog
from django.conf import settings
from django.core.exceptions import MiddlewareNotUsed
from django.core.handlers.base import BaseHandler
from django.core.handlers.exception import convert_exception_to_response
from django.core.handlers.wsgi import LimitedStream
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.module_loading import import_string

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


# --- the short path of token calls ---------------------------------------------------------------

request_log = structlog.get_logger("wms.request")


class _ShortChain(BaseHandler):
    """Django's request handling (URL resolution, view, exception and template-response
    middleware) behind the middleware of ``paths`` only: ``BaseHandler.load_middleware`` for a
    list other than ``settings.MIDDLEWARE`` (synchronous)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        handler = convert_exception_to_response(self._get_response)  # type: ignore[attr-defined]
        for path in reversed(paths):
            try:
                mw = import_string(path)(handler)
            except MiddlewareNotUsed:
                continue
            if hasattr(mw, "process_view"):
                self._view_middleware.insert(0, mw.process_view)
            if hasattr(mw, "process_template_response"):
                self._template_response_middleware.append(mw.process_template_response)
            if hasattr(mw, "process_exception"):
                self._exception_middleware.append(mw.process_exception)
            handler = convert_exception_to_response(mw)
        self._middleware_chain = handler


def _scheme_of(authorization: str, schemes: frozenset[str]) -> bool:
    scheme, _, _rest = authorization.partition(" ")
    return scheme.lower() in schemes


class TokenRequestPath:
    """A token call of the pilot protocol takes the short chain (see the module's text).

    The log: every line a call writes carries its ``request_id`` (the client's
    ``X-Request-ID`` is not trusted: a new uuid); a call answered >= 400 writes
    ``request_finished`` (WARNING, ERROR for 5xx) as django-structlog does, a call answered
    2xx writes nothing of its own (its service logs what changed); an exception is logged
    with its traceback by Django (``django.request``) and django-structlog's
    ``request_failed``, as on the long path.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        schemes = getattr(settings, "WMS_LEAN_AUTH_SCHEMES", ())
        paths = getattr(settings, "WMS_LEAN_PATHS", ())
        if not schemes or not paths:
            raise MiddlewareNotUsed()
        self.schemes = frozenset(s.lower() for s in schemes)
        self.paths = re.compile("|".join(f"(?:{p})" for p in paths))
        self.short = cast(
            Callable[[HttpRequest], HttpResponse],
            _ShortChain(getattr(settings, "WMS_LEAN_MIDDLEWARE", ()))._middleware_chain,
        )

    def takes(self, request: HttpRequest) -> bool:
        authorization = request.META.get("HTTP_AUTHORIZATION")
        return (
            authorization is not None
            and _scheme_of(authorization, self.schemes)
            and self.paths.match(request.path_info) is not None
        )

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not self.takes(request):
            return self.get_response(request)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=str(uuid.uuid4()))
        try:
            response = self.short(request)
            status = response.status_code
            if status >= 400:
                request_log.log(
                    40 if status >= 500 else 30,
                    "request_finished",
                    code=status,
                    request=f"{request.method} {request.get_full_path()}",
                )
            return response
        finally:
            structlog.contextvars.clear_contextvars()
