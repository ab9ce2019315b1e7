"""Pilots' status events (docs/pilot-api.md): :func:`job_events_apply`, the ONE function
behind the REST ``report``, the bulk ``events`` endpoint, the bus consumer and the
heartbeat's running metrics; :func:`job_report` is its single-event form.

It runs in two steps: :func:`job_events_prepare` checks the events and registers the files of
final reports in the DSM, outside any transaction; :func:`job_events_commit` applies them in
one short transaction. A view whose call is idempotent (``wms.idempotency``) runs the first
before its transaction and the second in it. The files are registered by ``jobs.outputs``."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from files.models import File, FileType
from jobs.control import kick_finalize_tasks, tasks_nearly_done
from jobs.events import APPLIED, DUPLICATE, IGNORED, EventOutcome, clean_event, outputs_outside
from jobs.models import AttemptState, Job, JobAttempt, JobState, task_model
from jobs.outputs import (
    FileRow,
    Registered,
    RegistrationStale,
    event_files,
    outputs_register,
    store_files,
)
from jobs.reclaim import RECLAIMABLE_JOB_STATES, attempts_reclaim_reported
from wms import db
from wms.contract import StatusEvent
from wms.exceptions import Conflict, Forbidden, NotFound, ReportConflict, ValidationFailed, WMSError
from wms.kicks import kick_dispatch
from wms.locations import LocationError, canonical_url
from wms.statemachine import apply_transition_bulk

log = structlog.get_logger(__name__)


def _raise_refused(outcome: EventOutcome) -> None:
    for exc_class in (ValidationFailed, NotFound, Forbidden, ReportConflict, Conflict):
        if outcome.error == exc_class.code:
            raise exc_class(outcome.detail)
    raise WMSError(outcome.detail, code=outcome.error)


def job_report_prepare(
    *, pilot_id: int, job_uuid: uuid.UUID | str, event: Mapping[str, Any]
) -> PreparedEvents:
    """The first step of :func:`job_report` (outside any transaction): an invalid event
    raises (400) and nothing is registered."""
    cleaned = clean_event(event, pilot_id=pilot_id, job_uuid=job_uuid)  # the URL's job
    return job_events_prepare(events=[cleaned], pilot_id=pilot_id)


def job_report(
    *, pilot_id: int, job_uuid: uuid.UUID | str, event: Mapping[str, Any]
) -> EventOutcome:
    """One status event of one job from its pilot (REST ``report``): the single-event form of
    :func:`job_events_apply`. A refused event raises (400, 403, 404, 409 ``report_conflict``);
    nothing is written."""
    (outcome,) = _apply_prepared(
        lambda: job_report_prepare(pilot_id=pilot_id, job_uuid=job_uuid, event=event)
    )
    if not outcome.ok:
        _raise_refused(outcome)
    return outcome


def job_report_commit(prepared: PreparedEvents) -> EventOutcome:
    """The second step of :func:`job_report`, after :func:`job_report_prepare` (the REST
    view runs the first before its transaction, this one in it)."""
    (outcome,) = job_events_commit(prepared)
    if not outcome.ok:
        _raise_refused(outcome)
    return outcome


@dataclass
class _Attempt:
    """An attempt as a batch of events sees it, and what the batch does to it."""

    pk: int
    job_id: int
    number: int
    pilot_id: int | None
    state: str
    started_at: Any = None  # these four are read only for final reports
    kill_acked_at: Any = None
    metrics_updated_at: Any = None
    report_digest: str = ""  # of the final report that ended it ("" if none did)
    metrics: dict[str, Any] = field(default_factory=dict)  # new keys, merged into the stored
    exit_code: int | None = None
    error_code: str = ""
    error_message: str = ""
    ended_at: Any = None
    metrics_dirty: bool = False
    ended: bool = False


_JOB_COLUMNS = (
    "id",
    "uuid",
    "state",
    "cur_retry",
    "retries",
    "task_id",
    "task__data_out_url",
    "task__data_out_uid",
)


def _report_files(ev: StatusEvent) -> list[tuple[Any, ...]]:
    """A final report's files as (type, name, size, checksum, URL), sorted."""
    return sorted((o["type"], o["name"], o["size"], o["check_sum"], o["url"]) for o in ev.outputs)


