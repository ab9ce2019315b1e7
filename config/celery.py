"""The Celery app: the splitter, the executor and the reapers run here (see DESIGN.md section 5)."""

import os

from celery import Celery
from celery.signals import setup_logging, worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

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
from jobs.bootsteps import EventsConsumerStep  # noqa: E402

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
