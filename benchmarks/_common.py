"""What the benchmarks share: Django set up on a throwaway database, timing, printing."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def django_setup() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("WMS_LOG_LEVEL", "WARNING")
    import django

    django.setup()


@contextmanager
def bench_database():
    """A fresh, migrated database (``test_<name>``) for the run, dropped afterwards."""
    from django.conf import settings
    from django.test.utils import setup_databases, teardown_databases

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        sys.exit("benchmarks run on PostgreSQL: set DATABASE_URL=postgres://...")
    old = setup_databases(verbosity=0, interactive=False)
    try:
        yield
    finally:
        from django.db import connections

        connections.close_all()
        teardown_databases(old, verbosity=0)


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0


def report(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * len(title))
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
