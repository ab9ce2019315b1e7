"""Outages answer 503 with ``Retry-After``, not 500: the database or the broker unreachable,
for users and pilots alike, whether the failure comes in a view or before it (a session or
token read in a middleware). And the first request after the database is back works.

The outages are real: a database server or a broker on a port nobody listens on, and for the
web app under gunicorn, a TCP relay in front of Postgres that is cut and restored, and the
server's backend killed with ``pg_terminate_backend``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from django.test import Client

from devtools.stack import free_port
from pilots.agent.client import RETRY, PilotClient
from tests.relay import Relay

pytestmark = pytest.mark.django_db


@pytest.fixture
def outage_client(settings):
    settings.ROOT_URLCONF = "tests.wms.outage_urls"
    return Client(raise_request_exception=False)


@pytest.fixture
def broker_down(settings, bus_prefix):
    from wms import bus

    settings.CELERY_BROKER_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    bus.reset_connection()
    return settings.CELERY_BROKER_URL


def assert_unavailable(response, code):
    assert response.status_code == 503, response.content
    assert response["Content-Type"] == "application/json"
    assert json.loads(response.content) == {
        "error": code,
        "detail": f"The {'database' if code == 'database_unavailable' else 'message broker'} "
        "is unavailable; try again later.",
    }
    assert response["Retry-After"] == "10"


@pytest.mark.parametrize(
    ("method", "path"), [("get", "/api/test/database/"), ("post", "/api/test/drf-database/")]
)
def test_an_unreachable_database_answers_503_in_and_out_of_drf(outage_client, method, path):
    assert_unavailable(getattr(outage_client, method)(path), "database_unavailable")


@pytest.mark.parametrize(
    ("method", "path"), [("get", "/api/test/broker/"), ("post", "/api/test/drf-broker/")]
)
def test_an_unreachable_broker_answers_503_in_and_out_of_drf(
    outage_client, broker_down, method, path
):
    assert_unavailable(getattr(outage_client, method)(path), "broker_unavailable")


def test_the_retry_after_is_a_setting(outage_client, settings):
    settings.WMS_API_RETRY_AFTER = 42
    assert outage_client.get("/api/test/database/")["Retry-After"] == "42"


def test_a_bug_outside_drf_answers_500_json_without_its_text(outage_client):
    response = outage_client.get("/api/test/bug/")
    assert response.status_code == 500
    assert json.loads(response.content) == {
        "error": "internal_error",
        "detail": "Internal server error.",
    }


@pytest.mark.parametrize("path", ["/test/bug/", "/test/database/"])
def test_outside_api_django_keeps_its_500_page(outage_client, path):
    response = outage_client.get(path)
    assert response.status_code == 500
    assert response["Content-Type"].startswith("text/html")


def test_healthz_reports_database_and_broker(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_healthz_answers_503_when_the_broker_is_down(client, broker_down):
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "error",
        "database": "ok",
        "broker": "unavailable (OperationalError)",
    }
    assert response["Retry-After"] == "10"


# --- the web app under gunicorn, with its database behind a relay that can be cut -------------


@pytest.fixture
def live_web(tmp_path):
    """gunicorn (one sync worker) on the test database through a :class:`Relay`."""
    from django.conf import settings as django_settings

    db = django_settings.DATABASES["default"]
    relay = Relay(db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)).start()
    user = db.get("USER") or "postgres"
    auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else f"{user}@"
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{auth}127.0.0.1:{relay.port}/{db['NAME']}",
        "CELERY_BROKER_URL": django_settings.CELERY_BROKER_URL,
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": django_settings.SECRET_KEY,  # sessions made here are read there
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_SSL_REDIRECT": "false",  # plain HTTP here
        "WMS_KICKS_ENABLED": "false",
        "WMS_VAR_DIR": str(tmp_path),
        "WMS_API_MAX_BODY": "100000",
        "WMS_HEALTHZ_BROKER_TTL": "0",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "config.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--timeout",
            "60",
        ],
        env=env,
        cwd=str(Path(__file__).resolve().parents[2]),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "gunicorn.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            requests.get(url + "/healthz", timeout=30)
            break
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp_path / "gunicorn.log").read_text()) from None
            time.sleep(0.2)
    try:
        yield url, relay
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        relay.close()


def _callers(url: str):
    """Three callers, each as a real client makes its requests: a user with an API token, a
    user with a session cookie (read by a middleware before any view), a pilot."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    from pilots.services import pilot_register
    from tests.factories import UserFactory, api_token

    user: Any = UserFactory()
    _token, key = api_token(user)
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    pilot, pilot_token = pilot_register(hostname="wn.outage.example")
    return (
        pilot,
        pilot_token,
        {
            "token": lambda: requests.get(
                url + "/api/v1/tasks/", headers={"Authorization": f"Token {key}"}, timeout=30
            ),
            "session": lambda: requests.get(
                url + "/api/v1/tasks/", cookies={"sessionid": str(session.session_key)}, timeout=30
            ),
            "pilot": lambda: requests.post(
                url + f"/api/v1/pilots/{pilot.pk}/heartbeat/",
                json={"state": "idle", "status": "outage test"},
                headers={"Authorization": f"Pilot {pilot_token}"},
                timeout=30,
            ),
        },
    )


