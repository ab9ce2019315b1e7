"""API v1 of pilots: read only, never shows a token hash."""

import pytest

from pilots.models import Pilot
from tests.factories import PilotFactory

pytestmark = pytest.mark.django_db

URL = "/api/v1/pilots/"


def test_anonymous_answers_401(anon_client):
    PilotFactory()
    response = anon_client.get(URL)
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"


def test_list_and_detail_never_show_the_token(api_client):
    pilot = PilotFactory(device_type="gpu", gpus=2)

    listed = api_client.get(URL).json()["results"]
    shown = api_client.get(f"{URL}{pilot.pk}/").json()

    assert [p["id"] for p in listed] == [pilot.pk]
    for body in (listed[0], shown):
        assert "token_hash" not in body and "token" not in body
        assert pilot.token_hash not in str(body)
        assert (body["hostname"], body["device_type"], body["gpus"]) == (
            pilot.hostname,
            "gpu",
            2,
        )


def test_filters_and_ordering(api_client):
    idle = PilotFactory(state="idle", site="CERN")
    busy = PilotFactory(state="busy", device_type="gpu")
    PilotFactory(state="terminated")

    def ids(query):
        response = api_client.get(f"{URL}?{query}")
        assert response.status_code == 200
        return [p["id"] for p in response.json()["results"]]

    assert ids("state=idle") == [idle.pk]
    assert sorted(ids("state=idle&state=busy")) == sorted([idle.pk, busy.pk])
    assert ids("device_type=gpu") == [busy.pk]
    assert ids("site=CERN") == [idle.pk]
    assert ids("ordering=id")[:2] == [idle.pk, busy.pk]


def test_pilots_are_read_only(api_client):
    pilot = PilotFactory()
    for method, url in (
        ("post", URL),
        ("patch", f"{URL}{pilot.pk}/"),
        ("delete", f"{URL}{pilot.pk}/"),
    ):
        response = getattr(api_client, method)(url, {"state": "lost"}, format="json")
        assert response.status_code == 405
        assert response.json()["error"] == "method_not_allowed"
    assert Pilot.objects.get(pk=pilot.pk).state == "registered"
