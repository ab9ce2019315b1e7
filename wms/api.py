"""The one DRF exception handler: every error body is ``{"error": code, "detail": ...}``."""

from __future__ import annotations

from typing import Any

import structlog
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions as drf_exc
from rest_framework import status
from rest_framework.response import Response

from wms.exceptions import WMSError

log = structlog.get_logger(__name__)


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


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    if isinstance(exc, WMSError):
        if exc.status >= 500:
            log.error("request_failed", error=exc.code, detail=str(exc.detail))
        return error_response(exc.code, exc.detail, exc.status)
    if isinstance(exc, Http404):
        return error_response("not_found", "Not found.", status.HTTP_404_NOT_FOUND)
    if isinstance(exc, DjangoPermissionDenied):
        return error_response("permission_denied", str(exc) or "You may not do this.", 403)
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        return error_response("validation_failed", detail, status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, drf_exc.APIException):
        headers = {}
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header  # type: ignore[attr-defined]
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))  # type: ignore[attr-defined]
        status_code = exc.status_code
        request = context.get("request")
        if isinstance(exc, drf_exc.NotAuthenticated | drf_exc.AuthenticationFailed) and not (
            request is not None and getattr(request, "_authenticator", None)
        ):
            # DRF answers 403 when no authenticator offers a WWW-Authenticate header.
            status_code = 401 if headers.get("WWW-Authenticate") else exc.status_code
        return error_response(_drf_code(exc), exc.detail, status_code, headers or None)
    # Anything else is a bug: log it with the request id (bound by django-structlog).
    log.exception("unhandled_error", view=type(context.get("view")).__name__)
    return error_response("internal_error", "Internal server error.", 500)
