"""Shared fixtures. The suite runs on the real Postgres named by DATABASE_URL (see README)."""

import tempfile
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from tests.factories import UserFactory


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    """Tests do not need PBKDF2's deliberate slowness (0.3 s per user)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _plain_http_test_client(settings):
    """The settings are production's (DEBUG off: HTTPS redirect, secure cookies, HSTS); the
    test client speaks plain HTTP, so the redirect is off here, and only here."""
    settings.SECURE_SSL_REDIRECT = False


@pytest.fixture(autouse=True)
def _fresh_throttle_counts():
    """The API's throttles count in the default (local-memory) cache: each test starts at 0."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(autouse=True)
def _no_kicks(settings):
    """In-process tests send no on-commit kicks to the real broker's control queue (they would
    pile up there: no worker of the test consumes them). End-to-end tests run real workers
    with their own control queue and turn kicks back on in the processes they start."""
    settings.WMS_KICKS_ENABLED = False


# The storage the suite's catalogue entries name (WMS_STORAGE_ROOTS): example locations, and
# the temporary directory where tests write real input files.
TEST_STORAGE_ROOTS = [
    "file:///data",
    "file:///x",
    "root://eos.example.org/data",
    Path(tempfile.gettempdir()).resolve().as_uri(),
]


# The output root of the in-process tests (nothing is written there: no pilot runs).
TEST_OUTPUT_ROOT = "file:///out"


@pytest.fixture(autouse=True)
def _storage_roots(settings):
    """Where the suite's inputs live is a deployment's choice: these tests name theirs."""
    settings.WMS_STORAGE_ROOTS = TEST_STORAGE_ROOTS
    settings.WMS_OUTPUT_ROOT = TEST_OUTPUT_ROOT


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def other_user(db):
    return UserFactory()


@pytest.fixture
def admin_user(db):
    return UserFactory(is_staff=True, is_superuser=True)


@pytest.fixture
def anon_client():
    return APIClient()


@pytest.fixture
def api_client(user):
    client = APIClient()
    client.force_authenticate(user=user)
    return client


@pytest.fixture
def token_client(db):
    """``token_client(user)`` → an APIClient speaking with a new API token of ``user``
    (``Authorization: Token <key>``); ``client.api_token`` is the row, ``client.key`` the key."""
    from tests.factories import api_token

    def _make(user, **kwargs):
        token, key = api_token(user, **kwargs)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        client.api_token, client.key = token, key
        return client

    return _make


@pytest.fixture
def admin_client_logged(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def bus_prefix(settings):
    """A RabbitMQ namespace of this test alone: its own exchange/queue prefix, deleted after.

    The broker is the real one named by CELERY_BROKER_URL (RabbitMQ in the test command).
    """
    import uuid

    from wms import bus

    prefix = f"wmstest.{uuid.uuid4().hex[:10]}"
    broker_url = settings.CELERY_BROKER_URL
    settings.WMS_BUS_PREFIX = prefix
    bus.reset_connection()
    yield prefix
    settings.CELERY_BROKER_URL = broker_url  # a test may have pointed it elsewhere
    settings.WMS_BUS_PREFIX = prefix
    bus.reset_connection()
    conn = bus.new_connection()
    try:
        bus.topology().delete(conn, pilot_ids=bus.declared_command_queues(prefix))
    finally:
        conn.release()
        bus.reset_connection()


@pytest.fixture
def drain_queue():
    """Read every message of a queue (without consuming others): returns decoded bodies."""
    import json

    from wms import bus

    def _drain(device_type: str, *, limit: int = 100_000) -> list[tuple[dict, int | None]]:
        out: list[tuple[dict, int | None]] = []
        conn = bus.new_connection()
        try:
            queue = bus.topology().job_queue(device_type)(conn.default_channel)
            while len(out) < limit:
                msg = queue.get(no_ack=True)
                if msg is None:
                    break
                out.append((json.loads(msg.body), msg.properties.get("priority")))
        finally:
            conn.release()
        return out

    return _drain


# --- the pilot protocol (docs/pilot-api.md) -----------------------------------------------------


@pytest.fixture
def make_pilot(db):
    """``make_pilot(**registration)`` → (pilot, APIClient speaking with the pilot's own token)."""
    from pilots.services import pilot_register

    def _make(**kwargs):
        kwargs.setdefault("hostname", "wn.test.example.org")
        pilot, token = pilot_register(**kwargs)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Pilot {token}")
        client.token = token
        return pilot, client

    return _make


@pytest.fixture
def output_task(db, user):
    """A task made by ``task_create``: it has an output dataset in the (local) DSM."""
    from tasks.create import task_create
    from tasks.models import Task
    from tests.factories import DatasetFactory

    task = task_create(
        owner=user,
        executable="wms-payload-map",
        data_in_uid=DatasetFactory().uid,
        name="reco",
        max_retries=2,
    )
    # the tests' reports name files under file:///out (as TaskFactory's tasks have it)
    Task.objects.filter(pk=task.pk).update(data_out_url=TEST_OUTPUT_ROOT)
    task.data_out_url = TEST_OUTPUT_ROOT
    return task


@pytest.fixture
def read_commands():
    """``read_commands(pilot_id)``: every message in a pilot's command queue, decoded (none
    when the queue does not exist), consumed."""
    import json

    from wms import bus

    def _read(pilot_id: int) -> list[dict]:
        conn = bus.new_connection()
        out = []
        try:
            queue = bus.topology().command_queue(pilot_id)(conn.default_channel)
            try:
                queue.queue_declare(passive=True)
            except conn.channel_errors:
                return []
            while (msg := queue.get(no_ack=True)) is not None:
                out.append(json.loads(msg.body))
        finally:
            conn.release()
        return out

    return _read