def report_digest(ev: StatusEvent) -> str:
    """What makes a final report the same report: its state, exit code, error code and files
    (type, name, size, checksum, URL; in any order), hashed. The metrics, the error message
    and ``sent_at`` may differ between two sendings of one report; these may not."""
    canonical = json.dumps(
        [ev.state, ev.exit_code, ev.error_code, _report_files(ev)], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _report_summary(
    state: Any, exit_code: Any, error_code: Any, files: list[tuple[Any, ...]]
) -> dict[str, Any]:
    """A report as a log line shows it: at most 20 of its files."""
    return {
        "state": state,
        "exit_code": exit_code,
        "error_code": error_code,
        "files": len(files),
        "first_files": [list(f) for f in sorted(files)[:20]],
    }


def _log_conflicts(conflicts: list[tuple[StatusEvent, _Attempt]]) -> None:
    """Log each refused report with the one applied before, read back: the attempt's end and
    the FILE_DAT rows written with it (same ``time_end``). Two queries, only on a conflict."""
    ended: dict[int, tuple[Any, ...]] = {
        pk: tuple(row)
        for pk, *row in JobAttempt.objects.filter(pk__in={a.pk for _, a in conflicts}).values_list(
            "pk", "state", "exit_code", "error_code", "ended_at"
        )
    }
    files: dict[tuple[int, Any], list[tuple[Any, ...]]] = defaultdict(list)
    for job_id, time_end, *row in (
        File.objects.filter(
            job_id__in={a.job_id for _, a in conflicts},
            time_end__in={row[3] for row in ended.values() if row[3] is not None},
        )
        .exclude(type=FileType.INPUT)
        .values_list("job_id", "time_end", "type", "file_name", "size", "check_sum", "url")
    ):
        files[(job_id, time_end)].append(tuple(row))
    for ev, att in conflicts:
        state, exit_code, error_code, ended_at = ended.get(att.pk, ("", None, "", None))
        log.warning(
            "report_conflict",
            job_uuid=ev.job_uuid,
            attempt=ev.attempt,
            pilot_id=ev.pilot_id,
            applied=_report_summary(
                state, exit_code, error_code, files.get((att.job_id, ended_at), [])
            ),
            refused=_report_summary(ev.state, ev.exit_code, ev.error_code, _report_files(ev)),
        )


def _end_attempt(att: _Attempt, ev: StatusEvent, now: Any, *, state: str | None = None) -> None:
    att.report_digest = report_digest(ev)
    att.state = state or ev.state
    att.exit_code = ev.exit_code
    att.error_code = ev.error_code
    att.error_message = ev.error_message
    if ev.metrics:
        att.metrics = {**att.metrics, **ev.metrics}
        att.metrics_dirty = True
    att.ended_at = now
    att.ended = True


@dataclass
class PreparedEvents:
    """A batch of events checked, and its final reports' files registered in the DSM:
    what :func:`job_events_commit` applies."""

    results: list[EventOutcome | None]  # the refusals of invalid events, None elsewhere
    cleaned: list[tuple[int, StatusEvent]]
    registered: Registered


def job_events_prepare(
    *, events: Sequence[Mapping[str, Any] | StatusEvent], pilot_id: int | None = None
) -> PreparedEvents:
    """The first step of :func:`job_events_apply`, outside any transaction: each event
    checked (:func:`clean_event`), then the files the final reports would register in their
    tasks' output datasets registered through the DSM (``jobs.outputs.outputs_register``).
    What would be registered is read without locks: the reports of attempts that are running
    (or lost, and reclaimable), by the pilot that ran them, with files under their job's
    output URL. A DSM outage (``DSMError``) raises here, before anything is written."""
    results: list[EventOutcome | None] = [None] * len(events)
    cleaned: list[tuple[int, StatusEvent]] = []
    for i, raw in enumerate(events):
        try:
            cleaned.append((i, clean_event(raw, pilot_id=pilot_id)))
        except ValidationFailed as exc:
            results[i] = EventOutcome.refused(raw, exc)
    registered = outputs_register(_files_ahead([ev for _, ev in cleaned]))
    return PreparedEvents(results, cleaned, registered)


def _files_ahead(events: list[StatusEvent]) -> list[FileRow]:
    """The files the final reports among ``events`` would register, if applied now: one
    query, none without files."""
    finals = [ev for ev in events if ev.state != "running" and ev.outputs]
    if not finals:
        return []
    seen: dict[tuple[str, int], Any] = {(str(row[1]), row[7]): row for row in _attempt_rows(finals)}
    places: dict[int, str] = {}
    files: list[FileRow] = []
    for ev in finals:
        found = seen.get((ev.job_uuid, ev.attempt))
        if found is None:
            continue
        (
            job_id,
            uid,
            task_id,
            out_url,
            out_uid,
            job_state,
            cur_retry,
            number,
            pilot,
            state,
            acked,
        ) = found
        if pilot != ev.pilot_id:
            continue
        job = {
            "id": job_id,
            "uuid": uid,
            "task_id": task_id,
            "task__data_out_url": out_url,
            "task__data_out_uid": out_uid,
        }
        if outputs_outside(ev, _place(places, job)) is not None:
            continue
        reclaimable = (
            state == AttemptState.LOST
            and job_state in RECLAIMABLE_JOB_STATES
            and cur_retry == number + 1
        )
        if state == AttemptState.RUNNING or reclaimable:
            files.extend(event_files(ev, job, None, finished=ev.state == AttemptState.FINISHED))
        elif state == AttemptState.CANCELLED and acked is None:
            files.extend(event_files(ev, job, None, finished=False))
    return files


def _attempt_rows(finals: list[StatusEvent]) -> list[tuple[Any, ...]]:
    """The attempts the events name, with their jobs and the jobs' tasks' output places:
    (job id, job uuid, task id, output URL, output dataset uid, job state, cur_retry, attempt
    number, pilot id, attempt state, kill_acked_at). Written in SQL: this read is on every
    final report's path, and the ORM's compilation of the join cost more than the query."""
    uid_field = Job._meta.get_field("uuid")
    uids = [uid_field.get_db_prep_value(u, connection) for u in {ev.job_uuid for ev in finals}]
    numbers = sorted({ev.attempt for ev in finals})
    # table names from the models, values as parameters
    attempts, jobs, tasks = (m._meta.db_table for m in (JobAttempt, Job, task_model()))
    in_uids, in_numbers = ", ".join(["%s"] * len(uids)), ", ".join(["%s"] * len(numbers))
    columns = (
        "j.id, j.uuid, j.task_id, t.data_out_url, t.data_out_uid, j.state, j.cur_retry, "
        "a.number, a.pilot_id, a.state, a.kill_acked_at"
    )
    joins = f"{attempts} a JOIN {jobs} j ON j.id = a.job_id JOIN {tasks} t ON t.id = j.task_id"
    where = f"j.uuid IN ({in_uids}) AND a.number IN ({in_numbers})"
    sql = f"SELECT {columns} FROM {joins} WHERE {where}"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, [*uids, *numbers])
        rows = cursor.fetchall()
    return [
        (
            job_id,
            _as_uuid(job_uuid),
            task_id,
            out_url,
            None if out_uid is None else _as_uuid(out_uid),
            *rest,
        )
        for job_id, job_uuid, task_id, out_url, out_uid, *rest in rows
    ]


