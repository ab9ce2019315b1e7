"""Users' API tokens (wms.models.ApiToken): stored hashed, shown once, expiring, revocable,
never shown in the admin; the API, the management command and the data migration."""

from __future__ import annotations

import io
import re
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from tasks.models import Task
from tests.factories import DatasetFactory, TaskFactory, api_token
from wms.models import ApiToken
from wms.services import api_token_hash, api_token_revoke, api_token_touch

pytestmark = pytest.mark.django_db

TASKS = "/api/v1/tasks/"
TOKENS = "/api/v1/tokens/"


def _client(key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client


def _row_values() -> list[str]:
    """Every stored text of every token row: the key must be none of them, nor inside one."""
    return [str(v) for row in ApiToken.objects.values() for v in row.values()]


# --- storage and authentication ----------------------------------------------------------------


def test_only_the_hash_of_the_key_is_stored(user):
    token, key = api_token(user, name="laptop")

    assert token.key_hash == api_token_hash(key)
    assert not any(key in value for value in _row_values())
    assert key.startswith(token.prefix) and len(token.prefix) == 12 < len(key)
    with connection.cursor() as cursor:  # nothing of the key's secret part in the table
        cursor.execute("SELECT * FROM wms_apitoken")
        assert not any(key in str(col) for row in cursor.fetchall() for col in row)


def test_the_key_shown_once_works_as_a_token(user):
    task = TaskFactory(owner=user)
    _token, key = api_token(user)

    response = _client(key).get(TASKS)

    assert response.status_code == 200
    assert [t["id"] for t in response.json()["results"]] == [task.pk]


@pytest.mark.parametrize("how", ["expired", "revoked", "inactive user", "unknown"])
def test_an_expired_revoked_or_unknown_token_is_refused_401_and_changes_nothing(user, how):
    token, key = api_token(user)
    if how == "expired":
        ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(1))
    elif how == "revoked":
        api_token_revoke(token_id=token.pk)
    elif how == "inactive user":
        type(user).objects.filter(pk=user.pk).update(is_active=False)
    else:
        key = key[:-1] + ("A" if key[-1] != "A" else "B")
    before = Task.objects.count()

    response = _client(key).post(
        TASKS, {"executable": "x", "data_in_uid": str(DatasetFactory().uid)}, format="json"
    )

    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Token"
    assert Task.objects.count() == before
    assert ApiToken.objects.get(pk=token.pk).last_used_at is None  # not even marked used


def test_last_used_is_written_at_most_once_a_minute(user, django_assert_num_queries):
    token, key = api_token(user)
    client = _client(key)
    assert client.get(TOKENS).status_code == 200
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    assert first is not None

    # The next calls within the minute write nothing: as many statements as without a token
    # mark (token+user lookup, the list, its count).
    with django_assert_num_queries(3):
        assert client.get(TOKENS).status_code == 200
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first

    token.refresh_from_db()
    later = first + timedelta(seconds=61)
    assert api_token_touch(token=token, now=later) is True
    assert ApiToken.objects.get(pk=token.pk).last_used_at == later
    assert api_token_touch(token=token, now=later + timedelta(seconds=5)) is False


def test_the_token_keyword_still_takes_pilot_tokens_apart(user, make_pilot):
    """A pilot's token is not a user's token and the reverse (docs/pilot-api.md)."""
    pilot, pilot_client = make_pilot()
    assert _client(pilot_client.token).get(TASKS).status_code == 401
    _token, key = api_token(user)
    hb = APIClient()
    hb.credentials(HTTP_AUTHORIZATION=f"Pilot {key}")
    assert hb.post(f"/api/v1/pilots/{pilot.pk}/heartbeat/", {}, format="json").status_code == 401


# --- the API -----------------------------------------------------------------------------------


def test_create_through_the_api_shows_the_key_once(user, token_client):
    client = token_client(user)

    response = client.post(TOKENS, {"name": "ci", "expires_in_days": 7}, format="json")

    assert response.status_code == 201, response.json()
    body = response.json()
    assert response["Cache-Control"] == "no-store"
    key = body["key"]
    created = ApiToken.objects.get(pk=body["id"])
    assert created.key_hash == api_token_hash(key) and created.user == user
    assert body["prefix"] == key[:12] and body["active"] is True
    assert timedelta(days=6) < created.expires_at - timezone.now() < timedelta(days=8)
    assert _client(key).get(TASKS).status_code == 200
    # never again: neither in the list nor in the detail
    listed = client.get(TOKENS).json()["results"]
    assert {t["id"] for t in listed} == {client.api_token.pk, created.pk}
    assert all("key" not in t and "key_hash" not in t for t in listed)
    detail = client.get(f"{TOKENS}{created.pk}/").json()
    assert key not in str(detail) and created.key_hash not in str(detail)


