"""Defining a task (:func:`task_create`) and changing its settings at run time
(:func:`task_update`): its place for outputs and its output dataset in the DSM. Its input
datasets are resolved and added by ``tasks.inputs``."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import Q

from files.dsm import get_dsm
from files.storage import check_output_place, owner_place
from jobs.control import jobs_set_rank
from jobs.models import Job
from tasks.inputs import resolve_inputs, task_follow_selection
from tasks.models import ENDED_TASK_STATES, Task, TaskInput
from wms import db
from wms.choices import DeviceType, Mode
from wms.exceptions import Conflict, NotFound, ValidationFailed
from wms.kicks import kick_split
from wms.locations import ancestors

log = structlog.get_logger(__name__)


def task_create(
    *,
    owner: User,
    executable: str,
    data_in_uid: uuid.UUID | str | None = None,
    data_in_uids: Sequence[uuid.UUID | str] | None = None,
    data_in_selection: str = "",
    data_in_follow: bool = False,
    args: str = "",
    rank: int = 0,
    device_type: str = DeviceType.CPU,
    mode: str = Mode.MAP,
    storage_url: str = "",
    data_out_url: str = "",
    name: str = "",
    files_per_job: int = 1,
    max_retries: int = 3,
    max_failed_fraction: float = 0.0,
    splitter_enabled: bool = True,
    executor_enabled: bool = True,
    merge_group_size: int = 0,
    merge_executable: str = "wms-payload-merge",
    merge_args: str = "",
    merge_max_level: int = 0,
    merge_on_child_failure: str = "fail",
) -> Task:
    """Define a task over input datasets of the DSM: ONE of ``data_in_uid`` (one dataset),
    ``data_in_uids`` (a series, in order) or ``data_in_selection`` (a name pattern, resolved
    now through the DSM into the series of the datasets it matches, by name). The datasets may
    still be open and empty (pre-registered): the splitter follows them as files arrive. With
    ``data_in_follow`` (a selection only), input datasets registered later under a matching
    name join the series too (:func:`tasks.inputs.task_follow_selection`), until it is turned off.

    The task's output dataset is registered in the DSM at once (role ``output``, named
    ``<name or "task">.<id>.out``, located at ``data_out_url``), and its uid kept in
    ``data_out_uid``: every output and log of the task's jobs is registered there. Users may
    not register names ending in ``.out`` (``files.services.is_reserved_name``); should the
    name be taken anyway (an external DSM has other clients), another one is picked
    (``<name>.<id>.<random>.out``).

    ``data_out_url`` must lie inside the owner's folder of the output root
    (``<WMS_OUTPUT_ROOT>/<username>/...``, ``files.storage``) and share no file with any
    other task's place (neither equal to, inside, nor around one): else 400 naming
    ``data_out_url`` and nothing is written. It is stored in its canonical form. Empty, it
    defaults to ``<WMS_OUTPUT_ROOT>/<username>/task-<id>``.

    The DSM is never called inside a transaction: the inputs are resolved, the task's id
    reserved (``wms.db.reserve_ids``) and its output dataset registered first (with a uid
    made from the id, :func:`output_dataset_uid`: a registration whose answer was lost is
    found again), then the task and its inputs are written in ONE short transaction. Should
    that fail, the output dataset, which no task points at, is closed (it takes no files).
    """
    if data_out_url:
        data_out_url = check_output_place(data_out_url, owner=owner)
        _check_place_free(data_out_url)
    with get_dsm() as dsm:  # the configured DSM, local or external
        datasets = resolve_inputs(
            dsm,
            data_in_uid=data_in_uid,
            data_in_uids=data_in_uids,
            data_in_selection=data_in_selection,
        )
    dataset = datasets[0]
    task = Task(
        owner=owner,
        executable=executable,
        args=args,
        rank=rank,
        device_type=device_type,
        mode=mode,
        data_in_uid=dataset.uid,
        data_in_selection=data_in_selection,
        data_in_follow=data_in_follow,
        storage_url=storage_url,
        data_out_url=data_out_url,
        name=name,
        files_per_job=files_per_job,
        max_retries=max_retries,
        max_failed_fraction=max_failed_fraction,
        splitter_enabled=splitter_enabled,
        executor_enabled=executor_enabled,
        merge_group_size=merge_group_size,
        merge_executable=merge_executable,
        merge_args=merge_args,
        merge_max_level=merge_max_level,
        merge_on_child_failure=merge_on_child_failure,
    )
    try:  # every check that needs no row of its own, before anything is registered
        task.full_clean(exclude=["owner"])
    except DjangoValidationError as exc:
        raise ValidationFailed(exc.message_dict) from exc
    # The output dataset, in the DSM, named after the task (its id makes the name unique);
    # the outputs go under data_out_url, by default a folder of the task in its owner's.
    [task.pk] = db.reserve_ids(Task)
    if not task.data_out_url:
        task.data_out_url = _default_place(owner, task.pk)
    with get_dsm() as dsm:
        output = register_output_dataset(
            dsm,
            f"{(task.name or 'task')[:200]}.{task.pk}",
            location=task.data_out_url,
            uid=output_dataset_uid(task.pk),
        )
    task.data_out_uid = output.uid
    try:
        _write_task(task, owner, datasets)
    except BaseException:
        _abandon_output(output, task.pk)
        raise
    log.info(
        "task_created",
        task_id=task.pk,
        data_in_uid=str(dataset.uid),
        inputs=len(datasets),
        data_out_uid=str(output.uid),
        owner=str(owner),
    )
    return task


@transaction.atomic
def _write_task(task: Task, owner: User, datasets: Sequence[Any]) -> None:
    """The task's row and its inputs, in one short transaction (no DSM call in it)."""
    # Task creations of one owner are serialised (the owner's row locked until commit): two
    # of them cannot both take overlapping places. Another owner's tasks are in another folder.
    get_user_model().objects.select_for_update().filter(pk=owner.pk).values_list("pk").first()
    _check_place_free(task.data_out_url)
    task.save(force_insert=True)
    TaskInput.objects.bulk_create(
        [TaskInput(task=task, position=i, dataset_uid=ds.uid) for i, ds in enumerate(datasets)]
    )
    kick_split(task_id=task.pk)


