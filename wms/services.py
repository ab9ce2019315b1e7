"""Writes that belong to no single app: the accounts of operators and of local services."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission, User
from django.contrib.contenttypes.models import ContentType
from django.db import transaction

PILOT_REGISTRAR = "pilot-registrar"
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


def _service_account(username: str) -> tuple[Any, bool]:
    """An active account nobody logs into with a password (it acts through its API token)."""
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(
        username=username, defaults={"email": f"{username}@localhost"}
    )
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user, created


@transaction.atomic
def pilot_registrar_ensure(*, username: str = PILOT_REGISTRAR) -> str:
    """Make sure the account local pilots register with exists, may add pilots
    (``pilots.add_pilot``, see docs/pilot-api.md) and has a DRF token; return the token key.

    Idempotent: a second call returns the same token. The account is not staff and has no
    usable password.
    """
    from rest_framework.authtoken.models import Token

    from pilots.models import Pilot

    user, _created = _service_account(username)
    permission, _ = Permission.objects.get_or_create(
        codename="add_pilot",
        content_type=ContentType.objects.get_for_model(Pilot),
        defaults={"name": "Can add pilot"},
    )
    user.user_permissions.add(permission)
    token, _ = Token.objects.get_or_create(user=user)
    return token.key


@transaction.atomic
def demo_operator_ensure(*, username: str = DEMO_OPERATOR) -> User:
    """The (non-staff) account that owns the demo's tasks; staff operators see them too."""
    user, _created = _service_account(username)
    return user