def _as_uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def job_events_commit(prepared: PreparedEvents) -> list[EventOutcome]:
    """The second step of :func:`job_events_apply`: the events applied in one transaction.
    Raises :class:`~jobs.outputs.RegistrationStale` (nothing written) when a file must be
    registered where the first step did not register it."""
    results = list(prepared.results)
    if prepared.cleaned:
        with transaction.atomic():
            # a lost pilot's late results
            attempts_reclaim_reported([ev for _, ev in prepared.cleaned])
            _apply_events(prepared.cleaned, results, prepared.registered)
    return results  # type: ignore[return-value]


#: How many times :func:`job_events_apply` prepares a batch again after a stale registration.
PREPARE_ROUNDS = 3


def _apply_prepared(prepare: Callable[[], PreparedEvents]) -> list[EventOutcome]:
    """Prepare, then commit; a stale registration prepares again, :data:`PREPARE_ROUNDS`
    times in all, except inside a caller's transaction (its rollback is the caller's)."""
    for round_ in range(1, PREPARE_ROUNDS):
        try:
            return job_events_commit(prepare())
        except RegistrationStale:
            if connection.in_atomic_block:
                raise
            log.info("report_registration_stale", round=round_)
    return job_events_commit(prepare())


def job_events_apply(
    *, events: Sequence[Mapping[str, Any] | StatusEvent], pilot_id: int | None = None
) -> list[EventOutcome]:
    """Apply pilots' status events; one outcome per event, in order. THE write path of
    attempt reports: REST ``report`` (:func:`job_report`), the bulk ``events`` endpoint, the
    bus consumer and the heartbeat's running metrics all come here.

    ``pilot_id`` is the authenticated pilot (REST): every event is its own. Without it (the
    bus) each event names its pilot, whose signature the consumer checked
    (``jobs.consumer``). Per event:

    - invalid → ``validation_failed``; unknown job → ``not_found``; an attempt of another
      pilot → ``permission_denied``. Nothing of a refused event is written; the others go on.
    - ``running`` of the running attempt → its metrics are stored (``applied``).
    - ``finished`` / ``failed`` of the running attempt of a running job → the attempt ends
      (exit code, error, metrics, ``ended_at``); its files become FILE_DAT rows and are
      registered in the task's output dataset; the job becomes ``finished``, or for a failure
      ``defined`` with ``cur_retry + 1`` while retries are left, else ``failed`` (``applied``).
    - a final report of an attempt cancelled with its job: its end, files (the log; outputs as
      ``partial``) and ``kill_acked_at`` are recorded, the job stays cancelled (``applied``).
    - the same final report again → ``duplicate``; another final report of an attempt that a
      report already ended (other files, sizes, checksums, URLs, state, exit or error code:
      :func:`report_digest`) → ``report_conflict``, refused and logged with both versions; a
      report of an attempt that is no longer running (lost, superseded) or was never started
      → ``ignored``, nothing of it registered. A late report never moves a job backwards.
    - a final report of its own pilot's ``lost`` attempt whose job has not started a newer
      one is applied: the attempt is reclaimed first (``jobs.reclaim``).

    First the files of final reports are registered in the DSM, one call per output
    dataset, outside any transaction (:func:`job_events_prepare`); then a batch is one short
    transaction with a bounded number of queries, whatever its size: the jobs with a final
    event are locked (``FOR UPDATE``, in id order), attempts are read in one query, running
    metrics written with one bulk UPDATE (guarded by ``state = running``), ended attempts with
    another, FILE_DAT rows with one INSERT, job transitions with one UPDATE per target state;
    no DSM call and no lock on the output dataset's row in it. A DSM failure (``DSMError``)
    fails the whole batch before anything is written (retry later). If the transaction finds
    a file to register that the first step did not (the task's output dataset changed, the
    attempt started meanwhile), the batch is prepared again (:data:`PREPARE_ROUNDS`).
    A race can leave registered a file whose report was then not applied (a job cancelled
    between the two steps: its outputs are in the dataset, its FILE_DAT rows ``partial``);
    it is logged (``outputs_registered_unused``).
    """
    return _apply_prepared(lambda: job_events_prepare(events=events, pilot_id=pilot_id))


