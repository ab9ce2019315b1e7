"""What every API of the WMS shares: the one error handler, the error body, pagination, ordering.

Every error body is ``{"error": code, "detail": ...}``:

- domain exceptions (``wms.exceptions.WMSError``) answer with their own ``code`` and ``status``
  (``validation_failed`` 400, ``not_found`` 404, ``invalid_transition`` / ``dataset_closed`` /
  ``conflict`` 409, ...);
- DRF's exceptions answer with their status; bad input is ``validation_failed`` with ``detail``
  mapping each field to its errors; missing or bad credentials answer **401**
  ``not_authenticated`` with a ``WWW-Authenticate`` challenge (see ``_auth_challenge``);
- the database or the broker unreachable answers **503** ``database_unavailable`` /
  ``broker_unavailable`` with ``Retry-After`` (``WMS_API_RETRY_AFTER`` seconds): an outage, not a
  bug, and the client should try again;
- Django's refusals of a request (``RequestDataTooBig`` 413 ``request_too_large``,
  ``TooManyFieldsSent`` 400 ``parse_error``, other ``SuspiciousOperation`` 400 ``bad_request``);
- anything else is a bug: it is logged with its traceback and answers 500 ``internal_error``
  without leaking the exception text.

Errors raised outside DRF's views (unknown URLs, CSRF failures, refusals and failures in
middleware, e.g. a session read while the database is down) reach Django's error handlers:
``config.urls`` points them at :func:`bad_request`, :func:`permission_denied`,
:func:`page_not_found`, :func:`server_error` and :func:`csrf_failure` here, which answer the
same body under ``/api/`` and Django's own pages elsewhere (the admin).
"""

from __future__ import annotations

import sys
from typing import Any

