"""How pilots authenticate (docs/pilot-api.md): ``Authorization: Pilot <token>``.

Only the token's sha256 is stored (``Pilot.token_hash``, unique): a request costs one hash and
one indexed lookup (:func:`pilot_by_token_hash`), whatever the token. The row is read on every
request, so a revoked token is refused at once. A call with an ``Idempotency-Key`` reads the
answer remembered for it in the same statement (``wms.idempotency``: one statement fewer).
A revoked token (its hash cleared) or an unknown one answers 401. The authenticated request
carries the pilot in
``request.auth`` and a :class:`PilotPrincipal` in ``request.user``: an anonymous-like user, so
every user endpoint (``IsAuthenticated``) refuses a pilot, and a user's token never passes
:class:`IsPilot`.

On the bus a pilot signs its status events with its **bus key** (``wms.contract.event_headers``),
returned with its token by the registration. The key is not stored: it is derived from the
server's ``SECRET_KEY``, the pilot's id and its token's hash (:func:`pilot_bus_key`), so it
dies with the token (revoked, or replaced by a new registration) and only the pilot and the
server know it. The events consumer reads the keys of a batch's pilots with one query
(:func:`pilot_bus_keys`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import weakref
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import connection, connections
from django.utils.crypto import salted_hmac
from rest_framework import authentication, exceptions, permissions

from pilots.models import Pilot
from pilots.services import TOKEN_PREFIX
from wms.idempotency import (
    prefetched,
    remembered_columns,
    remembered_join_sql,
    request_key,
)

KEYWORD = "Pilot"
BUS_KEY_SALT = "wms.pilots.auth.bus-events"


class PilotPrincipal(AnonymousUser):
    """``request.user`` of a pilot's request: not a user (``is_authenticated`` is False)."""

    def __init__(self, pilot: Pilot) -> None:
        super().__init__()
        self.pilot = pilot

    def __str__(self) -> str:
        return f"pilot:{self.pilot.pk}"

    def get_username(self) -> str:
        return str(self)


class PilotTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Pilot <token>`` → ``request.auth`` is the :class:`Pilot`."""

    def authenticate(self, request: Any) -> tuple[PilotPrincipal, Pilot] | None:
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != KEYWORD.lower().encode():
            return None  # not a pilot's request: the other authenticators may take it
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid pilot token header: expected 'Pilot <token>'."
            )
        digest = hashlib.sha256(header[1]).hexdigest()
        key = request_key(request)
        if key is None:
            pilot = pilot_by_token_hash(digest)
        else:
            pilot, remembered = _pilot_and_answer(digest, key)
            if pilot is not None:
                prefetched(request, scope=pilot_scope_of(pilot.pk), key=key, row=remembered)
        if pilot is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked pilot token.")
        return PilotPrincipal(pilot), pilot

    def authenticate_header(self, request: Any) -> str:
        return KEYWORD


SCOPE_PREFIX = "pilot:"


def pilot_scope_of(pilot_id: int) -> str:
    """Whose idempotency keys a pilot's call is compared with: its own (``pilot:<id>``)."""
    return f"{SCOPE_PREFIX}{pilot_id}"


@functools.cache
def _token_lookup_sql(vendor: str, with_answer: bool = False) -> str:
    """The lookup's statement, built once per process (``vendor`` keys it: the quoting is
    the backend's). ``with_answer``: the answer remembered for the call's idempotency key
    joined (``wms.idempotency.remembered_join_sql``; the key is the first parameter)."""
    meta = Pilot._meta
    qn = connection.ops.quote_name
    table = qn(meta.db_table)
    columns = ", ".join(f"{table}.{qn(f.column or f.name)}" for f in meta.concrete_fields)
    where = f"WHERE {table}.{qn('token_hash')} = %s"
    if not with_answer:
        return f"SELECT {columns} FROM {table} {where}"  # noqa: S608
    scope = f"'{SCOPE_PREFIX}' || {table}.{qn('id')}"
    return (
        f"SELECT {columns}, {remembered_columns()} FROM {table} "  # noqa: S608
        f"{remembered_join_sql(vendor, scope)} {where}"
    )


_CONVERTERS: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


def _pilot_from_row(row: tuple[Any, ...]) -> Pilot:
    """The row as ``Pilot.objects.get()`` would return it (the ORM's converters, found once
    per connection)."""
    meta = Pilot._meta
    fields = meta.concrete_fields
    wrapper = connections[connection.alias]  # this thread's connection (not the proxy)
    converters = _CONVERTERS.get(wrapper)
    if converters is None:
        compiler = Pilot._default_manager.all().query.get_compiler(connection.alias)
        converters = compiler.get_converters([f.get_col(meta.db_table) for f in fields])
        _CONVERTERS[wrapper] = converters
    if converters:
        values = list(row)
        for pos, (functions, expression) in converters.items():
            value = values[pos]
            for convert in functions:
                value = convert(value, expression, connection)
            values[pos] = value
        row = tuple(values)
    return Pilot.from_db(connection.alias, [f.attname for f in fields], row)


