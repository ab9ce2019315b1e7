"""Idempotency keys: a call sent again gets the same answer and changes nothing a second time
(docs/pilot-api.md, "Retries and idempotency keys").

A client names each logical call with an ``Idempotency-Key`` header (a uuid4, made once and
sent again with every retry of that call). A view method wrapped with :func:`idempotent`:

- without the header, runs as before;
- with a malformed key (not 8 to 64 of ``A-Z a-z 0-9 _ . : -``): **400**
  ``invalid_idempotency_key``;
- runs the call in a transaction and, if it succeeded (2xx), inserts the answer (status and
  JSON body) keyed by (scope, key) **in the same transaction**: the change and its record
  commit together or not at all. A refusal (other 4xx) changed nothing: its answer is stored
  after the rollback. 5xx (outages answer 503), 429 and 401/403 of the authentication (which
  run before the view) are not stored: they are answered afresh when the call is sent again;
- when the key is already stored (the INSERT finds it: ``ON CONFLICT DO NOTHING``), the call's
  own work is rolled back and the stored answer is sent instead, with the header
  ``Idempotent-Replayed: true``; if the stored call was another one (method, path or body
  differ, compared by sha256): **422** ``idempotency_key_reused``.

So the hot path costs one INSERT (plus the savepoint of the service's own transaction) and
no lookup: a first call never reads the store. A retry runs the call once more inside the
transaction that is then rolled back. Two copies of one call at the same time: the second
one's INSERT waits on the first one's uncommitted row (the unique index), then finds it and
replays its answer once the first commits; if the first rolls back, the second goes on as a
first call. ``scope`` separates callers (``pilot:<id>``, ``user:<id>``): a key is only ever
compared with the same caller's keys.

Rows live ``WMS_IDEMPOTENCY_TTL`` seconds: :func:`idempotency_keys_purge`, run by beat.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
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


def _remember(scope: str, key: str, fingerprint: str, response: Response) -> bool:
    """Store the answer; False if the key was there already (nothing written)."""
    body = json.dumps(response.data, cls=DjangoJSONEncoder, separators=(",", ":"))
    with connection.cursor() as cursor:
        cursor.execute(
            _insert_sql(connection.vendor),
            [scope, key, fingerprint, response.status_code, body, timezone.now()],
        )
        return cursor.fetchone() is not None


def _replay(scope: str, key: str, fingerprint: str) -> Response:
    row = (
        IdempotentRequest.objects.filter(scope=scope, key=key)
        .values_list("fingerprint", "status", "body")
        .first()
    )
    if row is None:  # purged between the INSERT and this read: a very old key
        raise IdempotencyKeyInFlight()
    stored_fingerprint, status, body = row
    if stored_fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    log.info("idempotent_replay", scope=scope, key=key, status=status)
    return Response(json.loads(body), status=status, headers={REPLAYED_HEADER: "true"})


def idempotent(
    scope: Callable[[Request], str],
) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Wrap a DRF view's handler (``post``): see the module's text. ``scope(request)`` names
    the caller (called after authentication)."""

    def decorate(handler: Callable[..., Response]) -> Callable[..., Response]:
        @functools.wraps(handler)
        def wrapper(view: Any, request: Request, *args: Any, **kwargs: Any) -> Response:
            key = request.META.get(META_KEY)
            if key is None:
                return handler(view, request, *args, **kwargs)
            if not KEY_PATTERN.match(key):
                raise IdempotencyKeyInvalid()
            who = scope(request)
            fingerprint = _fingerprint(request)
            try:
                with transaction.atomic():
                    response = handler(view, request, *args, **kwargs)
                    if storable(response.status_code) and not _remember(
                        who, key, fingerprint, response
                    ):
                        raise _AlreadyAnswered()
            except _AlreadyAnswered:
                return _replay(who, key, fingerprint)
            except Exception as exc:  # a refusal: answered now, stored if worth replaying
                response = view.handle_exception(exc)  # raises again what DRF does not handle
                if storable(response.status_code) and not _remember(
                    who, key, fingerprint, response
                ):
                    return _replay(who, key, fingerprint)
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
