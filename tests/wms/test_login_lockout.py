"""Admin logins are locked after repeated failures (django-axes, per username and address), and
the API's token and session authentication is neither weakened nor blocked by it."""

from __future__ import annotations

import pytest
from axes.models import AccessAttempt
from django.contrib.sessions.models import Session
from django.test import Client
from rest_framework.test import APIClient

from tests.factories import TaskFactory, UserFactory, api_token

pytestmark = pytest.mark.django_db

LOGIN = "/admin/login/"
PASSWORD = "pw-for-tests"  # tests/factories.py


@pytest.fixture
def operator():
    return UserFactory(is_staff=True)


def _login(client: Client, username: str, password: str, ip: str = "10.0.0.7"):
    return client.post(
        LOGIN, {"username": username, "password": password, "next": "/admin/"}, REMOTE_ADDR=ip
    )


def _logged_in(response) -> bool:
    return response.status_code == 302 and response["Location"] == "/admin/"


def test_thirty_wrong_passwords_lock_the_account_even_for_the_right_one(operator, settings):
    client = Client()
    answers = [_login(client, operator.username, f"wrong-{i}").status_code for i in range(30)]

    limit = settings.AXES_FAILURE_LIMIT
    assert 5 <= limit <= 10
    assert answers[: limit - 1] == [200] * (limit - 1)  # the form again, with its error
    assert set(answers[limit:]) == {429}  # locked: refused before any password check
    right = _login(client, operator.username, PASSWORD)
    assert right.status_code == 429
    assert "Account locked" in right.content.decode()
    assert "_auth_user_id" not in client.session
    assert not any("_auth_user_id" in s.get_decoded() for s in Session.objects.all())


def test_a_success_before_the_limit_resets_the_count(operator, settings):
    client = Client()
    for _round in range(3):
        for i in range(settings.AXES_FAILURE_LIMIT - 1):
            assert _login(client, operator.username, f"wrong-{i}").status_code == 200
        assert _logged_in(_login(client, operator.username, PASSWORD))
        client.logout()
    assert not AccessAttempt.objects.filter(username=operator.username).exists()


def test_the_lock_holds_a_username_at_one_address_only(operator, settings):
    """username+IP: a guesser cannot lock the operator out from elsewhere."""
    for i in range(settings.AXES_FAILURE_LIMIT + 2):
        _login(Client(), operator.username, f"wrong-{i}", ip="203.0.113.9")
    assert _login(Client(), operator.username, PASSWORD, ip="203.0.113.9").status_code == 429
    assert _logged_in(_login(Client(), operator.username, PASSWORD, ip="10.0.0.8"))


def test_the_api_is_not_weakened_by_the_lockout(operator, settings):
    """Locked at the admin login, the user's API token still works (it is not a password and
    cannot be guessed); a bad token is still 401, counted by nobody as a login failure; the
    API offers no password login that would sidestep the lock."""
    task = TaskFactory(owner=operator)
    _token, key = api_token(operator)
    for i in range(settings.AXES_FAILURE_LIMIT + 1):
        _login(Client(), operator.username, f"wrong-{i}", ip="127.0.0.1")
    assert _login(Client(), operator.username, PASSWORD, ip="127.0.0.1").status_code == 429
    attempts = AccessAttempt.objects.get(username=operator.username).failures_since_start

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert [t["id"] for t in client.get("/api/v1/tasks/").json()["results"]] == [task.pk]
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token wrong")
    assert bad.get("/api/v1/tasks/").status_code == 401
    basic = APIClient()  # HTTP Basic (a password) is not an API authentication here
    basic.credentials(HTTP_AUTHORIZATION="Basic " + "b3BlcmF0b3I6cHc=")
    assert basic.get("/api/v1/tasks/").status_code == 401
    assert AccessAttempt.objects.get(username=operator.username).failures_since_start == attempts


def test_a_session_from_an_admin_login_works_on_the_api(operator):
    """DRF's session authentication takes the admin's session (with its CSRF check on writes)."""
    login = Client()
    assert _logged_in(_login(login, operator.username, PASSWORD, ip="127.0.0.1"))
    client = Client(enforce_csrf_checks=True)
    client.cookies = login.cookies
    assert client.get("/api/v1/tasks/").status_code == 200
    refused = client.post("/api/v1/tokens/", {"name": "x"}, content_type="application/json")
    assert refused.status_code == 403  # no CSRF token: a session write is refused
