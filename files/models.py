"""FILE_DAT (a job's files) and the local DSM catalogue (Dataset, DatasetEntry).

See DESIGN.md section 3: FILE_DAT rows are the WMS's record of a job's inputs, outputs and log.
The DSM catalogue, what datasets exist and which files they hold, is a different thing; the
``local`` DSM backend keeps it in ``Dataset`` and ``DatasetEntry``. A job's input FILE_DAT row
points at the catalogue entry it reads, so one dataset can feed several tasks.
"""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from wms.models import TransitionLog
from wms.statemachine import StateMachine


class DatasetState(models.TextChoices):
    OPEN = "open", "open"
    CLOSED = "closed", "closed"


class DatasetRole(models.TextChoices):
    INPUT = "input", "input"
    OUTPUT = "output", "output"


DATASET_MACHINE = StateMachine(
    entity="dataset",
    states=DatasetState,
    transitions={
        DatasetState.OPEN: frozenset({DatasetState.CLOSED}),
        DatasetState.CLOSED: frozenset(),
    },
)


class Dataset(models.Model):
    """A dataset of the DSM catalogue: open (takes files) or closed (complete).

    ``owner`` is the user who registered it through the API or the admin; it is null for the
    datasets the system made (a task's output dataset, internal code, rows mirrored from an
    external DSM, rows older than the column). Who may write a dataset through the API:
    ``files.api.permissions``.
    """

    STATE_MACHINE = DATASET_MACHINE
    TRANSITION_MODEL = "files.DatasetTransition"

    uid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=255, unique=True)
    role = models.CharField(max_length=10, choices=DatasetRole.choices, default=DatasetRole.INPUT)
    state = models.CharField(max_length=20, choices=DatasetState.choices, default=DatasetState.OPEN)
    file_count = models.PositiveIntegerField(default=0)
    total_size = models.PositiveBigIntegerField(default=0)
    location = models.CharField(
        max_length=1024, blank=True, default="", help_text="Base URL of the dataset's files."
    )
    # PROTECT as Task.owner: a user leaves by being deactivated (they can no longer write
    # anything), and the catalogue keeps who registered each dataset.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        related_name="datasets",
        null=True,
        blank=True,
        help_text="The user who registered the dataset; none for datasets the system made.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["state", "role"], name="dataset_state_role")]

    def __str__(self) -> str:
        return self.name


class DatasetEntry(models.Model):
    """One file in the DSM catalogue of a dataset (the local DSM backend's own table)."""

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="entries")
    name = models.CharField(max_length=255)
    size = models.PositiveBigIntegerField(default=0)
    check_sum = models.CharField(max_length=80, blank=True, default="")
    url = models.CharField(max_length=1024, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["dataset_id", "id"]
        verbose_name_plural = "dataset entries"
        constraints = [
            models.UniqueConstraint(fields=["dataset", "name"], name="entry_unique_name"),
        ]

    def __str__(self) -> str:
        return f"{self.dataset_id}/{self.name}"


class DatasetTransition(TransitionLog):
    subject = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="transitions")

    class Meta(TransitionLog.Meta):
        indexes = [models.Index(fields=["subject", "at"], name="dataset_tr_subject_at")]


class FileType(models.TextChoices):
    INPUT = "input", "input"
    OUTPUT = "output", "output"
    LOG = "log", "log"


class FileStatus(models.TextChoices):
    PENDING = "pending", "pending"  # expected (an input not yet read, an output not yet written)
    READY = "ready", "ready"  # present and registered in the DSM
    PARTIAL = "partial", "partial"  # produced by a job that did not finish (cancelled task)
    FAILED = "failed", "failed"  # could not be produced or registered


class File(models.Model):
    """FILE_DAT: one input, output or log file of one job.

    ``check_sum`` holds the content checksum with its algorithm, ``adler32:0a1b2c3d`` or
    ``sha256:<hex>``. An input row points at the catalogue entry it reads (``entry``); the
    unique constraint ``file_one_job_per_input`` says an input file gets one job per task.
    """

    file_name = models.CharField(max_length=255)
    type = models.CharField(max_length=10, choices=FileType.choices)
    size = models.PositiveBigIntegerField(default=0)
    status = models.CharField(max_length=20, choices=FileStatus.choices, default=FileStatus.PENDING)
    check_sum = models.CharField(max_length=80, blank=True, default="")
    time_start = models.DateTimeField(null=True, blank=True)
    time_end = models.DateTimeField(null=True, blank=True)
    # FK indexes are chosen by hand (db_index=False + the Meta indexes): the splitter inserts
    # 10^5 rows at a time and every index costs on each of them.
    job = models.ForeignKey(
        "jobs.Job",
        on_delete=models.CASCADE,
        related_name="files",
        null=True,
        blank=True,
        db_index=False,
    )
    task = models.ForeignKey(
        "tasks.Task",
        on_delete=models.CASCADE,
        related_name="files",
        null=True,
        blank=True,
        db_index=False,
    )
    dataset = models.ForeignKey(
        Dataset,
        on_delete=models.PROTECT,
        related_name="job_files",
        null=True,
        blank=True,
        db_index=False,
    )
    entry = models.ForeignKey(
        DatasetEntry,
        on_delete=models.PROTECT,
        related_name="job_files",
        null=True,
        blank=True,
        db_index=False,
    )
    url = models.CharField(max_length=1024, blank=True, default="")
    intermediate = models.BooleanField(
        default=False,
        db_default=False,  # the splitter's COPY leaves it out
        help_text="An output consumed by a merge job of its task (not one of its final outputs).",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["task", "entry"],
                condition=Q(type="input"),
                name="file_one_job_per_input",
            ),
            models.CheckConstraint(
                condition=Q(check_sum="")
                | Q(check_sum__startswith="adler32:")
                | Q(check_sum__startswith="sha256:")
                | Q(check_sum__startswith="md5:"),
                name="file_checksum_has_algorithm",
            ),
        ]
        indexes = [
            models.Index(fields=["job", "type"], name="file_job_type"),
            models.Index(fields=["dataset", "type"], name="file_dataset_type"),
            models.Index(fields=["task", "type"], name="file_task_type"),
        ]

    def __str__(self) -> str:
        return self.file_name
