"""Fast bulk writes: PostgreSQL's COPY and ``UPDATE ... FROM unnest(...)`` where the database
has them, ``bulk_create`` / ``bulk_update`` elsewhere.

The splitter writes 10^5 jobs at a time; Django's ``bulk_create`` spends most of that time in
Python building one huge INSERT. On PostgreSQL the ids are taken from the table's sequence in one
query and the rows streamed with ``COPY ... FROM STDIN``. This is a capability of the database,
not a mode of the WMS: the same code path runs on any PostgreSQL, and ``WMS_BULK_COPY=false``
forces the portable path (the tests run both).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, cast

from django.conf import settings
from django.db import connection, models, transaction


def copy_supported() -> bool:
    return connection.vendor == "postgresql" and getattr(settings, "WMS_BULK_COPY", True)


def array_inserts_supported() -> bool:
    """Can one INSERT take its rows as array parameters (``unnest``) and skip existing keys
    with ``ON CONFLICT DO NOTHING RETURNING``? A capability of the database (PostgreSQL),
    so callers need not branch on the backend themselves."""
    return connection.vendor == "postgresql"


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


def reserve_ids(model: type[models.Model], n: int = 1) -> list[int]:
    """``n`` primary keys of the model's table that nothing else will take, before the rows
    are written (each is then inserted with its id): a row whose id must be known outside
    its own transaction, e.g. to name things after it elsewhere first. PostgreSQL: the
    table's sequence; SQLite: its ``AUTOINCREMENT`` counter, moved by one statement."""
    if connection.vendor == "postgresql":
        return allocate_ids(model, n)
    if connection.vendor != "sqlite":
        raise NotImplementedError(f"reserve_ids on {connection.vendor}")
    qn = connection.ops.quote_name
    table = model._meta.db_table
    pk = qn(str(model._meta.pk.column))
    top = f"(SELECT COALESCE(MAX({pk}), 0) FROM {qn(table)})"  # noqa: S608
    with transaction.atomic(), connection.cursor() as cur:
        # Identifiers come from the model's metadata (quoted), values are parameters.
        cur.execute(
            f"UPDATE sqlite_sequence SET seq = MAX(seq, {top}) + %s "  # noqa: S608
            "WHERE name = %s RETURNING seq",
            [n, table],
        )
        row = cur.fetchone()
        if row is None:  # the table never had a row: no counter yet
            cur.execute(
                f"INSERT INTO sqlite_sequence (name, seq) SELECT %s, {top} + %s RETURNING seq",
                [table, n],
            )
            row = cur.fetchone()
    last = int(row[0])
    return list(range(last - n + 1, last + 1))


