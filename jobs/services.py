"""Every write to jobs and their attempts goes through here.

The pilot-facing writes (docs/pilot-api.md) are:

- :func:`job_start`: a pilot's atomic claim of a ``queued`` job's current attempt;
- :func:`job_events_apply`: pilots' status events (running metrics, final reports), the ONE
  function behind the REST ``report``, the bulk ``events`` endpoint and the bus consumer;
  :func:`job_report` is its single-event form;
- :func:`attempts_interrupt`: the running attempts of a pilot that terminated or was lost end,
  and their jobs are retried or failed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from django.db import transaction
from django.db.models import F, OuterRef, Subquery
from django.utils import timezone

from files.build import NewFile, files_build
from files.dsm import get_dsm
from files.models import Dataset, File, FileStatus, FileType
from jobs.events import APPLIED, DUPLICATE, IGNORED, EventOutcome, clean_event, outputs_outside
from jobs.executor import MESSAGE_COLUMNS, build_messages
from jobs.models import OPEN_JOB_STATES, AttemptState, Job, JobAttempt, JobState, task_model
from jobs.reclaim import attempts_reclaim_reported
from jobs.signals import KillOrder, attempts_to_kill
from wms import db
from wms.choices import TaskState
from wms.contract import JobMessage, StatusEvent
from wms.exceptions import (
    Conflict,
    DatasetClosed,
    Forbidden,
    JobNotQueued,
    NotFound,
    ReportConflict,
    StaleAttempt,
    ValidationFailed,
    WMSError,
    WrongDevice,
)
from wms.kicks import kick_dispatch, kick_finalize
from wms.locations import LocationError, canonical_url
from wms.statemachine import TransitionResult, apply_transition, apply_transition_bulk

log = structlog.get_logger(__name__)


def job_transition(*, job_id: int, target: str, source: str, reason: str = "") -> TransitionResult:
    result = apply_transition(Job, job_id, target, source=source, reason=reason)
    if result.won:
        log.info(
            "job_state_changed",
            job_id=job_id,
            from_state=result.from_state,
            to_state=target,
            source=source,
        )
    return result


@transaction.atomic
def job_cancel(*, job_id: int, source: str, reason: str = "") -> TransitionResult:
    """Cancel one job (idempotent; a finished or failed job answers 409).

    A running attempt is marked cancelled with the time the kill was asked for, and its pilot
    gets a ``kill_job`` command (published to its command queue after commit, and carried by
    its next heartbeat). The pilot's final report of the attempt records the kill's
    acknowledgement (``kill_acked_at``).
    """
    if not Job.objects.filter(pk=job_id).exists():
        raise NotFound(f"Job {job_id} does not exist.")
    now = timezone.now()
    result = apply_transition(
        Job, job_id, JobState.CANCELLED, source=source, reason=reason, updates={"time_end": now}
    )
    if result.won and result.from_state == JobState.RUNNING:
        _kill_running_attempts([job_id], now=now, reason=reason or f"job cancelled ({source})")
    if result.won:
        log.info("job_cancelled", job_id=job_id, from_state=result.from_state, source=source)
        kick_finalize_tasks(Job.objects.filter(pk=job_id).values_list("task_id", flat=True))
    return result


@transaction.atomic
def jobs_cancel(*, job_ids: Iterable[int], source: str, reason: str = "") -> int:
    """Cancel many jobs in bulk; jobs already final are skipped. Returns how many were cancelled.

    Per chunk: the rows are locked (``FOR UPDATE``, waiting for a pilot's start in flight),
    then one UPDATE + one bulk insert of transition rows per source state, one UPDATE of the
    running attempts and one insert of their pilots' kill commands. A constant number of
    queries per 5,000 jobs.
    """
    ids = list(job_ids)
    now = timezone.now()
    cancelled = 0
    open_states = OPEN_JOB_STATES
    for start in range(0, len(ids), 5000):
        rows = list(
            Job.objects.select_for_update()
            .filter(pk__in=ids[start : start + 5000], state__in=open_states)
            .order_by("pk")
            .values_list("pk", "state")
        )
        by_state: dict[str, list[int]] = {}
        for pk, state in rows:
            by_state.setdefault(state, []).append(pk)
        for state, pks in by_state.items():
            cancelled += len(
                apply_transition_bulk(
                    Job,
                    pks,
                    JobState.CANCELLED,
                    from_state=state,
                    source=source,
                    reason=reason,
                    updates={"time_end": now},
                    locked=True,
                )
            )
        running = by_state.get(JobState.RUNNING, [])
        if running:
            _kill_running_attempts(running, now=now, reason=reason or f"job cancelled ({source})")
    if cancelled:
        log.info("jobs_cancelled", count=cancelled, source=source)
        kick_finalize_tasks(
            Job.objects.filter(pk__in=ids, state=JobState.CANCELLED)
            .order_by()  # no default ordering in the DISTINCT: one row per task
            .values_list("task_id", flat=True)
            .distinct()
        )
    return cancelled


def kick_finalize_tasks(task_ids: Iterable[int]) -> None:
    """After commit, ask the finalizer to look at these tasks (a job of each became final).
    Many tasks at once: one kick for every task (the finalizer's cycle)."""
    ids = sorted(set(task_ids))
    if len(ids) > 20:
        kick_finalize()
        return
    for task_id in ids:
        kick_finalize(task_id=task_id)


FINALIZE_KICK_BELOW = 100  # open jobs left in a task under which its final reports kick


def _nearly_done(task_ids: set[int]) -> list[int]:
    """Of these tasks (a job of each just became final), those with fewer than
    ``FINALIZE_KICK_BELOW`` open jobs left: only their reports kick the finalizer. Before that a
    report cannot end its task, and a kick per report cost the web app a publish with confirms
    and a worker a finalizer run, for every job. The margin covers concurrent reports of a
    task's last jobs (each still sees the others' jobs open); the finalizer's beat catches
    anything left. One small indexed count per task (``job_task_state``)."""
    if len(task_ids) > 20:  # kick_finalize sends one kick for all of them anyway
        return list(task_ids)
    return [
        task_id
        for task_id in task_ids
        if Job.objects.filter(task_id=task_id, state__in=OPEN_JOB_STATES)[
            :FINALIZE_KICK_BELOW
        ].count()
        < FINALIZE_KICK_BELOW
    ]


# --- hold / release -----------------------------------------------------------------------------


@transaction.atomic
def job_hold(*, job_id: int, source: str, reason: str = "") -> TransitionResult:
    """Hold a job not yet running (defined or queued → held): it is not dispatched, and the
    message of a queued job, still in its queue, is refused at start (409 job_not_queued).
    Holding a held job is a no-op; any other state answers 409."""
    return job_transition(job_id=job_id, target=JobState.HELD, source=source, reason=reason)


@transaction.atomic
def job_release(*, job_id: int, source: str, reason: str = "") -> TransitionResult:
    """Release a held job (held → defined): the executor dispatches it again (kicked).
    Releasing a job that is not held answers 409 (a defined job: a no-op)."""
    result = apply_transition(
        Job, job_id, JobState.DEFINED, source=source, reason=reason, only_from=(JobState.HELD,)
    )
    if result.won:
        log.info("job_released", job_id=job_id, source=source)

        kick_dispatch()
    return result


def _jobs_move(
    ids: list[int], target: str, sources: Sequence[str], *, source: str, reason: str
) -> int:
    moved = 0
    for start in range(0, len(ids), 5000):
        rows = list(
            Job.objects.select_for_update()
            .filter(pk__in=ids[start : start + 5000], state__in=sources)
            .order_by("pk")
            .values_list("pk", "state")
        )
        by_state: dict[str, list[int]] = defaultdict(list)
        for pk, state in rows:
            by_state[state].append(pk)
        for state, pks in by_state.items():
            moved += len(
                apply_transition_bulk(
                    Job, pks, target, from_state=state, source=source, reason=reason, locked=True
                )
            )
    return moved


@transaction.atomic
def jobs_hold(*, job_ids: Iterable[int], source: str, reason: str = "") -> int:
    """Hold many jobs: those defined or queued become held, the others are skipped.
    Returns how many were held."""
    n = _jobs_move(
        list(job_ids),
        JobState.HELD,
        (JobState.DEFINED, JobState.QUEUED),
        source=source,
        reason=reason,
    )
    if n:
        log.info("jobs_held", count=n, source=source)
    return n


@transaction.atomic
def jobs_release(*, job_ids: Iterable[int], source: str, reason: str = "") -> int:
    """Release many jobs: those held become defined (the executor is kicked), the others are
    skipped. Returns how many were released."""
    n = _jobs_move(list(job_ids), JobState.DEFINED, (JobState.HELD,), source=source, reason=reason)
    if n:
        log.info("jobs_released", count=n, source=source)
        kick_dispatch()
    return n


def _kill_running_attempts(job_ids: list[int], *, now: Any, reason: str) -> int:
    """The running attempts of these (just cancelled) jobs: cancelled, and announced
    (``jobs.signals.attempts_to_kill``, in this transaction) so that each one's pilot gets a
    kill command. Three queries, whatever the number."""
    rows = list(
        JobAttempt.objects.filter(job_id__in=job_ids, state=AttemptState.RUNNING).values(
            "pk", "job_id", "job__uuid", "number", "pilot_id"
        )
    )
    if not rows:
        return 0
    JobAttempt.objects.filter(pk__in=[r["pk"] for r in rows]).update(
        state=AttemptState.CANCELLED, kill_requested_at=now, ended_at=now
    )
    attempts_to_kill.send(
        sender=JobAttempt,
        orders=[
            KillOrder(
                pilot_id=r["pilot_id"],
                job_id=r["job_id"],
                job_uuid=str(r["job__uuid"]),
                attempt=r["number"],
                reason=reason,
            )
            for r in rows
            if r["pilot_id"] is not None
        ],
    )
    return len(rows)


# --- the pilot protocol: start (the pilot's side is pilots.protocol.pilot_job_start) -----------


@dataclass(frozen=True)
class Claim:
    """What :func:`job_claim` did: ``message`` is the job message to run (``None``: the
    start was refused and the job went back to wait, ``task_paused``); ``started`` says a
    new attempt began (``False`` for the same start sent again)."""

    message: JobMessage | None
    started: bool


def job_claim(*, pilot_id: int, device_type: str, job_uuid: uuid.UUID | str, attempt: int) -> Claim:
    """The job's half of a pilot's start (``pilots.protocol.pilot_job_start`` holds the
    pilot's row locked around it, in the same transaction): the job's row is locked
    (``FOR UPDATE``) and claimed for this attempt. Refused (409, nothing written):

    - ``stale_attempt``: the message is of another attempt than the job's ``cur_retry``;
    - ``wrong_device``: the job needs another device type than the pilot's;
    - ``job_not_queued``: cancelled, finished, failed, running (with another pilot or
      attempt), or back to ``defined``.

    The job's task paused: nothing is started and the job goes back ``queued → defined``
    (``Claim(None, False)``; the caller refuses with ``task_paused`` once that committed).
    The same start again, once this attempt runs with this pilot (its answer was lost on the
    way), answers the same job message and writes nothing. Else the job is ``running`` with
    this pilot and ``time_start``, and the attempt row exists (``attempt_unique_number`` and
    ``attempt_one_running_per_job`` are the last line of defence). A constant number of
    queries.
    """
    try:
        uid = job_uuid if isinstance(job_uuid, uuid.UUID) else uuid.UUID(str(job_uuid))
    except ValueError as exc:
        raise NotFound(f"Job {job_uuid} does not exist.") from exc
    job = (
        Job.objects.select_for_update(of=("self",))
        .filter(uuid=uid)
        # the job message is built from this row and its task's (joined, not locked)
        .values("state", "pilot_id", "task__state", *MESSAGE_COLUMNS, *_MESSAGE_TASK_COLUMNS)
        .order_by()
        .first()
    )
    if job is None:
        raise NotFound(f"Job {uid} does not exist.")
    if attempt != job["cur_retry"]:
        raise StaleAttempt(
            f"Job {uid} is at attempt {job['cur_retry']}; this message is of attempt {attempt}."
        )
    if job["device_type"] != device_type:
        raise WrongDevice(
            f"Job {uid} needs a {job['device_type']} pilot; this one is {device_type}."
        )
    if job["state"] != JobState.QUEUED:
        if not _started_by(job, pilot_id=pilot_id, attempt=attempt):
            raise JobNotQueued(f"Job {uid} is {job['state']}, not queued.")
        # the same start again (its answer was lost): the same answer, nothing written
        log.info("job_start_repeated", job_id=job["id"], attempt=attempt, pilot_id=pilot_id)
        return Claim(_start_message(job), started=False)
    source = f"pilot:{pilot_id}"
    if job["task__state"] == TaskState.PAUSED:
        # Pause means no new starts: the job waits again (the task's row is read, not locked:
        # a start that read it before the pause committed is a start before the pause).
        apply_transition(
            Job,
            job["id"],
            JobState.DEFINED,
            source=source,
            reason=f"start of attempt {attempt} refused: the task is paused",
            only_from=(JobState.QUEUED,),
            locked_state=job["state"],
        )
        log.info(
            "job_start_refused_task_paused", job_id=job["id"], attempt=attempt, pilot_id=pilot_id
        )
        return Claim(None, started=False)
    now = timezone.now()
    apply_transition(  # the row is locked: its state is not read again
        Job,
        job["id"],
        JobState.RUNNING,
        source=source,
        reason=f"attempt {attempt} started",
        updates={"pilot_id": pilot_id, "time_start": now, "time_end": None},
        only_from=(JobState.QUEUED,),
        locked_state=job["state"],
    )
    JobAttempt.objects.create(job_id=job["id"], number=attempt, pilot_id=pilot_id, started_at=now)
    log.info("job_started", job_id=job["id"], attempt=attempt, pilot_id=pilot_id)
    # The message's columns are unchanged by the start: no second read.
    return Claim(_start_message(job), started=True)


def _started_by(job: dict[str, Any], *, pilot_id: int, attempt: int) -> bool:
    """Whether this attempt of the job (locked, at ``cur_retry == attempt``) already runs with
    this pilot: a start sent again after its answer was lost (docs/pilot-api.md)."""
    return (
        job["state"] == JobState.RUNNING
        and job["pilot_id"] == pilot_id
        and JobAttempt.objects.filter(
            job_id=job["id"], number=attempt, pilot_id=pilot_id, state=AttemptState.RUNNING
        ).exists()
    )


def _start_message(job: dict[str, Any]) -> JobMessage:
    """The job message of a started job, from the row :func:`job_claim` read."""
    task = {"id": job["task_id"]}
    for column in _MESSAGE_TASK_COLUMNS:
        task[column.removeprefix("task__")] = job.pop(column)
    del job["state"], job["pilot_id"], job["task__state"]
    return build_messages([job["id"]], jobs=[job], tasks={task["id"]: task})[0]


_MESSAGE_TASK_COLUMNS = ("task__data_out_url", "task__data_out_uid")


# --- the pilot protocol: status events ----------------------------------------------------------


def _raise_refused(outcome: EventOutcome) -> None:
    for exc_class in (ValidationFailed, NotFound, Forbidden, ReportConflict, Conflict):
        if outcome.error == exc_class.code:
            raise exc_class(outcome.detail)
    raise WMSError(outcome.detail, code=outcome.error)


def job_report(
    *, pilot_id: int, job_uuid: uuid.UUID | str, event: Mapping[str, Any]
) -> EventOutcome:
    """One status event of one job from its pilot (REST ``report``): the single-event form of
    :func:`job_events_apply`. A refused event raises (400, 403, 404, 409 ``report_conflict``);
    nothing is written."""
    cleaned = clean_event(event, pilot_id=pilot_id, job_uuid=job_uuid)  # the URL's job
    (outcome,) = job_events_apply(events=[cleaned], pilot_id=pilot_id)
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


@dataclass
class _FileRow:
    job_id: int
    task_id: int
    name: str  # the name in FILE_DAT and, if registered, in the DSM
    type: str
    size: int
    check_sum: str
    url: str
    status: str
    register: bool  # into the task's output dataset
    started_at: Any
    dataset_uid: uuid.UUID | None = None


_JOB_COLUMNS = ("id", "uuid", "state", "cur_retry", "retries", "task_id", "task__data_out_url")


def _event_files(
    ev: StatusEvent, job: dict[str, Any], att: _Attempt, *, finished: bool
) -> list[_FileRow]:
    """The FILE_DAT rows of a final report. A finished attempt's outputs and every log go to
    the task's output dataset; outputs of an attempt that did not finish are kept as
    ``partial`` rows only (a retry writes them again under the same names)."""
    rows = []
    for out in ev.outputs:
        is_log = out["type"] == FileType.LOG
        register = finished or is_log
        if is_log or not finished:
            name = f"{job['uuid']}/{ev.attempt}/{out['name']}"
        else:
            name = f"{job['uuid']}/{out['name']}"
        rows.append(
            _FileRow(
                job_id=job["id"],
                task_id=job["task_id"],
                name=name,
                type=out["type"],
                size=out["size"],
                check_sum=out["check_sum"],
                url=out["url"],
                status=FileStatus.READY if register else FileStatus.PARTIAL,
                register=register,
                started_at=att.started_at,
            )
        )
    return rows


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


def _register_outputs(files: list[_FileRow], now: Any) -> dict[tuple[uuid.UUID, str], int | None]:
    """Register the files in their tasks' output datasets through the DSM; one call per
    dataset. Returns (dataset uid, name) → local catalogue entry id (None with an external
    DSM, whose ids are not the local catalogue's). A closed dataset leaves its files
    ``failed``; a name already there (a write of an external DSM whose answer was lost) is
    taken as registered."""
    by_dataset: dict[uuid.UUID, list[_FileRow]] = defaultdict(list)
    for f in files:
        if f.register and f.dataset_uid is not None:
            by_dataset[f.dataset_uid].append(f)
    entries: dict[tuple[uuid.UUID, str], int | None] = {}
    if not by_dataset:
        return entries
    dsm = get_dsm()
    try:
        local = dsm.catalogue_is_local

        def register(uid: uuid.UUID, specs: list[dict[str, Any]]) -> list[tuple[int, str]]:
            return [(info.id, info.name) for info in dsm.register_files(uid, specs)]

        for uid, group in by_dataset.items():
            specs = [
                {"name": f.name, "size": f.size, "check_sum": f.check_sum, "url": f.url}
                for f in group
            ]
            try:
                infos = register(uid, specs)
            except (DatasetClosed, ValidationFailed) as exc:
                log.error("outputs_not_registered", dataset_uid=str(uid), detail=str(exc.detail))
                for f in group:
                    f.status = FileStatus.FAILED
                continue
            except Conflict:
                infos = []
                for spec in specs:
                    try:
                        infos.extend(register(uid, [spec]))
                    except Conflict:
                        log.warning(
                            "output_already_registered", dataset_uid=str(uid), name=spec["name"]
                        )
            except NotFound:
                log.error("output_dataset_missing", dataset_uid=str(uid))
                for f in group:
                    f.status = FileStatus.FAILED
                continue
            for entry_id, name in infos:
                entries[(uid, name)] = entry_id if local else None
    finally:
        dsm.close()
    return entries


@transaction.atomic
def job_events_apply(
    *, events: Sequence[Mapping[str, Any] | StatusEvent], pilot_id: int | None = None
) -> list[EventOutcome]:
    """Apply pilots' status events; one outcome per event, in order. THE write path of
    attempt reports: REST ``report`` (:func:`job_report`), the bulk ``events`` endpoint, the
    bus consumer and the heartbeat's running metrics all come here.

    ``pilot_id`` is the authenticated pilot (REST): every event is its own. Without it (the
    bus) each event names its pilot, whose signature the consumer checked
    (``pilots.consumer``). Per event:

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

    A batch is one transaction with a bounded number of queries, whatever its size: the jobs
    with a final event are locked (``FOR UPDATE``, in id order), attempts are read in one
    query, running metrics written with one bulk UPDATE (guarded by ``state = running``),
    ended attempts with another, FILE_DAT rows with one INSERT, job transitions with one
    UPDATE per target state. A DSM failure (``DSMError``) fails the whole batch (retry later).
    """
    results: list[EventOutcome | None] = [None] * len(events)
    cleaned: list[tuple[int, StatusEvent]] = []
    for i, raw in enumerate(events):
        try:
            cleaned.append((i, clean_event(raw, pilot_id=pilot_id)))
        except ValidationFailed as exc:
            results[i] = EventOutcome.refused(raw, exc)
    if cleaned:
        attempts_reclaim_reported([ev for _, ev in cleaned])  # a lost pilot's late results
        _apply_events(cleaned, results)
    return results  # type: ignore[return-value]


def _apply_events(
    cleaned: list[tuple[int, StatusEvent]], results: list[EventOutcome | None]
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
    files: list[_FileRow] = []
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
            files.extend(_event_files(ev, job, att, finished=finished))
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
            files.extend(_event_files(ev, job, att, finished=False))
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
    if files:
        # Last: registering in the DSM locks the output dataset's row until commit, and every
        # report of the task's jobs waits for that lock.
        _store_files(files, now)
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
        kick_finalize_tasks(_nearly_done(ended_tasks))


def _place(places: dict[int, str], job: dict[str, Any]) -> str:
    """The canonical output URL of a job's task ("" when it has none or it is unreadable)."""
    task_id = job["task_id"]
    if task_id not in places:
        try:
            places[task_id] = canonical_url(job["task__data_out_url"] or "")
        except LocationError:
            places[task_id] = ""
    return places[task_id]


def _store_files(files: list[_FileRow], now: Any) -> None:
    """FILE_DAT rows of reported files (one INSERT), registered in the tasks' output datasets
    (one DSM call per dataset), and the jobs' ``file_out`` / ``file_log`` (one UPDATE, two
    when some jobs have a log and no output)."""
    # The task's output dataset, and its row in the local catalogue if there is one (the
    # ``http`` DSM's datasets may have none), in one query.
    local_dataset = Dataset.objects.filter(uid=OuterRef("data_out_uid")).values("id")[:1]
    dataset_ids: dict[uuid.UUID, int | None] = {}
    out_uids: dict[int, uuid.UUID | None] = {}
    for task_id, uid, dataset_id in (
        task_model()
        .objects.filter(pk__in={f.task_id for f in files})
        .annotate(out_dataset_id=Subquery(local_dataset))
        .values_list("id", "data_out_uid", "out_dataset_id")
    ):
        out_uids[task_id] = uid
        if uid is not None:
            dataset_ids[uid] = dataset_id
    for f in files:
        f.dataset_uid = out_uids.get(f.task_id)
    entries = _register_outputs(files, now)
    rows = files_build(
        [
            NewFile(
                file_name=f.name,
                type=f.type,
                size=f.size,
                status=f.status,
                check_sum=f.check_sum,
                url=f.url,
                job_id=f.job_id,
                task_id=f.task_id,
                dataset_id=dataset_ids.get(f.dataset_uid)
                if f.register and f.dataset_uid is not None
                else None,
                entry_id=entries.get((f.dataset_uid, f.name))
                if f.dataset_uid is not None
                else None,
                time_start=f.started_at,
                time_end=now,
            )
            for f in files
        ],
        now=now,
        batch_size=1000,
    )
    file_out: dict[int, int] = {}
    file_log: dict[int, int] = {}
    for f, row_id in zip(files, rows, strict=True):
        if f.type == FileType.LOG:
            file_log[f.job_id] = row_id
        elif f.status == FileStatus.READY:
            file_out.setdefault(f.job_id, row_id)
    both = [(j, out, file_log[j]) for j, out in file_out.items() if j in file_log]
    db.update_rows(Job, ("file_out", "file_log"), both)
    db.update_rows(Job, ("file_out",), [(j, o) for j, o in file_out.items() if j not in file_log])
    db.update_rows(Job, ("file_log",), [(j, lg) for j, lg in file_log.items() if j not in file_out])


# --- the end of a pilot: its running attempts ---------------------------------------------------


@dataclass(frozen=True)
class InterruptResult:
    attempts: int = 0
    retried: int = 0
    failed: int = 0


@transaction.atomic
def attempts_interrupt(
    *,
    attempt_state: str,
    error_code: str,
    error_message: str,
    source: str,
    pilot_ids: Sequence[int] | None = None,
    pilot_states: Sequence[str] | None = None,
    attempt_ids: Sequence[int] | None = None,
    skip_locked: bool = False,
    limit: int = 10_000,
) -> InterruptResult:
    """End the running attempts of some pilots (by id, or every pilot in some states) without
    a report from them: ``attempt_state`` (``failed`` or ``lost``) with ``error_code``.
    ``attempt_ids`` narrows it to some of their attempts (``pilots.reconcile``: not on the pilot).

    Their jobs (locked ``FOR UPDATE``, ``SKIP LOCKED`` for the reaper) go back to ``defined``
    with ``cur_retry + 1`` while retries are left, else to ``failed``; the executor is kicked.
    A constant number of queries per call (at most ``limit`` jobs).
    """
    if pilot_ids is None and pilot_states is None:
        raise ValueError("attempts_interrupt needs pilot_ids or pilot_states")
    if attempt_state not in (AttemptState.FAILED, AttemptState.LOST):
        raise ValueError(f"attempt_state must be failed or lost, not {attempt_state!r}")
    # ONE filter() call: every condition on ``attempts`` applies to the same attempt row (a
    # second call would join attempts again and match a job by any of its old attempts).
    attempt_is: dict[str, Any] = {
        "attempts__state": AttemptState.RUNNING,
        "attempts__number": F("cur_retry"),
    }
    if pilot_ids is not None:
        attempt_is["attempts__pilot_id__in"] = list(pilot_ids)
    if pilot_states is not None:
        attempt_is["attempts__pilot__state__in"] = list(pilot_states)
    if attempt_ids is not None:
        attempt_is["attempts__id__in"] = list(attempt_ids)
    rows = list(
        Job.objects.filter(state=JobState.RUNNING, **attempt_is)
        .select_for_update(skip_locked=skip_locked, of=("self",))
        .order_by("id")
        .values_list("id", "cur_retry", "retries", "attempts__id")[:limit]
    )
    if not rows:
        return InterruptResult()
    now = timezone.now()
    n = JobAttempt.objects.filter(
        pk__in=[attempt for _, _, _, attempt in rows], state=AttemptState.RUNNING
    ).update(
        state=attempt_state,
        error_code=error_code,
        error_message=error_message,
        ended_at=now,
    )
    retry = [pk for pk, cur, allowed, _ in rows if cur < allowed]
    fail = [pk for pk, cur, allowed, _ in rows if cur >= allowed]
    apply_transition_bulk(
        Job,
        retry,
        JobState.DEFINED,
        from_state=JobState.RUNNING,
        source=source,
        reason=f"attempt {attempt_state} ({error_code}); retry",
        updates={"cur_retry": F("cur_retry") + 1},
        locked=True,
    )
    apply_transition_bulk(
        Job,
        fail,
        JobState.FAILED,
        from_state=JobState.RUNNING,
        source=source,
        reason=f"attempt {attempt_state} ({error_code}); no retry left",
        updates={"time_end": now},
        locked=True,
    )
    log.info(
        "attempts_interrupted",
        attempts=n,
        retried=len(retry),
        failed=len(fail),
        error_code=error_code,
        source=source,
    )
    if retry:
        kick_dispatch()
    if fail:
        kick_finalize_tasks(
            Job.objects.filter(pk__in=fail).order_by().values_list("task_id", flat=True).distinct()
        )
    return InterruptResult(attempts=n, retried=len(retry), failed=len(fail))
