"""Shared fixtures. The suite runs on the real Postgres named by DATABASE_URL (see README)."""

import pytest
from rest_framework.test import APIClient

from tests.factories import UserFactory


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    """Tests do not need PBKDF2's deliberate slowness (0.3 s per user)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


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
        bus.topology().delete(conn)
    finally:
        conn.release()
        bus.reset_connection()


@pytest.fixture
def drain_queue():
    """Read every message of a queue (without consuming others): returns decoded bodies."""
    import json

    from wms import bus

    def _drain(device_type: str, *, limit: int = 100_000) -> list[tuple[dict, int | None]]:
        out = []
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
