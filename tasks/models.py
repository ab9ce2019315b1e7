"""TASK_DAT: what a physicist asks for ("run this over every file of that dataset")."""

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from wms.choices import DeviceType, Mode, TaskState
from wms.models import TransitionLog
from wms.statemachine import StateMachine

TS = TaskState
TASK_MACHINE = StateMachine(
    entity="task",
    states=TaskState,
    transitions={
        TS.DEFINED: frozenset({TS.RUNNING, TS.PAUSED, TS.CANCELLED}),
        TS.RUNNING: frozenset({TS.PAUSED, TS.FINISHED, TS.FAILED, TS.CANCELLED}),
        TS.PAUSED: frozenset({TS.RUNNING, TS.CANCELLED}),
        # finished/failed -> running: a retry of the task's failed jobs re-opens it (a finished
        # task may hold failed jobs under its max_failed_fraction). Cancelled stays final.
        TS.FINISHED: frozenset({TS.RUNNING}),
        TS.FAILED: frozenset({TS.RUNNING}),
        TS.CANCELLED: frozenset(),
    },
    final=frozenset({TS.FINISHED, TS.FAILED, TS.CANCELLED}),
)


class MergeOnChildFailure(models.TextChoices):
    FAIL = "fail", "fail the merge (and the task)"
    PARTIAL = "partial", "merge what finished"


ENDED_TASK_STATES = (TS.FINISHED, TS.FAILED, TS.CANCELLED)

ACTIVE_TASK_STATES = (TS.DEFINED, TS.RUNNING, TS.PAUSED)


class Task(models.Model):
    STATE_MACHINE = TASK_MACHINE
    TRANSITION_MODEL = "tasks.TaskTransition"

    # --- the seed's TASK_DAT columns ---
    executable = models.CharField(max_length=255)
    args = models.CharField(max_length=1024, blank=True, default="")
    rank = models.IntegerField(
        default=0,
        validators=[MinValueValidator(-32768), MaxValueValidator(32767)],
        help_text="Priority: higher runs first within a device type.",
    )
    device_type = models.CharField(max_length=3, choices=DeviceType.choices, default=DeviceType.CPU)
    mode = models.CharField(max_length=5, choices=Mode.choices, default=Mode.MAP)
    data_in_uid = models.UUIDField(
        help_text="DSM uid of the (first) input dataset; a task may read a series (its inputs)."
    )
    storage_url = models.CharField(max_length=1024, blank=True, default="")
    data_out_url = models.CharField(max_length=1024, blank=True, default="")
    # --- what the WMS adds ---
    name = models.CharField(max_length=255, blank=True, default="")
    state = models.CharField(max_length=20, choices=TaskState.choices, default=TaskState.DEFINED)
    files_per_job = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1)])
    max_retries = models.PositiveSmallIntegerField(
        default=3, validators=[MaxValueValidator(100)], help_text="Retries allowed per job."
    )
    max_failed_fraction = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="The task fails when more than this fraction of its jobs failed "
        "(0: any failed job fails the task).",
    )
    splitter_enabled = models.BooleanField(default=True)
    executor_enabled = models.BooleanField(default=True)
    data_in_selection = models.CharField(
        max_length=255,
        blank=True,
        default="",
        help_text="The name pattern the input datasets were selected by (empty: listed).",
    )
    data_in_follow = models.BooleanField(
        default=False,
        help_text="Follow the selection: input datasets that come to match data_in_selection "
        "are added to the task as they are registered. The task cannot end while it follows.",
    )
    # --- merging the outputs (tasks.merger, docs/lifecycle.md "Merge jobs") ---
    merge_group_size = models.PositiveIntegerField(
        default=0,
        validators=[MaxValueValidator(10_000)],
        help_text="Outputs merged per merge job (0: no merge; 1 is not allowed).",
    )
    merge_executable = models.CharField(max_length=255, default="wms-payload-merge")
    merge_args = models.CharField(max_length=1024, blank=True, default="")
    merge_max_level = models.PositiveSmallIntegerField(
        default=0,
        validators=[MaxValueValidator(100)],
        help_text="The highest merge level (0: merge until one output remains).",
    )
    merge_on_child_failure = models.CharField(
        max_length=10,
        choices=MergeOnChildFailure.choices,
        default=MergeOnChildFailure.FAIL,
        help_text="A merge group with a job that failed for good: fail (no merge, the task "
        "fails) or partial (merge the outputs of the jobs that finished).",
    )
    merge_groups_failed = models.PositiveIntegerField(
        default=0,
        help_text="Merge groups not merged because a member failed (rule fail): the task fails.",
    )
    data_out_uid = models.UUIDField(
        null=True, blank=True, help_text="DSM uid of the output dataset."
    )
    # --- what the task's end recorded (tasks.finalizer.task_finalize) ---
    jobs_finished = models.PositiveIntegerField(default=0)
    jobs_failed = models.PositiveIntegerField(default=0)
    jobs_cancelled = models.PositiveIntegerField(default=0)
    output_closed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the output dataset was closed in the DSM."
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="tasks"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    state_changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(fields=["state", "device_type"], name="task_state_device"),
            models.Index(fields=["owner", "state"], name="task_owner_state"),
        ]

    def __str__(self) -> str:
        return self.name or f"task {self.pk}"

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        if self.merge_group_size == 1:
            raise ValidationError(
                {"merge_group_size": ["0 (no merge) or at least 2: a merge of one is a copy."]}
            )
        if self.data_in_follow and not self.data_in_selection:
            raise ValidationError(
                {"data_in_follow": ["Only a task whose inputs are a data_in_selection follows."]}
            )
        if self.merge_group_size and not self.merge_executable:
            raise ValidationError({"merge_executable": ["Required when merge_group_size > 0."]})


class TaskInput(models.Model):
    """One input dataset of a task. A task reads a series of them, in ``position`` order.

    The splitter keeps, per input, the DSM cursor of the last file it gave a job
    (``split_cursor``), and marks the input ``split_done_at`` once the dataset was closed and
    every one of its files had a job: a task ends only when every input is done.
    """

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="inputs")
    position = models.PositiveIntegerField(help_text="Order in the task's series, from 0.")
    dataset_uid = models.UUIDField(help_text="DSM uid of the input dataset.")
    split_cursor = models.BigIntegerField(
        null=True,
        blank=True,
        help_text="DSM cursor of the last file of this dataset given a job (None: none yet).",
    )
    split_done_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the splitter found the dataset closed with every file given a job.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["task", "position"]
        constraints = [
            models.UniqueConstraint(fields=["task", "position"], name="task_input_position"),
            models.UniqueConstraint(fields=["task", "dataset_uid"], name="task_input_once"),
        ]
        indexes = [models.Index(fields=["dataset_uid"], name="task_input_dataset")]

    def __str__(self) -> str:
        return f"task {self.task_id} input {self.position}: {self.dataset_uid}"


class TaskTransition(TransitionLog):
    subject = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="transitions")

    class Meta(TransitionLog.Meta):
        indexes = [models.Index(fields=["subject", "at"], name="task_tr_subject_at")]