import amqp.exceptions
import kombu.exceptions
import structlog
from django.conf import settings
from django.core.exceptions import (
    FieldDoesNotExist,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError as DatabaseInterfaceError
from django.db import OperationalError as DatabaseOperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.views import csrf as django_csrf
from django.views import defaults as django_defaults
from drf_spectacular.utils import OpenApiResponse
from rest_framework import exceptions as drf_exc
from rest_framework import pagination, serializers, status
from rest_framework.filters import OrderingFilter
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import set_rollback

from wms.exceptions import BrokerError, WMSError
from wms.middleware import error_json, is_api_request

log = structlog.get_logger(__name__)


# --- the error body -------------------------------------------------------------------------------


def _drf_code(exc: drf_exc.APIException) -> str:
    if isinstance(exc, drf_exc.ValidationError):
        return "validation_failed"
    if isinstance(exc, drf_exc.NotAuthenticated | drf_exc.AuthenticationFailed):
        return "not_authenticated"
    codes = exc.get_codes()
    return codes if isinstance(codes, str) else exc.default_code


def error_response(
    code: str, detail: Any, http_status: int, headers: dict | None = None
) -> Response:
    return Response({"error": code, "detail": detail}, status=http_status, headers=headers)


def _auth_challenge(request: Any) -> str | None:
    """The ``WWW-Authenticate`` challenge of the first authenticator that offers one.

    DRF asks only the *first* authentication class; with session authentication first (it
    offers no challenge) DRF would answer 403 to a request without credentials. Token
    authentication offers ``Token``, so the API answers 401 as it should.
    """
    for authenticator in getattr(request, "authenticators", None) or ():
        header = authenticator.authenticate_header(request)
        if header:
            return header
    return None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's ``EXCEPTION_HANDLER``: any exception raised in a view becomes the error body."""
    # Roll back ATOMIC_REQUESTS transactions as DRF's own handler does: no half-written change.
    set_rollback()
    outage = outage_of(exc)
    if outage is not None:
        log.error("request_failed", error=outage[0], detail=str(exc))
        return error_response(*outage, 503, {"Retry-After": retry_after()})
    if isinstance(exc, WMSError):
        if exc.status >= 500:
            log.error("request_failed", error=exc.code, detail=str(exc.detail))
        headers: dict[str, str] = {}
        if exc.status == 503:  # a passing state: try again soon
            headers["Retry-After"] = retry_after()
        if exc.status == 401:
            challenge = _auth_challenge(context.get("request"))
            if challenge:
                headers["WWW-Authenticate"] = challenge
        return error_response(exc.code, exc.detail, exc.status, headers or None)
    refusal = refusal_of(exc)
    if refusal is not None:
        return error_response(*refusal)
    if isinstance(exc, Http404):
        return error_response("not_found", "Not found.", status.HTTP_404_NOT_FOUND)
    if isinstance(exc, DjangoPermissionDenied):
        return error_response(
            "permission_denied", str(exc) or "You may not do this.", status.HTTP_403_FORBIDDEN
        )
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        return error_response("validation_failed", detail, status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, drf_exc.APIException):
        headers = {}
        status_code = exc.status_code
        if isinstance(exc, drf_exc.NotAuthenticated | drf_exc.AuthenticationFailed):
            challenge = getattr(exc, "auth_header", None) or _auth_challenge(context.get("request"))
            if challenge:
                headers["WWW-Authenticate"] = challenge
                status_code = status.HTTP_401_UNAUTHORIZED
            else:  # no authenticator can challenge: a 401 would be malformed (RFC 9110)
                status_code = status.HTTP_403_FORBIDDEN
        wait = getattr(exc, "wait", None)
        if wait:
            headers["Retry-After"] = str(int(wait))
        return error_response(_drf_code(exc), exc.detail, status_code, headers or None)
    # Anything else is a bug: log it with the request id (bound by django-structlog).
    view = context.get("view")
    log.exception("unhandled_error", view=type(view).__name__ if view else None)
    return error_response("internal_error", "Internal server error.", 500)


def retry_after() -> str:
    return str(settings.WMS_API_RETRY_AFTER)


_DATABASE_DOWN = (DatabaseOperationalError, DatabaseInterfaceError)
_BROKER_DOWN = (BrokerError, kombu.exceptions.OperationalError, amqp.exceptions.ConnectionError)


def outage_of(exc: BaseException | None) -> tuple[str, str] | None:
    """``(code, detail)`` when ``exc`` says the database or the broker cannot be reached
    (or failed in a way worth retrying: a connection lost, a statement cancelled)."""
    if isinstance(exc, _DATABASE_DOWN):
        return "database_unavailable", "The database is unavailable; try again later."
    if isinstance(exc, _BROKER_DOWN):
        return "broker_unavailable", "The message broker is unavailable; try again later."
    return None


def refusal_of(exc: BaseException | None) -> tuple[str, str, int] | None:
    """``(code, detail, status)`` of Django's refusals of a request (``SuspiciousOperation``)."""
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return "request_too_large", f"The request body exceeds {limit} bytes.", 413
    if isinstance(exc, TooManyFieldsSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return "parse_error", f"Too many form fields (at most {limit}).", 400
    if isinstance(exc, TooManyFilesSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FILES
        return "parse_error", f"Too many files (at most {limit}).", 400
    if isinstance(exc, SuspiciousOperation):
        # DisallowedHost, a malformed header or cookie, ...: the text may echo the input.
        return "bad_request", "The request was refused as malformed.", 400
    return None


class JSONErrorsMixin:
    """For DRF views whose renderers are not JSON (the OpenAPI schema's YAML, Swagger UI's
    HTML): their errors are rendered as JSON all the same."""

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)  # type: ignore[misc]
        request = self.request  # type: ignore[attr-defined]
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = JSONRenderer.media_type
        return response


# --- Django's error handlers (config.urls: handler400, handler403, handler404, handler500) --


def not_found_view(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    """Unknown paths under /api/ answer the error body too, not Django's HTML page."""
    return error_json("not_found", f"No endpoint at {request.path}.", 404)


not_found_view.csrf_exempt = True  # type: ignore[attr-defined]  # an unknown URL is a 404


def bad_request(request: HttpRequest, exception: Exception, **kwargs: Any) -> HttpResponse:
    if not is_api_request(request):
        return django_defaults.bad_request(request, exception, **kwargs)
    refusal = refusal_of(exception) or ("bad_request", "The request was refused.", 400)
    return error_json(*refusal)


def permission_denied(request: HttpRequest, exception: Exception, **kwargs: Any) -> HttpResponse:
    if not is_api_request(request):
        return django_defaults.permission_denied(request, exception, **kwargs)
    return error_json("permission_denied", str(exception) or "You may not do this.", 403)


def page_not_found(request: HttpRequest, exception: Exception, **kwargs: Any) -> HttpResponse:
    if not is_api_request(request):
        return django_defaults.page_not_found(request, exception, **kwargs)
    return not_found_view(request)


def server_error(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    """An exception outside DRF's views (in a middleware, e.g. a session read while the
    database is down). Django calls this while handling it: ``sys.exc_info()`` holds it."""
    if not is_api_request(request):
        return django_defaults.server_error(request, **kwargs)
    outage = outage_of(sys.exc_info()[1])
    if outage is not None:
        return error_json(*outage, 503, Retry_After=retry_after())
    return error_json("internal_error", "Internal server error.", 500)


def csrf_failure(request: HttpRequest, reason: str = "", **kwargs: Any) -> HttpResponse:
    """``CSRF_FAILURE_VIEW``: a session-authenticated write without its CSRF token."""
    if not is_api_request(request):
        return django_csrf.csrf_failure(request, reason, **kwargs)
    return error_json("permission_denied", f"CSRF Failed: {reason}", 403)


class ErrorSerializer(serializers.Serializer):
    """The body of every error answer.

    ``error`` is a stable machine-readable code (``validation_failed``, ``not_authenticated``,
    ``permission_denied``, ``not_found``, ``invalid_transition``, ``dataset_closed``,
    ``conflict``, ``parse_error``, ``request_too_large``, ``database_unavailable``,
    ``broker_unavailable``, ``internal_error``, ...). ``detail`` is a message, or for
    ``validation_failed`` an object mapping each field to its list of errors.
    """

    error = serializers.CharField()
    detail = serializers.JSONField()


_ERROR_DESCRIPTIONS = {
    400: "Invalid input (`validation_failed`): `detail` maps each field to its errors. "
    "Nothing was written.",
    401: "No or bad credentials (`not_authenticated`).",
    403: "Not allowed (`permission_denied`).",
    404: "No such object, or it belongs to another user (`not_found`).",
    409: "The change conflicts with the current state (`invalid_transition`, "
    "`dataset_closed`, `conflict`). Nothing was written.",
    413: "The body exceeds the server's limit (`request_too_large`, `WMS_API_MAX_BODY`). "
    "Nothing was read or written.",
    422: "The `Idempotency-Key` was already used for another call (`idempotency_key_reused`). "
    "Nothing was written.",
    429: "Too many requests (`throttled`): wait the seconds of `Retry-After`. Nothing was written.",
    503: "The database or the message broker is unavailable (`database_unavailable`, "
    "`broker_unavailable`); the `Retry-After` header says when to try again. Nothing was "
    "written.",
}


def error_responses(*codes: int) -> dict[int, OpenApiResponse]:
    """Schema entries for error answers: ``{401: OpenApiResponse(ErrorSerializer), ...}``.

    401 and 403 are added to every operation (every endpoint needs authentication), and 429
    (every endpoint is throttled, ``wms.throttles``).
    """
    wanted = sorted({401, 403, 429, *codes})
    return {
        code: OpenApiResponse(response=ErrorSerializer, description=_ERROR_DESCRIPTIONS[code])
        for code in wanted
    }


# --- lists ----------------------------------------------------------------------------------------


def _bad_parameter(name: str, message: str) -> drf_exc.ValidationError:
    return drf_exc.ValidationError({name: [message]})


def _whole(raw: str) -> int | None:
    """A positive whole number written plainly (at most 18 digits), else None."""
    if raw.isascii() and raw.isdigit() and len(raw) <= 18 and int(raw) >= 1:
        return int(raw)
    return None


def _page_size(paginator: Any, request: Any) -> int:
    """``?page_size=``: a whole number from 1 to ``max_page_size``, else 400 naming it."""
    raw = request.query_params.get(paginator.page_size_query_param)
    if raw is None:
        return paginator.page_size
    limit = paginator.max_page_size
    size = _whole(raw)
    if size is None or size > limit:
        raise _bad_parameter(paginator.page_size_query_param, f"A whole number from 1 to {limit}.")
    return size


class PageNumberPagination(pagination.PageNumberPagination):
    """``?page=N&page_size=M`` (M up to 1000) for tables that stay small (tasks, datasets).

    A ``page`` or ``page_size`` that is not a positive whole number (or ``last``) answers 400
    naming the parameter; a page past the last one answers 404."""

    page_size_query_param = "page_size"
    max_page_size = 1000

    def get_page_size(self, request: Any) -> int:
        return _page_size(self, request)

    def get_page_number(self, request: Any, paginator: Any) -> Any:
        raw = request.query_params.get(self.page_query_param)
        if raw is not None and raw not in self.last_page_strings and _whole(raw) is None:
            raise _bad_parameter(self.page_query_param, "A whole number from 1, or 'last'.")
        return super().get_page_number(request, paginator)


class CursorPagination(pagination.CursorPagination):
    """Opaque ``?cursor=`` links for big tables (jobs, files); no COUNT, stable under inserts.

    A cursor that was not made by this server (undecodable, or its position not a value of
    the ordering's field) answers 400 naming ``cursor``, as does a bad ``page_size``."""

    ordering = "id"
    page_size_query_param = "page_size"
    max_page_size = 1000
    invalid_cursor_message = "Invalid cursor: use the `next` or `previous` link of a page."

    def get_page_size(self, request: Any) -> int:
        return _page_size(self, request)

    def paginate_queryset(self, queryset: Any, request: Any, view: Any = None) -> Any:
        self._model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request: Any) -> Any:
        try:
            cursor = super().decode_cursor(request)
        except drf_exc.NotFound:
            raise _bad_parameter(self.cursor_query_param, self.invalid_cursor_message) from None
        if cursor is not None and cursor.position is not None:
            self._check_position(cursor.position)
        return cursor

    def _check_position(self, position: Any) -> None:
        """The position goes into ``WHERE <field> > %s``: it must be a value of that field
        (in its range: a bigint past 2**63 would make the database fail)."""
        name = self.ordering[0].lstrip("-")
        meta = self._model._meta
        try:
            field = meta.pk if name == "pk" else meta.get_field(name)
        except FieldDoesNotExist:  # an ordering across a relation: left to the database
            field = None
        try:
            if "\x00" in str(position):
                raise ValueError("NUL")
            if field is not None:
                field.run_validators(field.to_python(position))
        except (DjangoValidationError, ValueError, TypeError):
            raise _bad_parameter(self.cursor_query_param, self.invalid_cursor_message) from None


class StableOrderingFilter(OrderingFilter):
    """``?ordering=`` with the primary key appended, so that equal keys keep a stable order
    from one page to the next."""

    def get_ordering(self, request: Any, queryset: Any, view: Any) -> list[str] | None:
        terms = super().get_ordering(request, queryset, view)
        if not terms:
            return None
        ordering = list(terms)
        if not any(term.lstrip("-") in ("id", "pk") for term in ordering):
            ordering.append("-id" if ordering[0].startswith("-") else "id")
        return ordering


# --- input ----------------------------------------------------------------------------------------


def _is_json(data: Any) -> bool:
    """A JSON body (a plain dict), not an HTML form's (a ``QueryDict``: every value a string)."""
    return isinstance(data, dict) and not isinstance(data, QueryDict)


def _is_json_int(raw: Any) -> bool:
    if isinstance(raw, float):
        return raw.is_integer()
    return isinstance(raw, int) and not isinstance(raw, bool)


def _raw_value_problem(field: serializers.Field, raw: Any, *, form: bool) -> Any:
    """What the schema says of a value as sent, that DRF's fields let through: a string's
    length before trimming (``maxLength``), and in JSON the type (DRF takes ``5`` for a string
    and for a uuid, ``"5"`` for an integer, ``0`` or ``"yes"`` for a boolean)."""
    if raw is None or field.read_only:
        return None
    if isinstance(field, serializers.ListField) and isinstance(raw, list) and not form:
        items = {i: _raw_value_problem(field.child, item, form=False) for i, item in enumerate(raw)}
        problems = {i: [problem] for i, problem in items.items() if problem}
        return problems or None
    if isinstance(field, serializers.CharField):
        limit = field.max_length or 0
        if not form and not isinstance(raw, str):
            return "Not a valid string."
        if isinstance(raw, str) and 0 < limit < len(raw):
            return f"Ensure this field has no more than {limit} characters."
    elif isinstance(field, serializers.UUIDField) and not form and not isinstance(raw, str):
        return "Must be a valid UUID."
    elif isinstance(field, serializers.IntegerField) and not form and not _is_json_int(raw):
        return "A valid integer is required."
    elif isinstance(field, serializers.BooleanField) and not form and not isinstance(raw, bool):
        return "Must be true or false."
    return None


class StrictFieldsMixin:
    """For input serializers: they validate, services write.

    A field the serializer does not take answers 400 instead of being ignored: a client that
    sends ``{"state": "running"}`` to a PATCH learns that the field cannot be changed here,
    rather than getting a 200 that changed nothing. And ``save()`` is refused: the view hands
    ``validated_data`` to a service (DESIGN.md section 2, one write path per change).
    """

    unknown_field_message = "Unknown field."

    def create(self, validated_data: Any) -> Any:
        raise NotImplementedError("Input serializers do not write: call a service.")

    def update(self, instance: Any, validated_data: Any) -> Any:
        raise NotImplementedError("Input serializers do not write: call a service.")

    def to_internal_value(self, data: Any) -> Any:
        errors: dict[str, Any] = {}
        value = None
        try:
            value = super().to_internal_value(data)  # type: ignore[misc]
        except serializers.ValidationError as exc:
            if not isinstance(exc.detail, dict):
                raise
            errors.update(exc.detail)
        if isinstance(data, dict) or hasattr(data, "keys"):
            for name, field in self.fields.items():  # type: ignore[attr-defined]
                problem = _raw_value_problem(field, data.get(name), form=not _is_json(data))
                if problem and name not in errors:
                    errors[name] = problem if isinstance(problem, dict) else [problem]
            writable = {
                name
                for name, field in self.fields.items()  # type: ignore[attr-defined]
                if not field.read_only
            }
            # The browsable API's HTML forms post their CSRF token along with the fields.
            for key in sorted(set(data.keys()) - writable - {"csrfmiddlewaretoken"}):
                errors[key] = [self.unknown_field_message]
        if errors:
            raise serializers.ValidationError(errors)
        return value


class TransitionReasonSerializer(StrictFieldsMixin, serializers.Serializer):
    """Optional body of a state-change action (pause, resume, cancel, close)."""

    reason = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=1000,
        help_text="Why; recorded with the transition. Defaults to who asked.",
    )


def transition_reason(request: Any, verb: str) -> str:
    """Validate an action's optional body; the reason recorded with the transition."""
    serializer = TransitionReasonSerializer(data=request.data)
    serializer.is_valid(raise_exception=True)
    reason = serializer.validated_data.get("reason", "").strip()
    who = request.user.get_username()
    return f"{reason} (by {who})" if reason else f"{verb} requested by {who}"
