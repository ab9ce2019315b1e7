"""The heartbeat's own statements (``pilots.services.pilot_heartbeat``): the pilot's row locked
and written with one statement, the commands delivered with another. Built once per process
from the models' names."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from typing import Any

from django.db import connection

from pilots.models import Pilot, PilotCommand
from wms.contract import Command


def _command_job_uuids(rows: Iterable[tuple[Any, ...]]) -> dict[int, str]:
    from jobs.models import Job

    ids = {r[_CMD_JOB] for r in rows if r[_CMD_JOB] is not None}
    if not ids:
        return {}
    return {pk: str(u) for pk, u in Job.objects.filter(pk__in=ids).values_list("pk", "uuid")}


def _qn(name: str) -> str:
    return connection.ops.quote_name(name)


@functools.cache
def _touch_sql(vendor: str, with_metrics: bool) -> str:
    """The heartbeat's first statement on PostgreSQL: the pilot's row locked and its
    heartbeat, status (and metrics) written, returning the state and the previous heartbeat
    read under the lock, and whether an attempt runs on the pilot (the partial index
    ``attempt_running_pilot``).

    It also makes the transaction's commit asynchronous (``synchronous_commit`` off for this
    transaction only): the answer does not wait for the WAL's flush to disk. A heartbeat
    writes nothing that the next one does not write again: if PostgreSQL crashes, the last
    fraction of a second of committed heartbeats (at most ~3 x ``wal_writer_delay``) may be
    lost as a whole and in order, never half, and never one that a later synchronous commit
    (a start, a report, a cancel) depends on, since that commit flushes the WAL before it.
    What was lost is done again by the pilot's next heartbeat: its state, metrics and
    reconciliation; a command it was given is given again (the agent runs a command once,
    by its id); a retried call with the same key runs again instead of being replayed."""
    from jobs.models import AttemptState, JobAttempt

    pilot = _qn(Pilot._meta.db_table)
    attempt = _qn(JobAttempt._meta.db_table)
    sets = ["last_heartbeat", "updated_at", "status"] + (["metrics"] if with_metrics else [])
    assignments = ", ".join(f"{_qn(c)} = %s" for c in sets)
    return (
        f"UPDATE {pilot} SET {assignments} "  # noqa: S608 - names from the models
        f"FROM (SELECT {_qn('id')}, {_qn('state')}, {_qn('last_heartbeat')} FROM {pilot} "
        f"WHERE {_qn('id')} = %s FOR UPDATE) AS old "
        f"WHERE {pilot}.{_qn('id')} = old.{_qn('id')} "
        f"RETURNING old.{_qn('state')}, old.{_qn('last_heartbeat')}, EXISTS (SELECT 1 FROM "
        f"{attempt} WHERE {attempt}.{_qn('pilot_id')} = old.{_qn('id')} AND "
        f"{attempt}.{_qn('state')} = '{AttemptState.RUNNING.value}'), "
        "set_config('synchronous_commit', 'off', true)"
    )


def touch(pilot_id: int, updates: dict[str, Any]) -> tuple[str, Any, bool] | None:
    """Lock the pilot's row and write ``updates`` (heartbeat, status, metrics): its state and
    previous heartbeat as read under the lock, and whether an attempt runs on it; None if
    there is no such pilot. One statement on PostgreSQL; elsewhere (the embedded SQLite,
    whose writers take turns anyway) a read and an UPDATE."""
    if connection.vendor == "postgresql":
        with_metrics = "metrics" in updates
        params: list[Any] = [updates["last_heartbeat"], updates["updated_at"], updates["status"]]
        if with_metrics:
            params.append(
                Pilot._meta.get_field("metrics").get_db_prep_value(updates["metrics"], connection)
            )
        params.append(pilot_id)
        with connection.cursor() as cursor:
            cursor.execute(_touch_sql(connection.vendor, with_metrics), params)
            row = cursor.fetchone()
        return None if row is None else (row[0], row[1], bool(row[2]))
    from jobs.models import AttemptState, JobAttempt

    found = (
        Pilot.objects.select_for_update()
        .filter(pk=pilot_id)
        .values_list("state", "last_heartbeat")
        .first()
    )
    if found is None:
        return None
    Pilot.objects.filter(pk=pilot_id).update(**updates)
    running = JobAttempt.objects.filter(pilot_id=pilot_id, state=AttemptState.RUNNING).exists()
    return found[0], found[1], running


_CMD_COLUMNS = ("id", "command", "job_id", "attempt", "reason", "created_at")
_CMD_JOB = _CMD_COLUMNS.index("job_id")


@functools.cache
def _deliver_sql(vendor: str) -> str:
    table = _qn(PilotCommand._meta.db_table)
    return (
        f"UPDATE {table} SET {_qn('delivered_at')} = %s "  # noqa: S608 - names from the model
        f"WHERE {_qn('pilot_id')} = %s AND {_qn('delivered_at')} IS NULL "
        f"AND {_qn('acked_at')} IS NULL "
        f"RETURNING {', '.join(_qn(c) for c in _CMD_COLUMNS)}"
    )


def deliver_commands(pilot_id: int, now: Any) -> list[Command]:
    """The commands not given to the pilot yet, marked delivered by ONE statement (an UPDATE
    ... RETURNING: each is delivered once), in the order they were made."""
    with connection.cursor() as cursor:
        cursor.execute(
            _deliver_sql(connection.vendor),
            [connection.ops.adapt_datetimefield_value(now), pilot_id],
        )
        rows = cursor.fetchall()
    if not rows:
        return []
    rows = [(r[0] if isinstance(r[0], uuid.UUID) else uuid.UUID(str(r[0])), *r[1:]) for r in rows]
    rows.sort(key=lambda r: (r[5], str(r[0])))
    job_uuids = _command_job_uuids(rows)
    return [
        Command(
            command=command,
            pilot_id=pilot_id,
            id=str(pk),
            job_uuid=job_uuids.get(job_id, "") if job_id is not None else "",
            attempt=attempt,
            reason=reason,
        )
        for pk, command, job_id, attempt, reason, _created in rows
    ]
