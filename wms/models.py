"""What all apps share in the database: the shape of a transition-log row, the run-time switches
and users' API tokens."""

from django.conf import settings
from django.db import models
from django.utils import timezone


class TransitionLog(models.Model):
    """One state change of one object: from, to, when, who asked (source) and why.

    Concrete logs (``JobTransition``, ``TaskTransition``, ...) add a ``subject`` foreign key to
    the object whose state changed. Rows are written only by ``wms.statemachine``.
    """

    from_state = models.CharField(max_length=20)
    to_state = models.CharField(max_length=20)
    at = models.DateTimeField(default=timezone.now)
    source = models.CharField(max_length=64)
    reason = models.TextField(blank=True, default="")

    class Meta:
        abstract = True
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.from_state} → {self.to_state} ({self.source})"


class Switch(models.Model):
    """A run-time switch of a background service (``splitter``, ``executor``).

    Switching one off takes effect at the next beat cycle, without a restart. ``last_run_at``
    guards the beat: a cycle runs only if it wins a conditional UPDATE of it, so two beat
    instances never double-run a service (``wms.switches.service_tick``).
    """

    name = models.CharField(max_length=50, primary_key=True)
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(default=timezone.now)
    updated_by = models.CharField(max_length=150, blank=True, default="")
    last_run_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "service switch"
        verbose_name_plural = "service switches"

    def __str__(self) -> str:
        return f"{self.name}: {'on' if self.enabled else 'off'}"


class ApiToken(models.Model):
    """A user's API token (``Authorization: Token <key>``), as pilots' tokens are kept: only the
    key's sha256 is stored (``key_hash``, unique), the key itself is shown once, at creation.

    ``prefix`` is the key's first characters, not secret, so that a user or an operator can
    tell tokens apart. A token stops working when it expires (``expires_at``) or is revoked
    (``revoked_at``); the row stays, for the record. ``last_used_at`` is written at most once a
    minute per token (``wms.services.api_token_touch``), not on every request. Rows are written
    only by ``wms.services``.
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, help_text="What the token is for.")
    prefix = models.CharField(
        max_length=16, help_text="The key's first characters (not secret), to recognise it."
    )
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"
        verbose_name_plural = "API tokens"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def is_active(self, now=None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class IdempotentRequest(models.Model):
    """The remembered answer of one call made with an ``Idempotency-Key`` (wms.idempotency).

    ``scope`` says whose key it is (``pilot:<id>``, ``user:<id>``): two callers may use the same
    key. ``fingerprint`` is the sha256 of the call (method, path, body): the same key with
    another call is refused. The row of a call that changed something is written in the same
    transaction as the change, so a retried call finds either both or neither. Rows older than
    ``WMS_IDEMPOTENCY_TTL`` are purged by beat (``wms.purge_idempotency_keys``). Rows are
    written only by ``wms.idempotency``.
    """

    scope = models.CharField(max_length=64)
    key = models.CharField(max_length=64)
    fingerprint = models.CharField(max_length=64)
    status = models.PositiveSmallIntegerField()
    body = models.TextField(help_text="The answer's JSON body, as it was sent.")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["scope", "key"], name="idempotent_request_unique_key")
        ]
        verbose_name = "idempotent request"

    def __str__(self) -> str:
        return f"{self.scope} {self.key} → {self.status}"
