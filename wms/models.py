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