def pilot_by_token_hash(digest: str) -> Pilot | None:
    """The pilot whose token hashes to ``digest`` (unique), read on every pilot request, as
    ``Pilot.objects.get(token_hash=digest)`` would return it, or None. The statement is
    built once per process rather than compiled by the ORM each time (half the CPU of the
    lookup); the row is still read every time, so a revoked token is refused at once."""
    with connection.cursor() as cursor:
        cursor.execute(_token_lookup_sql(connection.vendor), [digest])
        row = cursor.fetchone()
    return None if row is None else _pilot_from_row(row)


def _pilot_and_answer(digest: str, key: str) -> tuple[Pilot | None, tuple[Any, ...]]:
    """:func:`pilot_by_token_hash` and, in the same statement, the answer remembered for the
    call's idempotency ``key`` in the pilot's scope (three NULLs if none)."""
    with connection.cursor() as cursor:
        cursor.execute(_token_lookup_sql(connection.vendor, True), [key, digest])
        row = cursor.fetchone()
    if row is None:
        return None, ()
    n = len(Pilot._meta.concrete_fields)
    return _pilot_from_row(row[:n]), row[n:]


def pilot_bus_key(*, pilot_id: int, token_hash: str, secret: str | None = None) -> str:
    """The key a pilot signs its bus events with: HMAC-SHA256 keyed by the server's secret
    (``SECRET_KEY``, or ``secret``) of the pilot's id and token hash, in hex."""
    return salted_hmac(
        BUS_KEY_SALT, f"{pilot_id}|{token_hash}", secret=secret, algorithm="sha256"
    ).hexdigest()


REGISTRATION_TOKEN_SALT = "wms.pilots.auth.registration-token"  # noqa: S105 - a salt


def registration_token(*, scope: str, key: str) -> str:
    """The token of the pilot registered by the call ``key`` of ``scope`` (its registering
    user): HMAC-SHA256 of the server's ``SECRET_KEY``. A registration sent again with the same
    key gets the same token back without the token being stored anywhere (the stored answer
    has none: :func:`registration_stored`, :func:`registration_replayed`)."""
    digest = salted_hmac(REGISTRATION_TOKEN_SALT, f"{scope}|{key}", algorithm="sha256")
    return TOKEN_PREFIX + base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


def pilot_bus_keys(pilot_ids: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """The bus keys of these pilots, with one query: a pilot whose token was revoked, or that
    does not exist, has none (its events are refused). Keys derived from the
    ``SECRET_KEY_FALLBACKS`` follow the current one, so that rotating the secret leaves
    running pilots a grace period."""
    ids = set(pilot_ids)
    if not ids:
        return {}
    secrets = (settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ()))
    return {
        pk: tuple(_bus_key(pk, digest, s) for s in secrets)
        for pk, digest in Pilot.objects.filter(pk__in=ids, token_hash__isnull=False).values_list(
            "pk", "token_hash"
        )
    }


@functools.lru_cache(maxsize=4096)
def _bus_key(pilot_id: int, token_hash: str, secret: str) -> str:
    """:func:`pilot_bus_key`, remembered: a consumer sees the same pilots batch after batch.
    The token hash is part of the cache key: a revoked or new token is never served an old
    key (and the lookup that yields the hash runs for every batch)."""
    return pilot_bus_key(pilot_id=pilot_id, token_hash=token_hash, secret=secret)


def request_pilot(request: Any) -> Pilot:
    """The pilot of a request that passed :class:`IsPilot`."""
    pilot = request.auth
    if not isinstance(pilot, Pilot):  # pragma: no cover - IsPilot guarantees it
        raise exceptions.NotAuthenticated()
    return pilot


class IsPilot(permissions.BasePermission):
    """Only a pilot's own token, and only for its own pilot id (``pilot_id`` in the URL).

    What a pilot may do with a job (report only on its own attempts) is checked by the
    services, which know the attempt's pilot.
    """

    message = "This pilot may not act on another pilot."

    def has_permission(self, request: Any, view: Any) -> bool:
        pilot = request.auth
        if not isinstance(pilot, Pilot) or not isinstance(request.user, PilotPrincipal):
            if request.successful_authenticator is None:
                raise exceptions.NotAuthenticated(
                    "Pilot calls need 'Authorization: Pilot <token>'."
                )
            return False
        url_pilot = view.kwargs.get("pilot_id")
        return url_pilot is None or int(url_pilot) == pilot.pk


class CanRegisterPilots(permissions.BasePermission):
    """A user (not a pilot) allowed to add pilots: ``pilots.add_pilot``, staff or superuser."""

    message = "Registering pilots needs the permission 'pilots.add_pilot'."

    def has_permission(self, request: Any, view: Any) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return bool(user.is_staff or user.has_perm("pilots.add_pilot"))
