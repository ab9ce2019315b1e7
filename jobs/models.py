"""JOB_DAT and the attempt history: one job of a task, and every attempt at running it."""

import uuid
from typing import Any

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from wms.choices import DeviceType, Mode
from wms.models import TransitionLog
from wms.statemachine import StateMachine


class JobState(models.TextChoices):
    DEFINED = "defined", "defined"
    QUEUED = "queued", "queued"
    HELD = "held", "held"
    RUNNING = "running", "running"
    FINISHED = "finished", "finished"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


JS = JobState
JOB_MACHINE = StateMachine(
    entity="job",
    states=JobState,
    transitions={
        # defined -> running (and queued -> running): a lost attempt reclaimed by its pilot,
        # heard from again before the job's next attempt started (pilots.reconcile)
        JS.DEFINED: frozenset({JS.QUEUED, JS.RUNNING, JS.HELD, JS.CANCELLED}),
        # queued -> defined: the message could not be published (or was dropped); dispatch again
        # queued -> held: the message stays in its queue, and a pilot's start of it answers 409
        JS.QUEUED: frozenset({JS.RUNNING, JS.DEFINED, JS.HELD, JS.CANCELLED}),
        # held -> defined: released, the executor dispatches it again
        JS.HELD: frozenset({JS.DEFINED, JS.CANCELLED}),
        # running -> defined: a failed attempt with retries left goes round again
        JS.RUNNING: frozenset({JS.FINISHED, JS.FAILED, JS.DEFINED, JS.CANCELLED}),
        JS.FINISHED: frozenset(),
        # failed -> defined: a user's retry of the task's failed jobs (one more retry allowed)
        JS.FAILED: frozenset({JS.DEFINED}),
        JS.CANCELLED: frozenset(),
    },
    final=frozenset({JS.FINISHED, JS.FAILED, JS.CANCELLED}),
)

# A job in one of these states has ended (failed may be re-opened by a retry of its task).
FINAL_JOB_STATES = (JS.FINISHED, JS.FAILED, JS.CANCELLED)
# A job in one of these states may still run: not ended.
OPEN_JOB_STATES = (JS.DEFINED, JS.QUEUED, JS.HELD, JS.RUNNING)


def task_model() -> Any:
    """The task model, reached through ``Job.task`` (declared by name): the jobs app reads its
    tasks' rows (output location, state) without importing ``tasks``, which sits above it."""
    return Job._meta.get_field("task").related_model


class Job(models.Model):
    STATE_MACHINE = JOB_MACHINE
    TRANSITION_MODEL = "jobs.JobTransition"

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # FK indexes are chosen by hand (db_index=False + the Meta indexes): every index costs
    # on each of the 10^5 rows a split inserts. (task, state) serves "jobs of a task".
    task = models.ForeignKey(
        "tasks.Task", on_delete=models.CASCADE, related_name="jobs", db_index=False
    )
    parent_job = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="children",
        db_index=False,
        help_text="The merge job that consumes this job's outputs.",
    )
    file_in = models.ForeignKey(
        "files.File",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,
    )
    file_out = models.ForeignKey(
        "files.File",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,
    )
    file_log = models.ForeignKey(
        "files.File",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,
    )
    executable = models.CharField(max_length=255)
    args = models.CharField(max_length=1024, blank=True, default="")
    rank = models.SmallIntegerField(default=0)
    state = models.CharField(max_length=20, choices=JobState.choices, default=JobState.DEFINED)
    retries = models.PositiveSmallIntegerField(default=3, validators=[MaxValueValidator(100)])
    cur_retry = models.PositiveSmallIntegerField(default=0)
    device_type = models.CharField(max_length=3, choices=DeviceType.choices, default=DeviceType.CPU)
    mode = models.CharField(max_length=5, choices=Mode.choices, default=Mode.MAP)
    level = models.PositiveSmallIntegerField(
        default=0,
        db_default=0,  # the splitter's COPY leaves it out
        help_text="0: a map job; 1, 2, ...: a merge job of that level of the tree.",
    )
    time_start = models.DateTimeField(null=True, blank=True)
    time_end = models.DateTimeField(null=True, blank=True)
    pilot = models.ForeignKey(
        "pilots.Pilot",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="jobs",
        db_index=False,
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    state_changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(cur_retry__lte=models.F("retries")), name="job_cur_retry_le_retries"
            ),
        ]
        indexes = [
            # The polled states get partial indexes, so claim cost does not grow with history.
            models.Index(
                fields=["device_type", "-rank", "id"],
                condition=Q(state="defined"),
                name="job_defined_claim",
            ),
            models.Index(
                fields=["state_changed_at"], condition=Q(state="queued"), name="job_queued_age"
            ),
            models.Index(fields=["pilot"], condition=Q(state="running"), name="job_running_pilot"),
            models.Index(fields=["task", "state"], name="job_task_state"),
            models.Index(
                fields=["parent_job"],
                condition=Q(parent_job__isnull=False),
                name="job_parent",
            ),
            models.Index(fields=["pilot"], condition=Q(pilot__isnull=False), name="job_pilot"),
        ]

    def __str__(self) -> str:
        return f"job {self.pk}"


class JobTransition(TransitionLog):
    subject = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="transitions")

    class Meta(TransitionLog.Meta):
        indexes = [models.Index(fields=["subject", "at"], name="job_tr_subject_at")]


class AttemptState(models.TextChoices):
    RUNNING = "running", "running"
    FINISHED = "finished", "finished"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"
    LOST = "lost", "lost"


class JobAttempt(models.Model):
    """One attempt at a job: kept forever, never overwritten by the next one."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveSmallIntegerField(validators=[MinValueValidator(0)])
    pilot = models.ForeignKey(
        "pilots.Pilot", on_delete=models.SET_NULL, null=True, blank=True, related_name="attempts"
    )
    state = models.CharField(
        max_length=20, choices=AttemptState.choices, default=AttemptState.RUNNING
    )
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    metrics = models.JSONField(default=dict, blank=True)
    metrics_updated_at = models.DateTimeField(
        null=True, blank=True, help_text="When the pilot last reported the attempt's metrics."
    )
    kill_requested_at = models.DateTimeField(null=True, blank=True)
    kill_acked_at = models.DateTimeField(null=True, blank=True)
    report_digest = models.CharField(
        max_length=64,
        blank=True,
        default="",
        help_text="sha256 of the final report that ended the attempt (state, exit and error "
        "codes, files): a later report is a duplicate if it matches, else a conflict.",
    )

    class Meta:
        ordering = ["job_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["job", "number"], name="attempt_unique_number"),
            models.UniqueConstraint(
                fields=["job"], condition=Q(state="running"), name="attempt_one_running_per_job"
            ),
        ]
        indexes = [
            # The reaper's and a terminating pilot's question: "what is this pilot running?"
            models.Index(
                fields=["pilot"], condition=Q(state="running"), name="attempt_running_pilot"
            ),
        ]

    def __str__(self) -> str:
        return f"job {self.job_id} attempt {self.number}"
