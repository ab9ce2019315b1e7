"""Constraints of PILOT_DAT that the database enforces."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from pilots.models import Pilot
from pilots.services import hash_token
from tests.factories import PilotFactory

pytestmark = pytest.mark.django_db


def test_token_hash_is_unique():
    PilotFactory(token_hash=hash_token("secret"))
    with pytest.raises(IntegrityError), transaction.atomic():
        PilotFactory(token_hash=hash_token("secret"))
    assert Pilot.objects.filter(token_hash=hash_token("secret")).count() == 1


def test_many_pilots_may_have_no_token():
    for _ in range(3):
        PilotFactory(token_hash=None)
    assert Pilot.objects.filter(token_hash__isnull=True).count() == 3


def test_a_token_hash_cannot_be_copied_onto_another_pilot():
    a, b = PilotFactory(), PilotFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        Pilot.objects.filter(pk=b.pk).update(token_hash=a.token_hash)
    b.refresh_from_db()
    assert b.token_hash != a.token_hash