def _apply_events(
    cleaned: list[tuple[int, StatusEvent]],
    results: list[EventOutcome | None],
    registered: Registered,
) -> None:
    now = timezone.now()
    final_uuids = {ev.job_uuid for _, ev in cleaned if ev.state != "running"}
    other_uuids = {ev.job_uuid for _, ev in cleaned} - final_uuids
    # Running metrics need little: the columns read are the ones the events need.
    jobs: dict[str, dict[str, Any]] = {}
    if final_uuids:
        for row in (
            Job.objects.select_for_update(of=("self",))
            .filter(**db.in_values("uuid", final_uuids))
            .order_by("id")
            .values_list(*_JOB_COLUMNS)
        ):
            jobs[str(row[1])] = dict(zip(_JOB_COLUMNS, row, strict=True))
    if other_uuids:
        for pk, uid, state in Job.objects.filter(**db.in_values("uuid", other_uuids)).values_list(
            "id", "uuid", "state"
        ):
            jobs[str(uid)] = {"id": pk, "uuid": uid, "state": state}
    attempts: dict[tuple[int, int], _Attempt] = {}
    if jobs:
        # The stored metrics are not read: new keys are merged into them by the UPDATE.
        columns = ["pk", "job_id", "number", "pilot_id", "state"]
        if final_uuids:
            columns += ["started_at", "kill_acked_at", "metrics_updated_at", "report_digest"]
        for row in JobAttempt.objects.filter(
            **db.in_values("job_id", [j["id"] for j in jobs.values()]),
            number__in={ev.attempt for _, ev in cleaned},
        ).values_list(*columns):
            attempts[(row[1], row[2])] = _Attempt(*row)

    places: dict[int, str] = {}  # task id → its canonical output URL
    # (target, source, reason) → job ids: one UPDATE and one log insert per group
    transitions: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    files: list[FileRow] = []
    retried = False
    ended_tasks: set[int] = set()  # tasks of jobs that became final, or whose kill was acked
    conflicts: list[tuple[StatusEvent, _Attempt]] = []
    for i, ev in cleaned:
        job = jobs.get(ev.job_uuid)
        if job is None:
            results[i] = EventOutcome.refused(ev, NotFound(f"Job {ev.job_uuid} does not exist."))
            continue
        att = attempts.get((job["id"], ev.attempt))
        if att is None:  # never started: nothing to report on
            results[i] = EventOutcome(ev.job_uuid, ev.attempt, IGNORED, job["state"])
            continue
        if att.pilot_id != ev.pilot_id:
            results[i] = EventOutcome.refused(
                ev,
                Forbidden(f"Attempt {ev.attempt} of job {ev.job_uuid} is not this pilot's."),
            )
            continue
        if ev.outputs:  # every file under the job's output URL, or the whole report refused
            refusal = outputs_outside(ev, _place(places, job))
            if refusal is not None:
                log.warning(
                    "report_outputs_refused",
                    job_uuid=ev.job_uuid,
                    attempt=ev.attempt,
                    pilot_id=ev.pilot_id,
                    detail=refusal.detail,
                )
                results[i] = EventOutcome.refused(ev, refusal)
                continue
        outcome = IGNORED
        if ev.state == "running":
            if att.state == AttemptState.RUNNING and not att.ended:
                if ev.metrics:
                    att.metrics = {**att.metrics, **ev.metrics}
                    att.metrics_dirty = True
                outcome = APPLIED
        elif att.state == AttemptState.RUNNING:
            current = job["state"] == JobState.RUNNING and job["cur_retry"] == ev.attempt
            finished = ev.state == AttemptState.FINISHED
            _end_attempt(att, ev, now)
            files.extend(event_files(ev, job, att.started_at, finished=finished))
            if current:
                code = ev.error_code or f"exit code {ev.exit_code}"
                target: str
                if finished:
                    target, reason = JobState.FINISHED, "attempt finished"
                elif job["cur_retry"] < job["retries"]:
                    target, reason = JobState.DEFINED, f"attempt failed ({code}); retry"
                    job["cur_retry"] += 1
                    retried = True
                else:
                    target, reason = JobState.FAILED, f"attempt failed ({code}); no retry left"
                transitions[(target, f"pilot:{ev.pilot_id}", reason)].append(job["id"])
                job["state"] = target
                if target != JobState.DEFINED:
                    ended_tasks.add(job["task_id"])
            outcome = APPLIED
        elif att.state == AttemptState.CANCELLED and att.kill_acked_at is None:
            _end_attempt(att, ev, now, state=AttemptState.CANCELLED)
            att.kill_acked_at = now
            files.extend(event_files(ev, job, att.started_at, finished=False))
            ended_tasks.add(job["task_id"])
            outcome = APPLIED
        elif att.report_digest:  # a final report ended it: the same one again, or another?
            if att.report_digest != report_digest(ev):
                conflicts.append((ev, att))
                results[i] = EventOutcome.refused(
                    ev,
                    ReportConflict(
                        f"Attempt {ev.attempt} of job {ev.job_uuid} already ended with another "
                        "final report (files, state, exit or error code differ)."
                    ),
                )
                continue
            outcome = DUPLICATE
        elif att.state == ev.state or (  # ended before reports were kept (report_digest)
            att.state == AttemptState.CANCELLED and att.kill_acked_at is not None
        ):
            outcome = DUPLICATE
        results[i] = EventOutcome(ev.job_uuid, ev.attempt, outcome, job["state"])

    metrics_only = [a for a in attempts.values() if a.metrics_dirty and not a.ended]
    # Guarded by state = running: an attempt a concurrent report just ended keeps its end.
    db.update_rows(
        JobAttempt,
        ("metrics", "metrics_updated_at"),
        [(a.pk, a.metrics, now) for a in metrics_only],
        where={"state": AttemptState.RUNNING},
        merge=("metrics",),
    )
    db.update_rows(
        JobAttempt,
        (
            "state",
            "exit_code",
            "error_code",
            "error_message",
            "metrics",
            "metrics_updated_at",
            "ended_at",
            "kill_acked_at",
            "report_digest",
        ),
        [
            (
                a.pk,
                a.state,
                a.exit_code,
                a.error_code,
                a.error_message,
                a.metrics,
                now if a.metrics_dirty else a.metrics_updated_at,
                a.ended_at,
                a.kill_acked_at,
                a.report_digest,
            )
            for a in attempts.values()
            if a.ended
        ],
        merge=("metrics",),
    )
    for (target, source, reason), ids in transitions.items():
        updates: dict[str, Any] = (
            {"cur_retry": F("cur_retry") + 1} if target == JobState.DEFINED else {"time_end": now}
        )
        apply_transition_bulk(
            Job,
            ids,
            target,
            from_state=JobState.RUNNING,
            source=source,
            reason=reason,
            updates=updates,
            locked=True,
        )
    if files:  # registered in the DSM before the transaction (job_events_prepare)
        store_files(files, now, registered)
    _log_unused(registered, files)
    if transitions:
        counts: dict[str, int] = defaultdict(int)
        for (target, _, _), ids in transitions.items():
            counts[target] += len(ids)
        log.info("job_attempts_ended", **counts)
    if conflicts:
        _log_conflicts(conflicts)
    if retried:
        kick_dispatch()
    if ended_tasks:
        kick_finalize_tasks(tasks_nearly_done(ended_tasks))


def _log_unused(registered: Registered, files: list[FileRow]) -> None:
    """Files registered before the transaction that no applied report wrote: the same report
    sent twice at once (the other copy wrote them), or a race that changed the report's fate
    (a job cancelled between the two steps)."""
    if not registered.entries:
        return
    used = {(f.dataset_uid, f.name) for f in files if f.register}
    unused = sorted(f"{uid}:{name}" for uid, name in registered.entries.keys() - used)
    if unused:
        log.info("outputs_registered_unused", count=len(unused), first=unused[:20])


def _place(places: dict[int, str], job: dict[str, Any]) -> str:
    """The canonical output URL of a job's task ("" when it has none or it is unreadable)."""
    task_id = job["task_id"]
    if task_id not in places:
        try:
            places[task_id] = canonical_url(job["task__data_out_url"] or "")
        except LocationError:
            places[task_id] = ""
    return places[task_id]
