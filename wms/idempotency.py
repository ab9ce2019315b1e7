"""Idempotency keys: a call sent again gets the same answer and changes nothing a second time
(docs/pilot-api.md, "Retries and idempotency keys").

A client names each logical call with an ``Idempotency-Key`` header (a uuid4, made once and
sent again with every retry of that call). A view method wrapped with :func:`idempotent`:

- without the header, runs as before;
- with a malformed key (not 8 to 64 of ``A-Z a-z 0-9 _ . : -``): **400**
  ``invalid_idempotency_key``;
- looks the key up (one indexed read): if it is stored, the stored answer is sent again
  (status and JSON body), with the header ``Idempotent-Replayed: true``, and the call is not
  run; if the stored call was another one (method, path or body differ, compared by sha256):
  **422** ``idempotency_key_reused``;
- else runs the view's ``prepare`` step, if it has one (work that must not run in a
  transaction, such as a report's registration in the DSM; idempotent by itself), then the
  call in a transaction and, if it succeeded (2xx), inserts the answer keyed by
  (scope, key) **in the same transaction**: the change and its record commit together or not
  at all. A refusal (other 4xx) changed nothing: its answer is stored after the rollback
  (except a refusal that keeps its change, ``WMSError.keeps_changes``: the change and the
  answer commit together, as for a success). 5xx
  (outages answer 503), 429 and 401/403 (the authentication runs before the view) are not
  stored: they are answered afresh when the call is sent again.

So a call costs one indexed read and one INSERT (``ON CONFLICT DO NOTHING``), plus the
savepoint the service's own transaction becomes (none for a service that joins its
caller's transaction, such as the heartbeat). An authentication that reads the caller's row
anyway may do the read in the same statement (:func:`remembered_join_sql`, the pilots').
Two copies of one call at the same time both pass the read; the second one's INSERT waits
on the first one's uncommitted row (the
unique index), then finds it: the second copy's work is rolled back and it answers the
first one's answer (so does a second copy that fails on a unique row the first one made,
e.g. a pilot's token). If the first copy rolled back, the second goes on as a first call.
``scope`` separates callers (``pilot:<id>``, ``user:<id>``): a key is only ever compared
with the same caller's keys.

Rows live ``WMS_IDEMPOTENCY_TTL`` seconds: :func:`idempotency_keys_purge`, run by beat.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, connection, transaction
from django.http.request import RawPostDataException
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.response import Response

from wms.exceptions import Conflict, ValidationFailed, WMSError
from wms.models import IdempotentRequest

log = structlog.get_logger(__name__)

HEADER = "Idempotency-Key"
META_KEY = "HTTP_IDEMPOTENCY_KEY"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{8,64}\Z")
PURGE_BATCH = 10_000


class IdempotencyKeyInvalid(ValidationFailed):
    code = "invalid_idempotency_key"
    default_detail = "The Idempotency-Key header must be 8 to 64 of A-Z a-z 0-9 _ . : -"


class IdempotencyKeyReused(WMSError):
    code = "idempotency_key_reused"
    status = 422
    default_detail = "This Idempotency-Key was already used for another call."


class IdempotencyKeyInFlight(Conflict):
    code = "idempotency_key_in_flight"
    default_detail = "A call with this Idempotency-Key is still being answered; try again."


class _AlreadyAnswered(Exception):
    """Raised inside the transaction to roll a retried call's work back."""


