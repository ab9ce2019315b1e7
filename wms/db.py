"""Fast bulk inserts: PostgreSQL's COPY where the database has it, ``bulk_create`` elsewhere.

The splitter writes 10^5 jobs at a time; Django's ``bulk_create`` spends most of that time in
Python building one huge INSERT. On PostgreSQL the ids are taken from the table's sequence in one
query and the rows streamed with ``COPY ... FROM STDIN``. This is a capability of the database,
not a mode of the WMS: the same code path runs on any PostgreSQL, and ``WMS_BULK_COPY=false``
forces the portable path (the tests run both).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.conf import settings
from django.db import connection, models


def copy_supported() -> bool:
    return connection.vendor == "postgresql" and getattr(settings, "WMS_BULK_COPY", True)


def allocate_ids(model: type[models.Model], n: int) -> list[int]:
    """``n`` fresh primary keys from the model's sequence (PostgreSQL only)."""
    table = model._meta.db_table
    pk = model._meta.pk.column
    with connection.cursor() as cur:
        cur.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
            [table, pk, n],
        )
        return [row[0] for row in cur.fetchall()]


def copy_rows(
    model: type[models.Model], columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Stream rows into the model's table with COPY (PostgreSQL only). Columns are db columns."""
    table = connection.ops.quote_name(model._meta.db_table)
    cols = ", ".join(connection.ops.quote_name(c) for c in columns)
    with connection.cursor() as cur, cur.cursor.copy(f"COPY {table} ({cols}) FROM STDIN") as cp:
        for row in rows:
            cp.write_row(row)
