"""The Celery worker's bootstep that runs the consumer of pilots' status events.

Django-free at import time (``config/celery.py`` imports it before Django is set up). The step
is a ``ConsumerStep``: it starts when the worker's consumer starts (and again after the worker
reconnects to the broker), and stops with it. It declares no kombu consumer on the worker's own
channel: the events consumer runs in a thread with its own connection (``pilots.consumer``), so
that applying a batch (a database transaction, DSM calls) never stalls the worker's event loop.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps


class EventsConsumerStep(bootsteps.ConsumerStep):
    """Consume ``<prefix>.events`` in this worker (unless ``WMS_EVENTS_IN_WORKER`` is off)."""

    name = "wms.events_consumer"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.thread: Any = None

    def get_consumers(self, channel: Any) -> list:
        return []

    def start(self, c: Any) -> None:
        from django.conf import settings

        if not settings.WMS_EVENTS_IN_WORKER or self.thread is not None:
            return
        from pilots.consumer import ConsumerThread

        self.thread = ConsumerThread()
        self.thread.start()

    def stop(self, c: Any) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
