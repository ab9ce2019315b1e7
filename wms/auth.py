"""How users authenticate with an API token: ``Authorization: Token <key>`` (docs/security.md).

The key's sha256 is looked up (``ApiToken.key_hash``, unique) with its user in one statement;
an unknown, revoked or expired token, or one of an inactive user, answers 401. A token's
``last_used_at`` is written at most once a minute (``api_token_touch``), not on every request.
"""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from rest_framework import authentication, exceptions

from wms.models import ApiToken
from wms.services import api_token_hash, api_token_touch


class ApiTokenAuthentication(authentication.TokenAuthentication):
    """``Authorization: Token <key>`` → ``request.user`` is the token's user, ``request.auth``
    the :class:`ApiToken`."""

    keyword = "Token"

    def authenticate_credentials(self, key: str) -> tuple[Any, ApiToken]:
        token = ApiToken.objects.select_related("user").filter(key_hash=api_token_hash(key)).first()
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        now = timezone.now()
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("This token was revoked.")
        if token.expires_at is not None and token.expires_at <= now:
            raise exceptions.AuthenticationFailed("This token has expired.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        api_token_touch(token=token, now=now)
        return token.user, token
