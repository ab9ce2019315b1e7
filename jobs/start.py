"""The job's half of a pilot's start (docs/pilot-api.md): :func:`jobs_claim`, the atomic
claim of ``queued`` jobs' current attempts in one set-based step, and the job messages it
answers; :func:`job_claim` is its one-job form. The pilot's half is
``pilots.protocol.pilot_jobs_start``."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from django.utils import timezone

from jobs.executor import MESSAGE_COLUMNS, build_messages
from jobs.models import AttemptState, Job, JobAttempt, JobState
from wms import db
from wms.choices import TaskState
from wms.contract import JobMessage
from wms.exceptions import (
    JobNotQueued,
    NotFound,
    StaleAttempt,
    TaskPaused,
    WMSError,
    WrongDevice,
)
from wms.statemachine import apply_transition_bulk

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Claim:
    """What the claim of one start did: ``message`` is the job message to run; ``started``
    says a new attempt began (``False`` for the same start sent again); ``refusal`` is why
    nothing was started (``message`` is then ``None``). A ``task_paused`` refusal changed one
    thing: the job went back ``queued → defined``."""

    message: JobMessage | None
    started: bool
    refusal: WMSError | None = None


def job_claim(*, pilot_id: int, device_type: str, job_uuid: uuid.UUID | str, attempt: int) -> Claim:
    """One start: :func:`jobs_claim` of one job. A refusal other than ``task_paused`` (which
    is returned, its change kept) raises, and nothing is written."""
    (claim,) = jobs_claim(pilot_id=pilot_id, device_type=device_type, starts=[(job_uuid, attempt)])
    if claim.refusal is not None and not isinstance(claim.refusal, TaskPaused):
        raise claim.refusal
    return claim


def jobs_claim(
    *, pilot_id: int, device_type: str, starts: Sequence[tuple[uuid.UUID | str, int]]
) -> list[Claim]:
    """The job's half of a pilot's starts (``pilots.protocol.pilot_jobs_start`` holds the
    pilot's row locked around it, in the same transaction); one :class:`Claim` per start, in
    order. The jobs' rows are locked (``FOR UPDATE``, in id order, one statement) and each is
    claimed for its attempt, or refused alone (nothing of it written):

    - ``not_found``: no such job (or not a uuid);
    - ``stale_attempt``: the message is of another attempt than the job's ``cur_retry``;
    - ``wrong_device``: the job needs another device type than the pilot's;
    - ``job_not_queued``: cancelled, finished, failed, running (with another pilot or
      attempt), back to ``defined``, or named twice in one call;
    - ``task_paused``: nothing is started and the job goes back ``queued → defined``, to be
      dispatched again when the task is resumed (a start that read the task before the pause
      committed is a start before the pause: the task's row is read, not locked).

    The same start again, once this attempt runs with this pilot (its answer was lost on the
    way), answers the same job message and writes nothing. Else the job is ``running`` with
    this pilot and ``time_start``, and its attempt row exists (``attempt_unique_number`` and
    ``attempt_one_running_per_job`` are the last line of defence).

    A constant number of statements whatever the number of starts: the locking read, the
    running attempts of repeated starts, one UPDATE and one transition INSERT per target
    state (``running``, ``defined``), one INSERT of the attempts, one read of the inputs.
    """
    claims: list[Claim | None] = [None] * len(starts)
    wanted: dict[uuid.UUID, int] = {}  # job uuid -> index of its start in this call
    for i, (raw, _attempt) in enumerate(starts):
        try:
            uid = raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw))
        except ValueError:
            claims[i] = _refused(NotFound(f"Job {raw} does not exist."))
            continue
        if uid in wanted:
            claims[i] = _refused(JobNotQueued(f"Job {uid} is named twice in this call."))
            continue
        wanted[uid] = i
    rows: dict[uuid.UUID, dict[str, Any]] = {}
    if wanted:
        for row in (
            Job.objects.select_for_update(of=("self",))
            .filter(**db.in_values("uuid", wanted))
            # the job messages are built from these rows and their tasks' (joined, not locked)
            .values("state", "pilot_id", "task__state", *MESSAGE_COLUMNS, *_MESSAGE_TASK_COLUMNS)
            .order_by("id")
        ):
            rows[row["uuid"]] = row
    source = f"pilot:{pilot_id}"
    to_start: list[dict[str, Any]] = []
    to_pause: list[dict[str, Any]] = []
    repeated: list[dict[str, Any]] = []
    for uid, i in wanted.items():
        attempt = starts[i][1]
        job = rows.get(uid)
        if job is None:
            claims[i] = _refused(NotFound(f"Job {uid} does not exist."))
        elif attempt != job["cur_retry"]:
            claims[i] = _refused(
                StaleAttempt(
                    f"Job {uid} is at attempt {job['cur_retry']}; this message is of attempt "
                    f"{attempt}."
                )
            )
        elif job["device_type"] != device_type:
            claims[i] = _refused(
                WrongDevice(
                    f"Job {uid} needs a {job['device_type']} pilot; this one is {device_type}."
                )
            )
        elif job["state"] != JobState.QUEUED:
            if job["state"] == JobState.RUNNING and job["pilot_id"] == pilot_id:
                repeated.append(job)  # its attempt row says whether this start is the same
            else:
                claims[i] = _refused(JobNotQueued(f"Job {uid} is {job['state']}, not queued."))
        elif job["task__state"] == TaskState.PAUSED:
            to_pause.append(job)
        else:
            to_start.append(job)
    if repeated:
        running = set(
            JobAttempt.objects.filter(
                **db.in_values("job_id", [j["id"] for j in repeated]),
                pilot_id=pilot_id,
                state=AttemptState.RUNNING,
            ).values_list("job_id", "number")
        )
        for job in repeated:
            if (job["id"], job["cur_retry"]) not in running:
                i = wanted[job["uuid"]]
                claims[i] = _refused(
                    JobNotQueued(f"Job {job['uuid']} is {job['state']}, not queued.")
                )
        repeated = [j for j in repeated if claims[wanted[j["uuid"]]] is None]
        if repeated:  # the same starts again (their answers were lost): nothing written
            log.info(
                "job_starts_repeated",
                job_ids=[j["id"] for j in repeated][:20],
                count=len(repeated),
                pilot_id=pilot_id,
            )
    if to_pause:
        # Pause means no new starts: the jobs wait again.
        apply_transition_bulk(
            Job,
            [j["id"] for j in to_pause],
            JobState.DEFINED,
            source=source,
            reason="start refused: the task is paused",
            from_state=JobState.QUEUED,
            locked=True,
        )
        for job in to_pause:
            claims[wanted[job["uuid"]]] = Claim(
                None,
                started=False,
                refusal=TaskPaused(
                    f"The task of job {job['uuid']} is paused: attempt {job['cur_retry']} is "
                    "not started; the job waits for the task's resume."
                ),
            )
        log.info(
            "job_starts_refused_task_paused",
            job_ids=[j["id"] for j in to_pause][:20],
            count=len(to_pause),
            pilot_id=pilot_id,
        )
    if to_start:
        now = timezone.now()
        apply_transition_bulk(  # the rows are locked: their states are not read again
            Job,
            [j["id"] for j in to_start],
            JobState.RUNNING,
            source=source,
            reason="attempt started",
            updates={"pilot_id": pilot_id, "time_start": now, "time_end": None},
            from_state=JobState.QUEUED,
            locked=True,
        )
        JobAttempt.objects.bulk_create(
            [
                JobAttempt(job_id=j["id"], number=j["cur_retry"], pilot_id=pilot_id, started_at=now)
                for j in to_start
            ],
            batch_size=1000,
        )
        log.info(
            "jobs_started",
            job_ids=[j["id"] for j in to_start][:20],
            count=len(to_start),
            pilot_id=pilot_id,
        )
    # The messages' columns are unchanged by the start: no second read; one read of inputs.
    answered = [*repeated, *to_start]
    messages = _start_messages(answered)
    started_ids = {j["id"] for j in to_start}
    for job, message in zip(answered, messages, strict=True):
        claims[wanted[job["uuid"]]] = Claim(message, started=job["id"] in started_ids)
    return claims  # type: ignore[return-value]


def _refused(exc: WMSError) -> Claim:
    return Claim(None, started=False, refusal=exc)


def _start_messages(jobs: list[dict[str, Any]]) -> list[JobMessage]:
    """The job messages of started jobs, from the rows :func:`jobs_claim` read."""
    if not jobs:
        return []
    tasks: dict[int, dict[str, Any]] = {}
    columns = []
    for job in jobs:
        task = {"id": job["task_id"]}
        for column in _MESSAGE_TASK_COLUMNS:
            task[column.removeprefix("task__")] = job[column]
        tasks[task["id"]] = task
        columns.append({c: job[c] for c in MESSAGE_COLUMNS})
    return build_messages([j["id"] for j in jobs], jobs=columns, tasks=tasks)


_MESSAGE_TASK_COLUMNS = ("task__data_out_url", "task__data_out_uid")
