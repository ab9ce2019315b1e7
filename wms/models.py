"""What all apps share in the database: the shape of a transition-log row."""

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
