"""pilots.services on the real database: registration, tokens, termination."""

from __future__ import annotations

import hashlib

import pytest

from pilots.models import Pilot, PilotState
from pilots.services import (
    TOKEN_PREFIX,
    hash_token,
    pilot_register,
    pilot_revoke_token,
    pilot_terminate,
    pilot_transition,
)
from tests.factories import PilotFactory
from wms.exceptions import InvalidTransition, NotFound, ValidationFailed

pytestmark = pytest.mark.django_db


def test_hash_token_is_sha256_hex():
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()


def test_pilot_register_returns_the_token_once_and_stores_only_its_hash():
    pilot, token = pilot_register(
        hostname="wn001.example.org",
        device_type="gpu",
        site="SITE-A",
        cores=16,
        memory_mb=64000,
        gpus=2,
        slots=4,
        version="1.2.3",
    )

    stored = Pilot.objects.get(pk=pilot.pk)
    assert token.startswith(TOKEN_PREFIX) and len(token) > len(TOKEN_PREFIX) + 30
    assert stored.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert stored.token_revoked_at is None
    # the token itself is stored nowhere on the row
    row = Pilot.objects.filter(pk=pilot.pk).values().get()
    assert not [k for k, v in row.items() if isinstance(v, str) and token in v]
    assert not [k for k, v in row.items() if isinstance(v, str) and token[len(TOKEN_PREFIX) :] in v]
    assert stored.state == PilotState.REGISTERED
    assert (stored.hostname, stored.device_type, stored.site) == (
        "wn001.example.org",
        "gpu",
        "SITE-A",
    )
    assert (stored.cores, stored.memory_mb, stored.gpus, stored.slots) == (16, 64000, 2, 4)
    assert stored.version == "1.2.3"
    assert stored.started_at is not None and stored.last_heartbeat is not None
    assert Pilot.objects.filter(token_hash=hash_token(token)).get() == stored


def test_every_pilot_gets_its_own_token():
    tokens = [pilot_register(hostname=f"wn{i}")[1] for i in range(5)]
    assert len(set(tokens)) == 5
    assert Pilot.objects.filter(token_hash__in=[hash_token(t) for t in tokens]).count() == 5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hostname": "wn1", "device_type": "tpu"}, "device_type"),
        ({"hostname": ""}, "hostname"),
    ],
)
def test_pilot_register_refuses_bad_input_and_writes_nothing(kwargs, field):
    with pytest.raises(ValidationFailed) as info:
        pilot_register(**kwargs)
    assert set(info.value.detail) == {field}
    assert Pilot.objects.count() == 0


def test_pilot_revoke_token():
    pilot, token = pilot_register(hostname="wn1")
    other, other_token = pilot_register(hostname="wn2")

    pilot_revoke_token(pilot_id=pilot.pk)

    pilot.refresh_from_db()
    other.refresh_from_db()
    assert pilot.token_hash is None and pilot.token_revoked_at is not None
    assert not Pilot.objects.filter(token_hash=hash_token(token)).exists()
    assert other.token_hash == hash_token(other_token) and other.token_revoked_at is None
    # two revoked pilots do not clash on the unique token_hash
    pilot_revoke_token(pilot_id=other.pk)
    assert Pilot.objects.filter(token_hash__isnull=True).count() == 2


def test_pilot_revoke_token_missing_pilot():
    with pytest.raises(NotFound):
        pilot_revoke_token(pilot_id=987654)


@pytest.mark.parametrize(
    "state", [PilotState.REGISTERED, PilotState.IDLE, PilotState.BUSY, PilotState.DRAINING]
)
def test_pilot_terminate_from_a_live_state(state):
    pilot = PilotFactory(state=state)
    result = pilot_terminate(pilot_id=pilot.pk, source=f"pilot:{pilot.pk}", reason="shutdown")
    assert result.won and result.from_state == state
    pilot.refresh_from_db()
    assert pilot.state == PilotState.TERMINATED
    row = pilot.transitions.get()
    assert (row.from_state, row.to_state, row.source, row.reason) == (
        state,
        "terminated",
        f"pilot:{pilot.pk}",
        "shutdown",
    )


def test_pilot_terminate_twice_is_a_no_op():
    pilot = PilotFactory(state=PilotState.IDLE)
    assert pilot_terminate(pilot_id=pilot.pk, source="admin").won
    assert pilot_terminate(pilot_id=pilot.pk, source="admin").won is False
    assert pilot.transitions.count() == 1


def test_pilot_terminate_a_lost_pilot_is_refused():
    pilot = PilotFactory(state=PilotState.LOST)
    with pytest.raises(InvalidTransition):
        pilot_terminate(pilot_id=pilot.pk, source="admin")
    pilot.refresh_from_db()
    assert pilot.state == PilotState.LOST and not pilot.transitions.exists()


def test_pilot_terminate_missing_pilot():
    with pytest.raises(NotFound):
        pilot_terminate(pilot_id=987654, source="admin")


def test_pilot_transition_idle_busy_idle():
    pilot = PilotFactory(state=PilotState.REGISTERED)
    for target in (PilotState.IDLE, PilotState.BUSY, PilotState.IDLE):
        assert pilot_transition(pilot_id=pilot.pk, target=target, source="pilot").won
    assert list(pilot.transitions.values_list("to_state", flat=True)) == ["idle", "busy", "idle"]