def storable(status: int) -> bool:
    """Answers worth replaying: 2xx and the refusals (4xx), but not 429 (a throttle) and not
    401/403/5xx (the caller's credentials or the server's health may differ next time)."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (401, 403, 429))


def _fingerprint(request: Request) -> str:
    try:
        body = request._request.body
    except RawPostDataException:  # the body was already parsed: its canonical JSON then
        body = json.dumps(request.data, sort_keys=True, cls=DjangoJSONEncoder).encode()
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    digest.update(body)
    return digest.hexdigest()


@functools.cache
def _insert_sql(vendor: str) -> str:
    qn = connection.ops.quote_name
    table = qn(IdempotentRequest._meta.db_table)
    columns = ", ".join(
        qn(c) for c in ("scope", "key", "fingerprint", "status", "body", "created_at")
    )
    return (
        f"INSERT INTO {table} ({columns}) VALUES (%s, %s, %s, %s, %s, %s) "  # noqa: S608
        f"ON CONFLICT ({qn('scope')}, {qn('key')}) DO NOTHING RETURNING {qn('id')}"
    )


Hook = Callable[[Request, Any], Any]


def _remember(
    scope: str, key: str, fingerprint: str, response: Response, stored: Hook | None, request: Any
) -> bool:
    """Store the answer; False if the key was there already (nothing written)."""
    data = response.data
    if stored is not None and 200 <= response.status_code < 300:
        data = stored(request, data)
    body = json.dumps(data, cls=DjangoJSONEncoder, separators=(",", ":"))
    with connection.cursor() as cursor:
        cursor.execute(
            _insert_sql(connection.vendor),
            [scope, key, fingerprint, response.status_code, body, timezone.now()],
        )
        return cursor.fetchone() is not None


@functools.cache
def _lookup_sql(vendor: str) -> str:
    qn = connection.ops.quote_name
    table = qn(IdempotentRequest._meta.db_table)
    return (
        f"SELECT {qn('fingerprint')}, {qn('status')}, {qn('body')} FROM {table} "  # noqa: S608
        f"WHERE {qn('scope')} = %s AND {qn('key')} = %s"
    )


def _lookup(scope: str, key: str) -> tuple[str, int, str] | None:
    """The remembered answer of this key (one indexed read), or None."""
    with connection.cursor() as cursor:
        cursor.execute(_lookup_sql(connection.vendor), [scope, key])
        return cursor.fetchone()


# --- the lookup done by the authentication ------------------------------------------------------

_PREFETCHED = "_wms_idempotency_prefetched"
REMEMBERED_ALIAS = "wms_idem"


@functools.cache
def remembered_join_sql(vendor: str, scope_sql: str) -> str:
    """``LEFT JOIN`` of the remembered answer to a caller's own row, for an authentication
    that reads that row anyway (``pilots.auth``): ``scope_sql`` is the SQL of the caller's
    scope in terms of that row; the one parameter is the key. Its columns are
    :data:`REMEMBERED_COLUMNS` (NULLs when the key is not stored). The read and the wrapper's
    own (:func:`_lookup`) are the same read, at the same moment (before the call's
    transaction): one statement fewer."""
    qn = connection.ops.quote_name
    table = qn(IdempotentRequest._meta.db_table)
    alias = qn(REMEMBERED_ALIAS)
    return (
        f"LEFT JOIN {table} AS {alias} ON {alias}.{qn('scope')} = {scope_sql} "
        f"AND {alias}.{qn('key')} = %s"
    )


def remembered_columns() -> str:
    qn = connection.ops.quote_name
    alias = qn(REMEMBERED_ALIAS)
    return ", ".join(f"{alias}.{qn(c)}" for c in ("fingerprint", "status", "body"))


def prefetched(request: Any, *, scope: str, key: str, row: Sequence[Any]) -> None:
    """Hand the wrapper the lookup of ``key`` for ``scope`` done with the authentication:
    ``row`` is the three :func:`remembered_columns` (all None: not stored)."""
    fingerprint, status, body = row
    found = None if fingerprint is None else (fingerprint, int(status), body)
    setattr(_http_request(request), _PREFETCHED, (scope, key, found))


def _http_request(request: Any) -> Any:
    return getattr(request, "_request", request)


def _lookup_once(request: Any, scope: str, key: str) -> tuple[str, int, str] | None:
    """:func:`_lookup`, or what the authentication read for this very scope and key."""
    done = getattr(_http_request(request), _PREFETCHED, None)
    if done is not None and done[0] == scope and done[1] == key:
        return done[2]  # type: ignore[no-any-return]
    return _lookup(scope, key)


def _replay(
    scope: str,
    key: str,
    fingerprint: str,
    replayed: Hook | None,
    request: Any,
    row: tuple[str, int, str] | None = None,
) -> Response:
    row = row or _lookup(scope, key)
    if row is None:  # purged between the INSERT and this read: a very old key
        raise IdempotencyKeyInFlight()
    stored_fingerprint, status, body = row
    if stored_fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    log.info("idempotent_replay", scope=scope, key=key, status=status)
    data = json.loads(body)
    if replayed is not None and 200 <= status < 300:
        data = replayed(request, data)
    return Response(data, status=status, headers={REPLAYED_HEADER: "true"})


def request_key(request: Request) -> str | None:
    """The request's idempotency key if it has a well-formed one (else None)."""
    key = request.META.get(META_KEY)
    return key if key is not None and KEY_PATTERN.match(key) else None


