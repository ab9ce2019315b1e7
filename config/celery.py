"""The Celery app: the splitter, the executor and the reapers run here (see DESIGN.md section 5)."""

import os

from celery import Celery
from celery.signals import setup_logging, worker_ready
from celery.worker.consumer import Consumer as _Consumer

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")


class Consumer(_Consumer):
    """Celery's consumer less its native delayed delivery (``CELERY_WORKER_CONSUMER``).

    Celery adds that step when its queues are quorum queues: it declares 28 ``celery_delayed_*``
    queues and, at every (re)connection, sets them up on each URL of the failover list, retrying
    a dead node's for some 15 s before the worker consumes again. The WMS sends no task with a
    countdown or an ETA (its periodic work comes from beat), so it needs none of it.
    """

    class Blueprint(_Consumer.Blueprint):
        default_steps = [
            step
            for step in _Consumer.Blueprint.default_steps
            if not step.endswith(":DelayedDelivery")
        ]


app = Celery("wms")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _use_django_logging(**_kwargs: object) -> None:
    """Keep Django's LOGGING (structlog) instead of Celery's own handlers."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)


# The consumer of pilots' status events (<prefix>.events), in a thread of every worker.
from pilots.bootsteps import EventsConsumerStep  # noqa: E402

app.steps["consumer"].add(EventsConsumerStep)

try:
    from django_structlog.celery.steps import DjangoStructLogInitStep

    app.steps["worker"].add(DjangoStructLogInitStep)
except ImportError:  # pragma: no cover - django-structlog always ships it
    pass


@worker_ready.connect
def _declare_bus_topology(**_kwargs: object) -> None:
    """Declare the exchanges and queues of the bus at worker start-up (idempotent)."""
    import structlog

    from wms import bus

    conn = bus.new_connection()
    try:
        bus.topology().declare(conn)
    except Exception as exc:  # the broker may come later; publishing declares again
        structlog.get_logger(__name__).warning("bus_declare_failed", error=str(exc))
    finally:
        conn.release()
