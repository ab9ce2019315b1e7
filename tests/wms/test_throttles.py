"""The API's throttles: per user, per anonymous address, per pilot (pilots are neither users
nor anonymous). A throttled call answers 429 with Retry-After and the error body, and writes
nothing."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from wms.models import ApiToken

pytestmark = pytest.mark.django_db

TOKENS = "/api/v1/tokens/"
IDLE = {"state": "idle"}


@pytest.fixture
def rates(settings):
    def _set(**rates):
        settings.REST_FRAMEWORK = {
            **settings.REST_FRAMEWORK,
            "DEFAULT_THROTTLE_RATES": {"user": None, "anon": None, "pilot": None, **rates},
        }

    return _set


def test_a_user_over_the_rate_gets_429_and_nothing_is_written(rates, user, other_user):
    rates(user="3/min")
    client = APIClient()
    client.force_authenticate(user)
    for i in range(3):
        assert client.post(TOKENS, {"name": f"t{i}"}, format="json").status_code == 201

    response = client.post(TOKENS, {"name": "one too many"}, format="json")

    assert response.status_code == 429
    assert response.json()["error"] == "throttled"
    assert "detail" in response.json()
    assert 0 < int(response["Retry-After"]) <= 60
    assert ApiToken.objects.filter(user=user).count() == 3
    other = APIClient()
    other.force_authenticate(other_user)
    assert other.get(TOKENS).status_code == 200  # per user, not per address


def test_anonymous_calls_are_counted_per_address(rates, anon_client):
    rates(anon="2/min")
    for _ in range(2):
        assert anon_client.get("/api/schema/").status_code == 200
    assert anon_client.get("/api/schema/").status_code == 429
    assert anon_client.get("/api/schema/", REMOTE_ADDR="10.9.9.9").status_code == 200


def test_pilots_are_neither_users_nor_anonymous(rates, make_pilot):
    """Every pilot of a site may share one address: the user and anonymous rates do not touch
    them; their own scope counts per pilot."""
    rates(user="1/min", anon="1/min")
    first, first_client = make_pilot()
    for _ in range(5):
        url = f"/api/v1/pilots/{first.pk}/heartbeat/"
        assert first_client.post(url, IDLE, format="json").status_code == 200

    rates(user="1/min", anon="1/min", pilot="2/min")
    second, second_client = make_pilot()
    url = f"/api/v1/pilots/{second.pk}/heartbeat/"
    assert [second_client.post(url, IDLE, format="json").status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    third, third_client = make_pilot()
    url = f"/api/v1/pilots/{third.pk}/heartbeat/"
    assert third_client.post(url, IDLE, format="json").status_code == 200


def test_the_defaults_are_generous(settings):
    rates = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]
    assert rates["user"] == "6000/min" and rates["anon"] == "600/min"
    assert rates["pilot"] is None  # pilots: off unless a site sets WMS_THROTTLE_PILOT
