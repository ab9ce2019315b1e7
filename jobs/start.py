"""The job's half of a pilot's start (docs/pilot-api.md): :func:`job_claim`, the atomic
claim of a ``queued`` job's current attempt, and the job message it answers. The pilot's
half is ``pilots.protocol.pilot_job_start``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from django.utils import timezone

from jobs.executor import MESSAGE_COLUMNS, build_messages
from jobs.models import AttemptState, Job, JobAttempt, JobState
from wms.choices import TaskState
from wms.contract import JobMessage
from wms.exceptions import JobNotQueued, NotFound, StaleAttempt, WrongDevice
from wms.statemachine import apply_transition

log = structlog.get_logger(__name__)


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
