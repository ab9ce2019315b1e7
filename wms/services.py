"""Writes that belong to no single app: the accounts of local services (an app's own account
is made by that app: ``pilots.services.pilot_registrar_ensure``), and users' API tokens."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from wms.exceptions import NotFound, ValidationFailed
from wms.models import ApiToken


def service_account_ensure(username: str) -> tuple[Any, bool]:
    """An active account nobody logs into with a password (it acts through its API token)."""
    user_model = get_user_model()
    user, created = user_model.objects.get_or_create(
        username=username, defaults={"email": f"{username}@localhost"}
    )
    if created:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    return user, created


# --- users' API tokens (docs/security.md) --------------------------------------------------------

API_TOKEN_KEY_PREFIX = "wmsu_"  # noqa: S105 - a marker of our keys, not a secret
API_TOKEN_SHOWN_PREFIX = 12  # characters of the key kept in clear to recognise it: "wmsu_" + 7
API_TOKEN_TOUCH_EVERY = timedelta(seconds=60)  # last_used_at is written at most this often


def api_token_hash(key: str | bytes) -> str:
    """The sha256 of a key, as stored in ``ApiToken.key_hash``."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


@transaction.atomic
def api_token_create(
    *, user: Any, name: str, expires_at: datetime | None = None
) -> tuple[ApiToken, str]:
    """A new API token of ``user``; returns it with its key, which is shown this once (only
    its sha256 is stored). ``expires_at`` None: it never expires."""
    name = (name or "").strip()
    errors: dict[str, list[str]] = {}
    if not name:
        errors["name"] = ["A token needs a name (what it is for)."]
    elif len(name) > 100:
        errors["name"] = ["At most 100 characters."]
    if expires_at is not None and expires_at <= timezone.now():
        errors["expires_at"] = ["The expiry must lie in the future."]
    if not user.is_active:
        errors["user"] = ["The user is not active."]
    if errors:
        raise ValidationFailed(errors)
    key = API_TOKEN_KEY_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user,
        name=name,
        prefix=key[:API_TOKEN_SHOWN_PREFIX],
        key_hash=api_token_hash(key),
        expires_at=expires_at,
    )
    return token, key


def api_token_revoke(*, token_id: int, user: Any = None) -> bool:
    """Revoke a token: its next request is refused (401). ``user``: only if it is theirs
    (another user's token is "not found"). Returns False when it was revoked already."""
    tokens = ApiToken.objects.filter(pk=token_id)
    if user is not None:
        tokens = tokens.filter(user=user)
    if not tokens.exists():
        raise NotFound(f"No API token {token_id}.")
    return bool(tokens.filter(revoked_at__isnull=True).update(revoked_at=timezone.now()))


def api_token_touch(*, token: ApiToken, now: datetime | None = None) -> bool:
    """Record that ``token`` was used, at most once per ``API_TOKEN_TOUCH_EVERY``: a request
    whose token was marked less than a minute ago writes nothing. One conditional UPDATE, so
    that concurrent requests write it once."""
    now = now or timezone.now()
    if token.last_used_at is not None and now - token.last_used_at < API_TOKEN_TOUCH_EVERY:
        return False
    fresh = Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - API_TOKEN_TOUCH_EVERY)
    won = bool(ApiToken.objects.filter(fresh, pk=token.pk).update(last_used_at=now))
    if won:
        token.last_used_at = now
    return won