def _abandon_output(output: Any, task_id: int) -> None:
    """The task was not written: its output dataset is closed, so that it takes no file
    (its name, after an id no task will have, is never taken again). Best effort."""
    log.warning("task_create_failed", task_id=task_id, data_out_uid=str(output.uid))
    try:
        with get_dsm() as dsm:
            dsm.close_dataset(output.uid, source="system", reason=f"task {task_id} was not created")
    except Exception as exc:  # the task's own error is the one to raise
        log.warning("output_dataset_not_closed", data_out_uid=str(output.uid), error=str(exc))


def _overlapping_place(place: str) -> str | None:
    """A task's ``data_out_url`` sharing files with the canonical ``place``, or None: one
    equal to it or to a folder around it, or inside it. One indexed-prefix query."""
    around = ancestors(place)
    found = (
        Task.objects.filter(
            Q(data_out_url__in=[*around, *(a + "/" for a in around)])
            | Q(data_out_url__startswith=place + "/")
        )
        .values_list("data_out_url", flat=True)
        .first()
    )
    return found


def _check_place_free(place: str) -> None:
    other = _overlapping_place(place)
    if other is not None:
        raise ValidationFailed(
            {
                "data_out_url": [
                    f"{place} overlaps the output place of another task ({other}): a task's "
                    "outputs go to a place of its own, neither inside nor around another's."
                ]
            }
        )


def _default_place(owner: User, task_id: int) -> str:
    """``<output root>/<owner>/task-<id>``; if the owner gave that place to another task
    already, ``task-<id>-<random>``."""
    place = f"{owner_place(owner)}/task-{task_id}"
    while _overlapping_place(place) is not None:
        place = f"{owner_place(owner)}/task-{task_id}-{uuid.uuid4().hex[:8]}"
    return place


OUTPUT_NAME_ATTEMPTS = 5


def output_dataset_uid(task_id: int, retry: int = 0) -> uuid.UUID:
    """The uid of a task's output dataset (``retry`` n > 0: the one a retry of its failed
    jobs registers as ``.out.r<n>``): made from the task's id, so registering it again finds
    the same dataset. Namespaced by this WMS's secret key: two WMS sharing a DSM never meet."""
    site = hashlib.sha256(f"wms-output:{settings.SECRET_KEY}".encode()).hexdigest()
    return uuid.uuid5(uuid.NAMESPACE_URL, f"wms:{site}/tasks/{task_id}/out/{retry}")


