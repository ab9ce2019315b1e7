"""Every write to tasks goes through here."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.utils import timezone

from files.dsm import get_dsm
from jobs.models import Job, JobState
from tasks.models import Task, TaskState
from wms.choices import DeviceType, Mode
from wms.exceptions import NotFound, ValidationFailed
from wms.kicks import kick
from wms.statemachine import TransitionResult, apply_transition

log = structlog.get_logger(__name__)


def _get(task_id: int) -> Task:
    try:
        return Task.objects.get(pk=task_id)
    except Task.DoesNotExist as exc:
        raise NotFound(f"Task {task_id} does not exist.") from exc


@transaction.atomic
def task_create(
    *,
    owner: AbstractBaseUser,
    executable: str,
    data_in_uid: uuid.UUID | str,
    args: str = "",
    rank: int = 0,
    device_type: str = DeviceType.CPU,
    mode: str = Mode.MAP,
    storage_url: str = "",
    data_out_url: str = "",
    name: str = "",
    files_per_job: int = 1,
    max_retries: int = 3,
    splitter_enabled: bool = True,
    executor_enabled: bool = True,
) -> Task:
    """Define a task over an existing input dataset of the DSM.

    The task's output dataset is registered in the DSM at once (role ``output``, named
    ``<name or "task">.<id>.out``, located at ``data_out_url``), and its uid kept in
    ``data_out_uid``: every output and log of the task's jobs is registered there. An empty
    ``data_out_url`` defaults to ``<WMS_OUTPUT_ROOT>/task-<id>``.
    """
    if not data_in_uid:
        raise ValidationFailed({"data_in_uid": ["This field is required."]})
    try:
        with get_dsm() as dsm:  # the configured DSM, local or external
            dataset = dsm.get_dataset(data_in_uid)
    except (NotFound, DjangoValidationError) as exc:
        # An unknown (or malformed) uid is bad input of this field, as the API answers it.
        raise ValidationFailed({"data_in_uid": ["No dataset with this uid."]}) from exc
    task = Task(
        owner=owner,
        executable=executable,
        args=args,
        rank=rank,
        device_type=device_type,
        mode=mode,
        data_in_uid=dataset.uid,
        storage_url=storage_url,
        data_out_url=data_out_url,
        name=name,
        files_per_job=files_per_job,
        max_retries=max_retries,
        splitter_enabled=splitter_enabled,
        executor_enabled=executor_enabled,
    )
    try:
        task.full_clean(exclude=["owner"])
    except DjangoValidationError as exc:
        raise ValidationFailed(exc.message_dict) from exc
    task.save(force_insert=True)
    # The output dataset, in the DSM, named after the task (its id makes the name unique);
    # the outputs go under data_out_url, by default a folder of the task under WMS_OUTPUT_ROOT.
    if not task.data_out_url:
        task.data_out_url = f"{settings.WMS_OUTPUT_ROOT.rstrip('/')}/task-{task.pk}"
    with get_dsm() as dsm:
        output = dsm.register_dataset(
            f"{(task.name or 'task')[:200]}.{task.pk}.out",
            role="output",
            location=task.data_out_url,
        )
    task.data_out_uid = output.uid
    task.save(update_fields=["data_out_url", "data_out_uid", "updated_at"])
    log.info(
        "task_created",
        task_id=task.pk,
        data_in_uid=str(dataset.uid),
        data_out_uid=str(output.uid),
        owner=str(owner),
    )
    kick("wms.split", task_id=task.pk)
    return task


_UPDATABLE = {"rank", "splitter_enabled", "executor_enabled", "name", "max_retries"}


@transaction.atomic
def task_update(*, task_id: int, **changes: Any) -> Task:
    """Change a task's rank, name, retries or enable flags at run time.

    A new rank also applies to the task's jobs that are not dispatched yet, so re-prioritising
    a task takes effect on its next dispatch.
    """
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValidationFailed({k: ["This field cannot be changed."] for k in sorted(unknown)})
    task = Task.objects.select_for_update().filter(pk=task_id).first()
    if task is None:
        raise NotFound(f"Task {task_id} does not exist.")
    for key, value in changes.items():
        setattr(task, key, value)
    try:
        task.full_clean(exclude=["owner"])
    except DjangoValidationError as exc:
        raise ValidationFailed(exc.message_dict) from exc
    task.save(update_fields=[*changes, "updated_at"])
    if "rank" in changes:
        Job.objects.filter(task_id=task_id, state=JobState.DEFINED).update(
            rank=task.rank, updated_at=timezone.now()
        )
    log.info("task_updated", task_id=task_id, **{k: changes[k] for k in sorted(changes)})
    return task


def task_transition(
    *,
    task_id: int,
    target: str,
    source: str,
    reason: str = "",
    only_from: tuple[str, ...] | None = None,
) -> TransitionResult:
    """Apply one transition of the task state machine (409 if the map forbids it)."""
    result = apply_transition(
        Task, task_id, target, source=source, reason=reason, only_from=only_from
    )
    if result.won:
        log.info(
            "task_state_changed",
            task_id=task_id,
            from_state=result.from_state,
            to_state=target,
            source=source,
        )
    return result


def task_pause(*, task_id: int, source: str, reason: str = "") -> TransitionResult:
    return task_transition(task_id=task_id, target=TaskState.PAUSED, source=source, reason=reason)


@transaction.atomic
def task_resume(*, task_id: int, source: str, reason: str = "") -> TransitionResult:
    """paused → running, and the splitter and executor are kicked. Only a paused task resumes:
    a defined task is started by the splitter, not by a resume."""
    result = task_transition(
        task_id=task_id,
        target=TaskState.RUNNING,
        source=source,
        reason=reason,
        only_from=(TaskState.PAUSED,),
    )
    if result.won:
        from jobs.tasks import kick_dispatch
        from tasks.tasks import kick_split

        kick_split(task_id=task_id)
        kick_dispatch()
    return result


@transaction.atomic
def task_cancel(*, task_id: int, source: str, reason: str = "") -> TransitionResult:
    """Cancel a task and every job of it that is not final yet (idempotent)."""
    from jobs.services import jobs_cancel

    _get(task_id)
    result = task_transition(
        task_id=task_id, target=TaskState.CANCELLED, source=source, reason=reason
    )
    jobs_cancel(
        job_ids=list(
            Job.objects.filter(
                task_id=task_id,
                state__in=[JobState.DEFINED, JobState.QUEUED, JobState.RUNNING],
            ).values_list("pk", flat=True)
        ),
        source=source,
        reason=reason or f"task {task_id} cancelled",
    )
    return result
