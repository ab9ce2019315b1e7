"""The short path of pilots' calls (``wms.middleware.TokenRequestPath``): a call of the pilot
protocol with a pilot's token skips the middleware that serves browsers and users, and is
still authenticated, answered with the security headers, and logged when it fails."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from pilots.services import pilot_revoke_token
from wms.middleware import TokenRequestPath

pytestmark = pytest.mark.django_db


def _events(caplog, level: int = 20) -> list[tuple[str | None, dict]]:
    return [
        (r.msg.get("event"), r.msg)
        for r in caplog.records
        if r.levelno >= level and isinstance(r.msg, dict)
    ]


def heartbeat(client, pilot, **body):
    body.setdefault("state", "idle")
    return client.post(f"/api/v1/pilots/{pilot.pk}/heartbeat/", body, format="json")


def test_a_pilot_call_takes_the_short_path(make_pilot, caplog):
    pilot, client = make_pilot()
    caplog.clear()
    with caplog.at_level("INFO"):
        response = heartbeat(client, pilot)

    assert response.status_code == 200, response.json()
    request = response.wsgi_request
    assert not hasattr(request, "session")  # no session, CSRF, messages middleware
    assert not hasattr(request, "_messages")
    assert "Set-Cookie" not in response and "Cookie" not in response.get("Vary", "")
    # the security headers and X-Frame-Options are still set
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    events = [e for e, _ in _events(caplog)]
    assert "request_started" not in events and "request_finished" not in events
    # what the call itself logged carries a request id
    (changed,) = [ctx for e, ctx in _events(caplog) if e == "pilot_state_changed"]
    assert len(changed["request_id"]) == 36


def test_a_users_call_takes_the_long_path(user, token_client, caplog):
    client = token_client(user)
    caplog.clear()
    with caplog.at_level("INFO"):
        response = client.get("/api/v1/tasks/")

    assert response.status_code == 200
    assert hasattr(response.wsgi_request, "session")
    events = [e for e, _ in _events(caplog)]
    assert "request_started" in events and "request_finished" in events


def test_a_pilot_token_on_a_user_endpoint_takes_the_long_path_and_is_refused(make_pilot):
    _pilot, client = make_pilot()
    response = client.get("/api/v1/tasks/")
    assert response.status_code == 403
    assert hasattr(response.wsgi_request, "session")


def test_registration_takes_the_long_path(user, caplog):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Pilot wmsp_not-a-token")
    response = client.post("/api/v1/pilots/register/", {"hostname": "x"}, format="json")
    assert response.status_code in (401, 403)
    assert hasattr(response.wsgi_request, "session")


def test_a_revoked_token_is_refused_at_once(make_pilot):
    pilot, client = make_pilot()
    assert heartbeat(client, pilot).status_code == 200

    pilot_revoke_token(pilot_id=pilot.pk)

    response = heartbeat(client, pilot)
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert not hasattr(response.wsgi_request, "session")  # on the short path too


def test_an_unknown_token_and_another_pilots_id_are_refused(make_pilot):
    pilot, client = make_pilot()
    other, _ = make_pilot(hostname="other")
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION="Pilot wmsp_guessed")
    assert heartbeat(stranger, pilot).status_code == 401
    assert heartbeat(client, other).status_code == 403


def test_a_refused_pilot_call_is_logged_with_its_status(make_pilot, caplog):
    pilot, client = make_pilot()
    caplog.clear()
    with caplog.at_level("INFO"):
        response = heartbeat(client, pilot, state="exploding")

    assert response.status_code == 400
    finished = [ctx for e, ctx in _events(caplog, 30) if e == "request_finished"]
    assert len(finished) == 1
    assert finished[0]["code"] == 400
    assert finished[0]["request"] == f"POST /api/v1/pilots/{pilot.pk}/heartbeat/"
    assert finished[0]["level"] == "warning" and "request_id" in finished[0]


def test_a_failing_pilot_call_answers_500_and_is_logged_with_its_traceback(
    make_pilot, monkeypatch, caplog
):
    from pilots.api import pilot_views

    def broken(**kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pilot_views, "pilot_heartbeat", broken)
    pilot, client = make_pilot()
    client.raise_request_exception = False
    caplog.clear()
    with caplog.at_level("INFO"):
        response = heartbeat(client, pilot)

    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    errors = [r for r in caplog.records if r.levelno >= 40]
    assert errors and any(r.exc_info for r in errors)


def test_the_short_path_can_be_switched_off(make_pilot, settings):
    settings.WMS_LEAN_PATHS = []
    pilot, client = make_pilot()
    response = heartbeat(client, pilot)
    assert response.status_code == 200
    assert hasattr(response.wsgi_request, "session")


@pytest.mark.parametrize(
    ("authorization", "path", "short"),
    [
        ("Pilot abc", "/api/v1/pilots/12/heartbeat/", True),
        ("pilot abc", "/api/v1/pilots/12/terminate/", True),
        ("Pilot abc", "/api/v1/pilots/12/events/", True),
        ("Pilot abc", "/api/v1/jobs/7b0c2f0e-8d5b-4d7a-9a43-8c1e1ad3c1b7/start/", True),
        ("Pilot abc", "/api/v1/jobs/7b0c2f0e8d5b4d7a9a438c1e1ad3c1b7/report/", True),
        ("Pilot abc", "/api/v1/pilots/register/", False),
        ("Pilot abc", "/api/v1/pilots/12/", False),
        ("Pilot abc", "/api/v1/jobs/12/cancel/", False),
        ("Pilot abc", "/api/v1/pilots/12/heartbeat/x", False),
        ("Token abc", "/api/v1/pilots/12/heartbeat/", False),
        ("Pilotabc", "/api/v1/pilots/12/heartbeat/", False),
        (None, "/api/v1/pilots/12/heartbeat/", False),
    ],
)
def test_which_calls_take_the_short_path(rf, authorization, path, short):
    middleware = TokenRequestPath(lambda request: None)  # type: ignore[arg-type,return-value]
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    assert middleware.takes(rf.post(path, **headers)) is short