def copy_rows(
    model: type[models.Model], columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Stream rows into the model's table with COPY (PostgreSQL only). Columns are db columns."""
    table = connection.ops.quote_name(model._meta.db_table)
    cols = ", ".join(connection.ops.quote_name(c) for c in columns)
    # The driver's own cursor: its errors are made Django's (IntegrityError, ...) here.
    with (
        connection.cursor() as cur,
        connection.wrap_database_errors,
        cur.cursor.copy(f"COPY {table} ({cols}) FROM STDIN") as cp,
    ):
        for row in rows:
            cp.write_row(row)


def update_rows(
    model: type[models.Model],
    fields: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    where: dict[str, Any] | None = None,
    merge: Sequence[str] = (),
) -> int:
    """Give each row its own values with ONE statement: ``rows`` are ``(pk, *values of
    fields)``; ``where`` adds conditions (``{"state": "running"}``) that every row must meet;
    the JSON object fields named in ``merge`` get the new keys merged into the stored object
    (``stored | new``) instead of replacing it.

    On PostgreSQL: ``UPDATE t SET f = v.f, ... FROM ROWS FROM (unnest(<one array per
    column>), ...) v WHERE t.pk = v.pk AND ...``: linear in the rows and cheap in Python (the
    merge is jsonb's ``||``). A JSON column is ONE JSON array (``jsonb_array_elements``), not
    an array of texts: the driver quotes a text array element by element in Python, which
    cost more than the rest of a batch of running metrics. Elsewhere Django's
    ``bulk_update`` (a ``CASE`` per field), after reading the objects to merge. Returns the
    rows updated (PostgreSQL) or asked (elsewhere).
    """
    if not rows:
        return 0
    meta = model._meta

    def column_of(name: str) -> models.Field:
        return cast(models.Field, meta.get_field(name))

    concrete = [column_of(name) for name in fields]
    if connection.vendor != "postgresql":
        manager = model._default_manager
        queryset = manager.filter(**where) if where else manager.all()
        stored: dict[Any, dict[str, Any]] = {}
        if merge:
            for pk, *values in manager.filter(pk__in=[row[0] for row in rows]).values_list(
                "pk", *merge
            ):
                stored[pk] = dict(zip(merge, values, strict=True))
        objs = []
        for row in rows:
            obj = model(pk=row[0])
            for field, value in zip(concrete, row[1:], strict=True):
                if field.name in merge and value is not None:
                    value = {**(stored.get(row[0], {}).get(field.name) or {}), **value}
                setattr(obj, field.attname, value)
            objs.append(obj)
        queryset.bulk_update(objs, list(fields), batch_size=1000)
        return len(rows)
    qn = connection.ops.quote_name
    pk = cast(models.Field, meta.pk)
    columns: list[tuple[str, str, bool]] = [(str(pk.column), str(pk.db_type(connection)), False)]
    for field in concrete:
        db_type = str(field.db_type(connection))
        columns.append((str(field.column), db_type, db_type in ("jsonb", "json")))
    arrays: list[Any] = [[row[i] for row in rows] for i in range(len(columns))]
    sources = []
    for i, (_col, db_type, is_json) in enumerate(columns):
        if is_json:  # None -> JSON null -> NULL again (NULLIF below)
            arrays[i] = json.dumps(arrays[i])
            sources.append("jsonb_array_elements(%s::jsonb)")
        else:
            sources.append(f"unnest(%s::{db_type}[])")
    names = [f"c{i}" for i in range(len(columns))]
    merged = {str(column_of(name).column) for name in merge}

    def assignment(col: str, is_json: bool, name: str) -> str:
        value = f"NULLIF(v.{name}, 'null'::jsonb)" if is_json else f"v.{name}"
        if col in merged:
            return f"{qn(col)} = COALESCE(t.{qn(col)}, '{{}}'::jsonb) || {value}"
        return f"{qn(col)} = {value}"

    sets = ", ".join(
        assignment(col, is_json, name)
        for (col, _type, is_json), name in zip(columns[1:], names[1:], strict=True)
    )
    conditions = "".join(f" AND t.{qn(str(column_of(k).column))} = %s" for k in where or {})
    # Identifiers come from the model's metadata (quoted), values are parameters.
    sql = (
        f"UPDATE {qn(meta.db_table)} AS t SET {sets} "  # noqa: S608
        f"FROM ROWS FROM ({', '.join(sources)}) AS v({', '.join(names)}) "
        f"WHERE t.{qn(columns[0][0])} = v.c0{conditions}"
    )
    with connection.cursor() as cur:
        cur.execute(sql, [*arrays, *(where or {}).values()])
        return cur.rowcount


class AnyLookup(models.Lookup):
    """``field__any=[...]``: ``field = ANY(%s::<type>[])`` with ONE array parameter.

    For PostgreSQL, where a list of thousands of values costs one parameter instead of one
    placeholder each (cheaper to bind and to parse). Use :func:`in_values` to pick it.
    """

    lookup_name = "any"
    prepare_rhs = False

    def get_db_prep_lookup(self, value: Any, connection: Any) -> Any:
        field = self.lhs.output_field
        return (
            "%s",
            ([field.get_db_prep_value(v, connection, prepared=False) for v in value],),
        )

    def as_sql(self, compiler: Any, connection: Any) -> Any:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        db_type = self.lhs.output_field.db_type(connection)
        return f"{lhs} = ANY({rhs}::{db_type}[])", (*lhs_params, *rhs_params)


models.Field.register_lookup(AnyLookup)
models.ForeignObject.register_lookup(AnyLookup)  # related fields keep lookups of their own


def in_values(name: str, values: Iterable[Any]) -> dict[str, Any]:
    """The filter "``name`` is one of ``values``": ``__any`` on PostgreSQL, ``__in`` elsewhere."""
    values = list(values)
    if connection.vendor == "postgresql":
        return {f"{name}__any": values}
    return {f"{name}__in": values}
