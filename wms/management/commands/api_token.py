"""``manage.py api_token``: users' API tokens (stored hashed; the key is printed once).

    manage.py api_token create alice --name laptop --expires-in 30d   # prints the key, once
    manage.py api_token list [alice]
    manage.py api_token revoke 12 [13 ...]
    manage.py api_token revoke --user alice                           # every token of alice

``create`` prints the key alone on standard output (a script can capture it); everything else
goes to standard error. ``--expires-in`` takes days (``30`` or ``30d``), hours (``12h``) or
minutes (``90m``); without it the token never expires.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from wms.exceptions import WMSError
from wms.models import ApiToken
from wms.services import api_token_create, api_token_revoke

_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_duration(text: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d+)\s*([dhm]?)\s*", text or "")
    if not match or int(match.group(1)) <= 0:
        raise CommandError(f"--expires-in: expected e.g. 30d, 12h or 90m, not {text!r}")
    return timedelta(**{_UNITS[match.group(2) or "d"]: int(match.group(1))})


def _user(username: str) -> Any:
    try:
        return get_user_model().objects.get_by_natural_key(username)
    except get_user_model().DoesNotExist:
        raise CommandError(f"no user {username!r}") from None


class Command(BaseCommand):
    help = "Create (the key printed once), list or revoke users' API tokens."

    def add_arguments(self, parser: Any) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="a new token of USERNAME; prints its key once")
        create.add_argument("username")
        create.add_argument("--name", default="command line", help="what the token is for")
        create.add_argument(
            "--expires-in", default=None, help="30d, 12h, 90m (default: never expires)"
        )
        listing = sub.add_parser("list", help="tokens (no secrets), of USERNAME or everyone")
        listing.add_argument("username", nargs="?")
        revoke = sub.add_parser("revoke", help="revoke tokens by id, or every token of --user")
        revoke.add_argument("ids", nargs="*", type=int)
        revoke.add_argument("--user", default=None, help="revoke every token of this user")

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        getattr(self, f"_{action}")(**options)

    def _create(self, *, username: str, name: str, expires_in: str | None, **_: Any) -> None:
        user = _user(username)
        expires_at = timezone.now() + parse_duration(expires_in) if expires_in else None
        try:
            token, key = api_token_create(user=user, name=name, expires_at=expires_at)
        except WMSError as exc:
            raise CommandError(str(exc.detail)) from exc
        until = f"expires {token.expires_at.isoformat()}" if token.expires_at else "never expires"
        self.stderr.write(
            f"token {token.pk} {token.name!r} of {username} ({until}); its key, shown this once:"
        )
        self.stdout.write(key)

    def _list(self, *, username: str | None, **_: Any) -> None:
        tokens = ApiToken.objects.select_related("user").order_by("user__username", "-id")
        if username:
            tokens = tokens.filter(user=_user(username))
        for t in tokens:
            status = "revoked" if t.revoked_at else "active" if t.is_active() else "expired"
            self.stdout.write(
                f"{t.pk}\t{t.user.get_username()}\t{t.prefix}…\t{status}\t{t.name}\t"
                f"expires={t.expires_at.isoformat() if t.expires_at else 'never'}\t"
                f"last_used={t.last_used_at.isoformat() if t.last_used_at else 'never'}"
            )

    def _revoke(self, *, ids: list[int], user: str | None, **_: Any) -> None:
        if bool(ids) == bool(user):
            raise CommandError("revoke: give token ids or --user, not both")
        if user:
            ids = list(
                ApiToken.objects.filter(user=_user(user), revoked_at__isnull=True).values_list(
                    "id", flat=True
                )
            )
        for token_id in ids:
            try:
                changed = api_token_revoke(token_id=token_id)
            except WMSError as exc:
                raise CommandError(str(exc.detail)) from exc
            self.stdout.write(f"token {token_id}: {'revoked' if changed else 'already revoked'}")