def register_output_dataset(
    dsm: Any, base: str, *, location: str, uid: uuid.UUID, suffix: str = ".out"
) -> Any:
    """Register a task's output dataset ``<base><suffix>`` (suffix ``.out``, or ``.out.r<n>``
    for a retry's) with ``uid``, idempotently: if the DSM has that uid already as an open,
    empty output dataset at ``location`` (a registration whose answer was lost, or an earlier
    try of the same change that failed after it), that dataset is the one. The name is
    reserved for the WMS in its own catalogue, but an external DSM may hold it already
    (other clients): then ``<base>.<random><suffix>``, a few times, rather than refusing the
    task; and a uid held by some other dataset gives way to a random one."""
    name = f"{base}{suffix}"
    for attempt in range(OUTPUT_NAME_ATTEMPTS + 1):
        try:
            return dsm.register_dataset(name, role="output", location=location, uid=uid)
        except Conflict:
            try:
                found = dsm.get_dataset(uid)
            except NotFound:
                found = None
            if (
                found is not None
                and found.role == "output"
                and found.is_open
                and found.file_count == 0
                and found.location == location
            ):
                return found  # ours, from an earlier try
            if attempt == OUTPUT_NAME_ATTEMPTS:
                raise
            if found is not None:
                log.warning("output_dataset_uid_taken", uid=str(uid))
                uid = uuid.uuid4()
            else:
                log.warning("output_dataset_name_taken", name=name)
                name = f"{base}.{uuid.uuid4().hex[:8]}{suffix}"
    raise AssertionError("unreachable")


# What may change at run time, in the order the API and the admin show it.
UPDATABLE_FIELDS = (
    "data_in_follow",
    "name",
    "rank",
    "max_retries",
    "max_failed_fraction",
    "splitter_enabled",
    "executor_enabled",
    "merge_group_size",
    "merge_executable",
    "merge_args",
    "merge_max_level",
    "merge_on_child_failure",
)
_UPDATABLE = frozenset(UPDATABLE_FIELDS)
# The shape of the merge tree: fixed once the task has a merge job.
_MERGE_SHAPE = {"merge_group_size", "merge_max_level"}


def task_update(*, task_id: int, **changes: Any) -> Task:
    """Change a task's rank, name, retries, failure threshold, enable flags or merge settings
    at run time. ``merge_group_size`` and ``merge_max_level`` (the tree's shape) are fixed once
    the task has a merge job (400).

    A new rank also applies to the task's jobs that are not dispatched yet, so re-prioritising
    a task takes effect on its next dispatch.
    """
    unknown = set(changes) - _UPDATABLE
    if unknown:
        raise ValidationFailed({k: ["This field cannot be changed."] for k in sorted(unknown)})
    if changes.get("data_in_follow") is False:
        # The last look, before the row says "no more" (and outside the transaction: the DSM
        # is never called inside one): datasets that matched before the user said so join.
        current = Task.objects.filter(pk=task_id).values_list("state", "data_in_follow").first()
        if current is not None and current[0] not in ENDED_TASK_STATES and current[1]:
            with get_dsm() as dsm:
                task_follow_selection(task_id=task_id, dsm=dsm)
    return _task_update_locked(task_id, changes)


@transaction.atomic
def _task_update_locked(task_id: int, changes: dict[str, Any]) -> Task:
    task = Task.objects.select_for_update().filter(pk=task_id).first()
    if task is None:
        raise NotFound(f"Task {task_id} does not exist.")
    shape = sorted(k for k in _MERGE_SHAPE & set(changes) if changes[k] != getattr(task, k))
    if shape and Job.objects.filter(task_id=task_id, mode=Mode.MERGE).exists():
        raise ValidationFailed(
            {k: ["The task has merge jobs already: the tree's shape is fixed."] for k in shape}
        )
    for key, value in changes.items():
        setattr(task, key, value)
    try:
        task.full_clean(exclude=["owner"])
    except DjangoValidationError as exc:
        raise ValidationFailed(exc.message_dict) from exc
    task.save(update_fields=[*changes, "updated_at"])
    if "rank" in changes:
        jobs_set_rank(task_id=task_id, rank=task.rank)
    log.info("task_updated", task_id=task_id, **{k: changes[k] for k in sorted(changes)})
    return task