def idempotent(
    scope: Callable[[Request], str],
    *,
    stored: Hook | None = None,
    replayed: Hook | None = None,
    prepare: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Wrap a DRF view's handler (``post``): see the module's text. ``scope(request)`` names
    the caller (called after authentication). A success's body is stored as
    ``stored(request, data)`` and replayed as ``replayed(request, stored data)``: an answer
    holding a secret stores it without, and the replay puts it back (a secret is never
    stored in clear).

    ``prepare(view, request, *args, **kwargs)``, when given, is the call's work that must not
    run in a transaction (a call to another service, such as the DSM: idempotent by itself);
    it runs before the transaction (after the lookup: a replayed call does not run it), and
    its result reaches the handler as the keyword ``prepared``. What it raises is answered as
    a refusal of the handler would be."""

    def decorate(handler: Callable[..., Response]) -> Callable[..., Response]:
        @functools.wraps(handler)
        def wrapper(view: Any, request: Request, *args: Any, **kwargs: Any) -> Response:
            key = request.META.get(META_KEY)
            if key is None:
                if prepare is not None:
                    kwargs["prepared"] = prepare(view, request, *args, **kwargs)
                return handler(view, request, *args, **kwargs)
            if not KEY_PATTERN.match(key):
                raise IdempotencyKeyInvalid()
            who = scope(request)
            fingerprint = _fingerprint(request)
            row = _lookup_once(request, who, key)
            if row is not None:  # answered before: the same answer, the call is not run
                return _replay(who, key, fingerprint, replayed, request, row)
            try:
                if prepare is not None:
                    kwargs["prepared"] = prepare(view, request, *args, **kwargs)
                with transaction.atomic():
                    try:
                        response = handler(view, request, *args, **kwargs)
                    except WMSError as exc:
                        if not exc.keeps_changes:
                            raise
                        # a refusal whose change stays: committed with its stored answer
                        response = view.handle_exception(exc)
                    if storable(response.status_code) and not _remember(
                        who, key, fingerprint, response, stored, request
                    ):
                        raise _AlreadyAnswered()
            except _AlreadyAnswered:
                return _replay(who, key, fingerprint, replayed, request)
            except IntegrityError:
                # a copy of this call, run at the same time, committed what this one would
                # have created (a unique row): its answer, if stored, is this one's too
                if _lookup(who, key) is not None:
                    return _replay(who, key, fingerprint, replayed, request)
                raise
            except Exception as exc:  # a refusal: answered now, stored if worth replaying
                response = view.handle_exception(exc)  # raises again what DRF does not handle
                if storable(response.status_code) and not _remember(
                    who, key, fingerprint, response, stored, request
                ):
                    return _replay(who, key, fingerprint, replayed, request)
                return response
            return response

        return wrapper

    return decorate


def idempotency_keys_purge(*, older_than: float | None = None) -> int:
    """Delete the remembered answers older than ``older_than`` seconds (default
    ``WMS_IDEMPOTENCY_TTL``), in batches; returns how many."""
    ttl = settings.WMS_IDEMPOTENCY_TTL if older_than is None else older_than
    cutoff = timezone.now() - timedelta(seconds=ttl)
    deleted = 0
    while True:
        ids = list(
            IdempotentRequest.objects.filter(created_at__lt=cutoff)
            .order_by()
            .values_list("pk", flat=True)[:PURGE_BATCH]
        )
        if not ids:
            break
        deleted += IdempotentRequest.objects.filter(pk__in=ids).delete()[0]
        if len(ids) < PURGE_BATCH:
            break
    if deleted:
        log.info("idempotency_keys_purged", deleted=deleted, ttl=ttl)
    return deleted
