"""The accounts of development tooling: the first operator of a fresh development database
and the demo's owner."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction

from wms.services import service_account_ensure

DEMO_OPERATOR = "demo"


@transaction.atomic
def dev_operator_ensure(*, username: str = "admin", password: str = "admin") -> bool:  # noqa: S107 - dev only
    """Create a superuser for development when the database has no user at all.

    Returns True when the account was created. Callers check DEBUG first.
    """
    user_model = get_user_model()
    if user_model.objects.exists():
        return False
    user_model.objects.create_superuser(username, f"{username}@localhost", password)
    return True


@transaction.atomic
def demo_operator_ensure(*, username: str = DEMO_OPERATOR) -> User:
    """The (non-staff) account that owns the demo's tasks; staff operators see them too."""
    user, _created = service_account_ensure(username)
    return user
