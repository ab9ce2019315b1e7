"""``manage.py consume_events``: the consumer of pilots' status events, apart from the workers.

Runs until interrupted (Ctrl-C, SIGTERM). Set ``WMS_EVENTS_IN_WORKER=false`` for the workers
when this runs, or let both consume (they share the queue).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from pilots.consumer import consume, run
from wms import bus


class Command(BaseCommand):
    help = "Consume pilots' status events from the bus and apply them in batches."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--batch-size", type=int, default=None, help="Events per batch.")
        parser.add_argument(
            "--once",
            action="store_true",
            help="Apply what is in the queue, then exit (after 2 s without an event).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if options["once"]:
            conn = bus.new_connection()
            try:
                bus.topology().declare(conn, queues=[bus.topology().events_queue()])
                total = consume(conn, stop=stop, batch_size=options["batch_size"], idle_timeout=2.0)
            finally:
                conn.release()
            self.stdout.write(total.describe())
            return
        run(stop=stop, batch_size=options["batch_size"])
