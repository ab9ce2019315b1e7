"""Writes that belong to no single app (accounts for operators)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import transaction


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
