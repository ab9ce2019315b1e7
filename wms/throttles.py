"""The API's throttles (DRF) and the client address they and the login lockout key on.

Three scopes, each with its rate in ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` (settings from
the environment; an empty rate switches a scope off):

- ``user``: an authenticated user's calls, counted per user whatever their address;
- ``anon``: calls that no authenticator accepted, counted per client address;
- ``pilot`` (``pilots.throttles``): a pilot's calls, counted per pilot. A pilot's request is
  not a user's (``PilotPrincipal`` is anonymous-like) and must not count as anonymous either:
  every pilot of a site behind one NAT address would share one budget.

A throttled call answers 429 with ``Retry-After`` and the error body (``wms.api``). The counts
live in the ``default`` cache (``DJANGO_CACHE_URL``): per process with the local-memory cache,
shared by every process with a shared one (Redis, Memcached).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import throttling
from rest_framework.settings import api_settings


def client_ip(request: Any) -> str:
    """The client's address: ``REMOTE_ADDR``, or behind ``WMS_NUM_PROXIES`` reverse proxies the
    address the outermost of them appended to ``X-Forwarded-For`` (what the client itself
    puts there is not believed)."""
    meta = request.META
    proxies = getattr(settings, "WMS_NUM_PROXIES", 0)
    forwarded = meta.get("HTTP_X_FORWARDED_FOR", "")
    if proxies and forwarded:
        addrs = [a.strip() for a in forwarded.split(",") if a.strip()]
        if addrs:
            return addrs[-min(proxies, len(addrs))]
    return str(meta.get("REMOTE_ADDR") or "")


class ScopedRateThrottle(throttling.SimpleRateThrottle):
    """A throttle whose rate is read from the settings when it is made (per request), so that
    a changed setting (a test's override) applies without a restart."""

    def get_rate(self) -> str | None:
        rate = api_settings.DEFAULT_THROTTLE_RATES.get(self.scope or "")
        return str(rate) if rate else None

    def get_ident(self, request: Any) -> str:
        return client_ip(request)


class UserThrottle(ScopedRateThrottle):
    """Per authenticated user."""

    scope = "user"

    def get_cache_key(self, request: Any, view: Any) -> str | None:
        user = request.user
        if not (user and user.is_authenticated):
            return None
        return self.cache_format % {"scope": self.scope, "ident": user.pk}


class AnonThrottle(ScopedRateThrottle):
    """Per client address, for calls no authenticator accepted (not users, not pilots)."""

    scope = "anon"

    def get_cache_key(self, request: Any, view: Any) -> str | None:
        if getattr(request, "successful_authenticator", None) is not None:
            return None
        if request.user and request.user.is_authenticated:
            return None
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}
