"""What every API of the WMS shares: the one error handler, the error body, pagination, ordering.

Every error body is ``{"error": code, "detail": ...}``:

- domain exceptions (``wms.exceptions.WMSError``) answer with their own ``code`` and ``status``
  (``validation_failed`` 400, ``not_found`` 404, ``invalid_transition`` / ``dataset_closed`` /
  ``conflict`` 409, ...);
- DRF's exceptions answer with their status; bad input is ``validation_failed`` with ``detail``
  mapping each field to its errors; missing or bad credentials answer **401**
  ``not_authenticated`` with a ``WWW-Authenticate`` challenge (see ``_auth_challenge``);
- anything else is a bug: it is logged with its traceback and answers 500 ``internal_error``
  without leaking the exception text.
"""

from __future__ import annotations

from typing import Any

import structlog
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, JsonResponse
from drf_spectacular.utils import OpenApiResponse
from rest_framework import exceptions as drf_exc
from rest_framework import pagination, serializers, status
from rest_framework.filters import OrderingFilter
from rest_framework.response import Response
from rest_framework.views import set_rollback

from wms.exceptions import WMSError

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
    if isinstance(exc, WMSError):
        if exc.status >= 500:
            log.error("request_failed", error=exc.code, detail=str(exc.detail))
        challenge = _auth_challenge(context.get("request")) if exc.status == 401 else None
        return error_response(
            exc.code,
            exc.detail,
            exc.status,
            {"WWW-Authenticate": challenge} if challenge else None,
        )
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
        headers: dict[str, str] = {}
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


def not_found_view(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    """Unknown paths under /api/v1/ answer the error body too, not Django's HTML page."""
    return JsonResponse(
        {"error": "not_found", "detail": f"No endpoint at {request.path}."}, status=404
    )


class ErrorSerializer(serializers.Serializer):
    """The body of every error answer.

    ``error`` is a stable machine-readable code (``validation_failed``, ``not_authenticated``,
    ``permission_denied``, ``not_found``, ``invalid_transition``, ``dataset_closed``,
    ``conflict``, ``internal_error``, ...). ``detail`` is a message, or for
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
    429: "Too many requests (`throttled`): wait the seconds of `Retry-After`. Nothing was written.",
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


class PageNumberPagination(pagination.PageNumberPagination):
    """``?page=N&page_size=M`` (M up to 1000) for tables that stay small (tasks, datasets)."""

    page_size_query_param = "page_size"
    max_page_size = 1000


class CursorPagination(pagination.CursorPagination):
    """Opaque ``?cursor=`` links for big tables (jobs, files); no COUNT, stable under inserts."""

    ordering = "id"
    page_size_query_param = "page_size"
    max_page_size = 1000


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
