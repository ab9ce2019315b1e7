"""The one exception handler: every error answers ``{"error": code, "detail": ...}``."""

import pytest
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView

from wms.exceptions import DatasetClosed, DSMError, InvalidTransition, Unauthenticated

factory = APIRequestFactory()


def _view(exc, *, permission=AllowAny, authentication=(SessionAuthentication,)):
    class Raising(APIView):
        permission_classes = [permission]
        authentication_classes = list(authentication)

        def get(self, request):
            if exc is None:
                return Response({"ok": True})
            raise exc

    return Raising.as_view()


def test_an_unexpected_exception_answers_500_internal_error():
    response = _view(RuntimeError("secret connection string"))(factory.get("/x"))

    assert response.status_code == 500
    assert response.data == {"error": "internal_error", "detail": "Internal server error."}
    assert "secret" not in str(response.data)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (
            InvalidTransition(entity="task", pk=1, current="finished", target="cancelled"),
            409,
            "invalid_transition",
        ),
        (DatasetClosed(), 409, "dataset_closed"),
        (DSMError("DSM down"), 502, "dsm_error"),
        (DjangoValidationError({"rank": ["too big"]}), 400, "validation_failed"),
    ],
)
def test_domain_and_django_exceptions_keep_their_code(exc, status, code):
    response = _view(exc)(factory.get("/x"))
    assert response.status_code == status
    assert response.data["error"] == code
    assert set(response.data) == {"error", "detail"}


def test_the_validation_detail_of_django_errors_is_per_field():
    response = _view(DjangoValidationError({"rank": ["too big"]}))(factory.get("/x"))
    assert response.data["detail"] == {"rank": ["too big"]}


def test_unauthenticated_is_401_even_with_session_authentication_first():
    """DRF asks only the first authenticator for a challenge; session offers none, so DRF
    alone would answer 403. The handler finds Token's challenge and answers 401."""
    view = _view(
        None,
        permission=IsAuthenticated,
        authentication=(SessionAuthentication, TokenAuthentication),
    )
    response = view(factory.get("/x"))
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert response.data["error"] == "not_authenticated"


def test_a_domain_unauthenticated_error_carries_the_challenge():
    view = _view(Unauthenticated(), authentication=(SessionAuthentication, TokenAuthentication))
    response = view(factory.get("/x"))
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert response.data["error"] == "not_authenticated"


def test_unauthenticated_without_any_challenge_is_403():
    """A 401 must carry a challenge; with session authentication alone, 403 it is."""
    view = _view(None, permission=IsAuthenticated, authentication=(SessionAuthentication,))
    response = view(factory.get("/x"))
    assert response.status_code == 403
    assert response.data["error"] == "not_authenticated"
    assert not response.has_header("WWW-Authenticate")


@pytest.mark.parametrize("path", ["/api/v1/no-such-thing/", "/api/v1/", "/api/v1/tasks/1/x/"])
def test_an_unknown_api_path_answers_404_with_the_error_body(api_client, path):
    response = api_client.get(path)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_a_known_path_without_its_slash_is_redirected(api_client):
    response = api_client.get("/api/v1/tasks")
    assert response.status_code == 301
    assert response["Location"] == "/api/v1/tasks/"