def test_the_default_expiry_is_the_sites(user, settings):
    settings.WMS_API_TOKEN_DEFAULT_DAYS = 30
    client = APIClient()
    client.force_authenticate(user)  # a session
    body = client.post(TOKENS, {"name": "x"}, format="json").json()
    expires = ApiToken.objects.get(pk=body["id"]).expires_at
    assert timedelta(days=29) < expires - timezone.now() < timedelta(days=31)
    never = client.post(TOKENS, {"name": "y", "expires_in_days": 0}, format="json").json()
    assert never["expires_at"] is None


def test_a_token_cannot_mint_one_that_outlives_it(user, token_client):
    client = token_client(user, expires_at=timezone.now() + timedelta(days=2))
    before = ApiToken.objects.count()

    refused = client.post(TOKENS, {"name": "forever", "expires_in_days": 0}, format="json")

    assert refused.status_code == 400
    assert set(refused.json()["detail"]) == {"expires_in_days"}
    assert ApiToken.objects.count() == before
    capped = client.post(TOKENS, {"name": "default"}, format="json").json()
    assert ApiToken.objects.get(pk=capped["id"]).expires_at == client.api_token.expires_at


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "x", "expires_in_days": -1}, "expires_in_days"),
        ({"name": "x", "expires_in_days": 100_000}, "expires_in_days"),
        ({"name": "x", "key": "mine"}, "key"),
    ],
)
def test_bad_creations_answer_400_and_make_nothing(api_client, body, field):
    before = ApiToken.objects.count()
    response = api_client.post(TOKENS, body, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    assert field in response.json()["detail"]
    assert ApiToken.objects.count() == before


def test_revoke_through_the_api(user, token_client):
    client = token_client(user)
    victim, key = api_token(user, name="lost laptop")

    response = client.post(f"{TOKENS}{victim.pk}/revoke/")

    assert response.status_code == 200
    assert response.json()["active"] is False and response.json()["revoked_at"]
    assert _client(key).get(TASKS).status_code == 401
    assert client.post(f"{TOKENS}{victim.pk}/revoke/").status_code == 200  # no-op
    assert client.get(TASKS).status_code == 200  # the caller's own token still works


def test_other_users_tokens_are_invisible(user, other_user, token_client):
    client = token_client(user)
    theirs, their_key = api_token(other_user, name="theirs")

    listed = client.get(TOKENS).json()["results"]
    assert [t["id"] for t in listed] == [client.api_token.pk]
    assert client.get(f"{TOKENS}{theirs.pk}/").status_code == 404
    response = client.post(f"{TOKENS}{theirs.pk}/revoke/")
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert ApiToken.objects.get(pk=theirs.pk).revoked_at is None
    assert _client(their_key).get(TASKS).status_code == 200


def test_pilots_and_anonymous_callers_have_no_tokens(make_pilot, anon_client):
    _pilot, pilot_client = make_pilot()
    assert pilot_client.get(TOKENS).status_code == 403
    assert pilot_client.post(TOKENS, {"name": "x"}, format="json").status_code == 403
    assert anon_client.get(TOKENS).status_code == 401
    assert ApiToken.objects.count() == 0


# --- the admin ---------------------------------------------------------------------------------


def test_the_admin_lists_and_shows_tokens_without_any_secret(admin_client_logged, user):
    token, key = api_token(user, name="laptop")
    secret = key[len(token.prefix) :]

    pages = [
        admin_client_logged.get("/admin/wms/apitoken/"),
        admin_client_logged.get(f"/admin/wms/apitoken/{token.pk}/change/"),
    ]
    for page in pages:
        assert page.status_code == 200
        html = page.content.decode()
        assert secret not in html and token.key_hash not in html
        assert "key_hash" not in html
    assert "laptop" in pages[0].content.decode() and token.prefix in pages[0].content.decode()
    searched = admin_client_logged.get("/admin/wms/apitoken/", {"q": token.key_hash})
    assert "0 results" in searched.content.decode()  # the hash is not searchable
    guess = admin_client_logged.get("/admin/wms/apitoken/", {"key_hash__startswith": "a"})
    assert guess.status_code in (302, 400)  # not a filter: Django refuses the lookup


def test_creating_in_the_admin_shows_the_key_once(admin_client_logged, user):
    response = admin_client_logged.post(
        "/admin/wms/apitoken/add/", {"user": user.pk, "name": "from the admin"}
    )

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    match = re.search(r'<pre id="api-token-key"[^>]*>([^<]+)</pre>', response.content.decode())
    assert match
    key = match.group(1).strip()
    token = ApiToken.objects.get(name="from the admin")
    assert token.key_hash == api_token_hash(key) and token.user == user
    assert _client(key).get(TASKS).status_code == 200
    again = admin_client_logged.get(f"/admin/wms/apitoken/{token.pk}/change/")
    assert key not in again.content.decode()


def test_the_admin_revokes_tokens(admin_client_logged, user):
    token, key = api_token(user)
    response = admin_client_logged.post(
        "/admin/wms/apitoken/",
        {"action": "revoke_tokens", "_selected_action": [token.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert "1 API token revoked" in response.content.decode()
    assert ApiToken.objects.get(pk=token.pk).revoked_at is not None
    assert _client(key).get(TASKS).status_code == 401


# --- the management command --------------------------------------------------------------------


def test_the_command_creates_prints_once_lists_and_revokes(user):
    out, err = io.StringIO(), io.StringIO()
    call_command("api_token", "create", user.username, "--name", "cron", "--expires-in", "12h",
                 stdout=out, stderr=err)  # fmt: skip
    key = out.getvalue().strip()
    token = ApiToken.objects.get(name="cron")
    assert token.key_hash == api_token_hash(key)
    assert timedelta(hours=11) < token.expires_at - timezone.now() < timedelta(hours=13)
    assert _client(key).get(TASKS).status_code == 200

    listing = io.StringIO()
    call_command("api_token", "list", user.username, stdout=listing)
    assert token.prefix in listing.getvalue() and key not in listing.getvalue()
    assert token.key_hash not in listing.getvalue()

    call_command("api_token", "revoke", str(token.pk), stdout=io.StringIO())
    assert _client(key).get(TASKS).status_code == 401
    with pytest.raises(CommandError):
        call_command("api_token", "create", "nobody-by-that-name", stdout=io.StringIO())
    with pytest.raises(CommandError):
        call_command("api_token", "create", user.username, "--expires-in", "soon")


def test_the_command_revokes_every_token_of_a_user(user, other_user):
    mine = [api_token(user)[1], api_token(user)[1]]
    _theirs, their_key = api_token(other_user)
    call_command("api_token", "revoke", "--user", user.username, stdout=io.StringIO())
    assert all(_client(k).get(TASKS).status_code == 401 for k in mine)
    assert _client(their_key).get(TASKS).status_code == 200


# --- the data migration from rest_framework.authtoken ------------------------------------------


def test_drf_tokens_move_in_hashed_and_the_clear_table_goes(user):
    from importlib import import_module

    from django.apps import apps

    migration = import_module("wms.migrations.0003_apitoken_from_drf_authtoken")
    key = "0123456789abcdef0123456789abcdef01234567"
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, "
            "created timestamptz NOT NULL, user_id integer NOT NULL)"
        )
        cursor.execute(
            "INSERT INTO authtoken_token VALUES (%s, %s, %s)", [key, timezone.now(), user.pk]
        )
        cursor.execute(
            "INSERT INTO django_migrations (app, name, applied) VALUES ('authtoken', '0001', now())"
        )
    with connection.schema_editor() as editor:
        migration.move_drf_tokens(apps, editor)

    token = ApiToken.objects.get(user=user)
    assert token.key_hash == api_token_hash(key) and token.prefix == key[:6]
    assert "authtoken_token" not in connection.introspection.table_names()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_migrations WHERE app = 'authtoken'")
        assert cursor.fetchone()[0] == 0
    assert _client(key).get(TASKS).status_code == 200  # the old key keeps working