@pytest.mark.django_db(transaction=True)
def test_a_database_outage_answers_503_and_the_next_request_after_it_works(live_web):
    from django.db import connection

    from pilots.models import Pilot

    url, relay = live_web
    pilot, pilot_token, callers = _callers(url)
    for name, call in callers.items():
        assert call().status_code == 200, name
    beat = Pilot.objects.get(pk=pilot.pk).last_heartbeat

    relay.cut()  # the database goes away: its connections cut, nobody listening
    for name, call in callers.items():
        response = call()
        assert response.status_code == 503, (name, response.text)
        assert response.json()["error"] == "database_unavailable", name
        assert response.headers["Retry-After"] == "10"
    # The pilot agent's own client takes it as "retry later", not as a rejected call.
    agent = PilotClient(url, token=pilot_token, pilot_id=pilot.pk)
    result = agent.heartbeat({"state": "idle", "status": "outage"})
    assert (result.outcome, result.status, result.error) == (RETRY, 503, "database_unavailable")
    health = requests.get(url + "/healthz", timeout=30)
    assert health.status_code == 503
    assert health.json()["database"].startswith("unavailable")
    assert health.json()["broker"] == "ok"
    assert Pilot.objects.get(pk=pilot.pk).last_heartbeat == beat  # nothing written

    relay.restore()  # back on the same port
    for name, call in callers.items():
        assert call().status_code == 200, name
    assert requests.get(url + "/healthz", timeout=30).status_code == 200

    # A restart of Postgres: the server's persistent connection is killed under it; the next
    # request finds it dead (CONN_HEALTH_CHECKS) and opens a new one.
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert cur.fetchone()[0] >= 1
    for name, call in callers.items():
        assert call().status_code == 200, name


def _raw_post(url: str, head: str, body_parts: list[bytes]) -> bytes:
    """Send a request by hand (headers, then the body) and read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server may close before reading it all
                sock.sendall(head.encode())
                for part in body_parts:
                    sock.sendall(part)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
        sender.join(timeout=30)
    return answer


def _chunked(data: bytes, size: int = 8192) -> list[bytes]:
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return [*parts, b"0\r\n\r\n"]


@pytest.mark.django_db(transaction=True)
def test_bodies_over_the_limit_answer_413_chunked_or_not(live_web):
    from pilots.models import Pilot
    from pilots.services import pilot_register

    url, _relay = live_web
    pilot, token = pilot_register(hostname="wn.chunked.example")
    path = f"/api/v1/pilots/{pilot.pk}/heartbeat/"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Authorization: Pilot {token}\r\nContent-Type: application/json\r\n"
    )

    small = json.dumps({"state": "idle", "status": "chunked"}).encode()
    answer = _raw_post(url, head + "Transfer-Encoding: chunked\r\n\r\n", _chunked(small))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert Pilot.objects.get(pk=pilot.pk).status == "chunked"

    big = json.dumps({"state": "idle", "status": "x" * 150_000}).encode()
    answer = _raw_post(url, head + "Transfer-Encoding: chunked\r\n\r\n", _chunked(big))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"request_too_large"' in answer

    answer = _raw_post(url, head + "Content-Length: 1000000000\r\n\r\n", [])
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"request_too_large"' in answer
    assert Pilot.objects.get(pk=pilot.pk).status == "chunked"  # nothing written
