"""Every write to tasks goes through here."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q
from django.db.models.functions import Greatest
from django.utils import timezone

from files.dsm import MAX_FIND, get_dsm
from files.models import File, FileStatus, FileType
from files.storage import check_output_place, owner_place
from jobs.executor import unqueue_task
from jobs.models import OPEN_JOB_STATES, Job, JobState
from jobs.selectors import task_kills_pending
from tasks.models import ENDED_TASK_STATES, Task, TaskInput, TaskState, TaskTransition
from wms import db
from wms.choices import DeviceType, Mode, TransitionSource
from wms.exceptions import Conflict, InvalidTransition, NotFound, ValidationFailed, WMSError
from wms.kicks import kick_dispatch, kick_finalize, kick_split
from wms.locations import ancestors
from wms.statemachine import TransitionResult, apply_transition, apply_transition_bulk

log = structlog.get_logger(__name__)


def _get(task_id: int) -> Task:
    try:
        return Task.objects.get(pk=task_id)
    except Task.DoesNotExist as exc:
        raise NotFound(f"Task {task_id} does not exist.") from exc


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
    name join the series too (:func:`task_follow_selection`), until it is turned off.

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
        output = _register_output_dataset(
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


def _register_output_dataset(
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


def resolve_inputs(
    dsm: Any,
    *,
    data_in_uid: uuid.UUID | str | None = None,
    data_in_uids: Sequence[uuid.UUID | str] | None = None,
    data_in_selection: str = "",
    taken: Sequence[uuid.UUID] = (),
    own_output: uuid.UUID | None = None,
) -> list[Any]:
    """The input datasets asked for, in order, as the DSM describes them (``DatasetInfo``).

    Exactly one way of naming them: one uid, a list of uids (no repeats), or a name pattern.
    Only datasets of role ``input``: an output dataset also holds its task's logs and
    intermediate merge outputs, which are no input for another task.
    ``taken``: the uids a task reads already (adding one of them again is a 400);
    ``own_output``: the task's output dataset, never its own input (a selection skips it). At most
    ``WMS_TASK_MAX_INPUTS`` datasets in all. Unknown datasets and bad patterns are 400s keyed by
    the field that named them.
    """
    given = [
        name
        for name, value in (
            ("data_in_uid", data_in_uid),
            ("data_in_uids", data_in_uids),
            ("data_in_selection", data_in_selection),
        )
        if value is not None and value != ""
    ]
    if not given:
        raise ValidationFailed(
            {"data_in_uid": ["This field is required (or data_in_uids, or data_in_selection)."]}
        )
    if len(given) > 1:
        raise ValidationFailed(
            {
                name: ["Give only one of data_in_uid, data_in_uids and data_in_selection."]
                for name in given
            }
        )
    room = settings.WMS_TASK_MAX_INPUTS - len(taken)
    if data_in_selection:
        try:
            found = dsm.find_datasets(str(data_in_selection), role="input", limit=room + 1)
        except ValidationFailed as exc:
            raise ValidationFailed({"data_in_selection": _messages(exc.detail)}) from exc
        found = [ds for ds in found if ds.uid not in {*taken, own_output}]
        if not found:
            raise ValidationFailed(
                {
                    "data_in_selection": [
                        "No input dataset (not already an input) matches this pattern."
                    ]
                }
            )
        if len(found) > room:
            raise ValidationFailed(
                {
                    "data_in_selection": [
                        f"More than {room} datasets match this pattern: narrow it "
                        f"(a task reads at most {settings.WMS_TASK_MAX_INPUTS} datasets)."
                    ]
                }
            )
        return found
    if data_in_uid is not None and data_in_uid != "":
        field, items = "data_in_uid", [data_in_uid]
    else:
        field = "data_in_uids"
        if isinstance(data_in_uids, str | bytes) or not isinstance(data_in_uids, Sequence):
            raise ValidationFailed({field: ["Must be a list of dataset uids."]})
        items = list(data_in_uids)
        if not items:
            raise ValidationFailed({field: ["Must name at least one dataset."]})
        if len(items) > room:
            raise ValidationFailed(
                {
                    field: [
                        f"At most {room} datasets (a task reads at most "
                        f"{settings.WMS_TASK_MAX_INPUTS})."
                    ]
                }
            )
    out = []
    seen: set[uuid.UUID] = set(taken)
    errors: dict[str, list[str]] = {}
    for i, raw in enumerate(items):
        key = field if field == "data_in_uid" else f"{field}[{i}]"
        try:
            uid = raw if isinstance(raw, uuid.UUID) else uuid.UUID(str(raw))
        except ValueError:
            errors[key] = ["Not a valid UUID."]
            continue
        if uid in seen:
            errors[key] = ["This dataset is in the task's inputs already."]
            continue
        if uid == own_output:
            errors[key] = ["This is the task's own output dataset: it cannot be its input."]
            continue
        seen.add(uid)
        try:
            info = dsm.get_dataset(uid)
        except NotFound:
            errors[key] = ["No dataset with this uid."]
            continue
        if info.role != "input":
            errors[key] = [
                f"Dataset {info.name!r} is an {info.role} dataset (it holds its task's logs "
                "and intermediate outputs too): only input datasets can be read by a task."
            ]
            continue
        out.append(info)
    if errors:
        raise ValidationFailed(errors)
    return out


def _messages(detail: Any) -> list[str]:
    """A DSM validation error's messages as one flat list (for the task field that caused it)."""
    if isinstance(detail, dict):
        return [f"{k}: {m}" for k, v in detail.items() for m in _messages(v)]
    if isinstance(detail, list | tuple):
        return [str(m) for m in detail]
    return [str(detail)]


def task_add_inputs(
    *,
    task_id: int,
    data_in_uids: Sequence[uuid.UUID | str] | None = None,
    data_in_selection: str = "",
) -> list[TaskInput]:
    """Append datasets to a task's series of inputs (a list of uids or a name pattern).

    Only while the task may still split: ``defined``, ``running`` or ``paused`` (else 409).
    The datasets are resolved through the DSM first, outside any transaction; then the task
    row is locked and the series read again: this and the finalizer never cross (a task that
    ended meanwhile takes no more inputs, and a task given one does not end before it is
    split), and a dataset that joined the series meanwhile is refused (named by uid) or
    skipped (a pattern's match), as if it had been there before.
    """
    task = _get(task_id)
    _check_takes_inputs(task)
    if data_in_uids is None and not data_in_selection:
        raise ValidationFailed({"data_in_uids": ["This field is required (or data_in_selection)."]})
    taken = list(TaskInput.objects.filter(task_id=task_id).values_list("dataset_uid", flat=True))
    with get_dsm() as dsm:
        datasets = resolve_inputs(
            dsm,
            data_in_uids=data_in_uids,
            data_in_selection=data_in_selection,
            taken=taken,
            own_output=task.data_out_uid,
        )
    with transaction.atomic():
        locked = Task.objects.select_for_update().filter(pk=task_id).first()
        if locked is None:
            raise NotFound(f"Task {task_id} does not exist.")
        _check_takes_inputs(locked)
        existing = list(
            TaskInput.objects.filter(task_id=task_id).values_list("position", "dataset_uid")
        )
        datasets = _still_new(datasets, {uid for _, uid in existing}, by_uid=not data_in_selection)
        rows = _append_inputs(task_id, existing, datasets)
        kick_split(task_id=task_id)
    log.info(
        "task_inputs_added",
        task_id=task_id,
        inputs=[str(ds.uid) for ds in datasets],
        first_position=rows[0].position,
    )
    return rows


def _check_takes_inputs(task: Task) -> None:
    if task.state in ENDED_TASK_STATES:
        raise InvalidTransition(
            entity="task",
            pk=task.pk,
            current=task.state,
            target=task.state,
            detail=f"Task {task.pk} is {task.state}: it takes no more input datasets.",
        )


def _still_new(datasets: list[Any], taken: set[uuid.UUID], *, by_uid: bool) -> list[Any]:
    """The resolved datasets that the series (read under the task's lock) does not hold yet;
    one named by uid that joined it meanwhile is the 400 it would have been before; nothing
    left of a pattern's matches is the 400 of a pattern matching nothing new."""
    if by_uid:
        late = [ds for ds in datasets if ds.uid in taken]
        if late:
            raise ValidationFailed(
                {"data_in_uids": [f"{ds.uid} is in the task's inputs already." for ds in late]}
            )
    new = [ds for ds in datasets if ds.uid not in taken]
    if not new:
        raise ValidationFailed(
            {"data_in_selection": ["No input dataset (not already an input) matches this pattern."]}
        )
    if len(taken) + len(new) > settings.WMS_TASK_MAX_INPUTS:
        field = "data_in_uids" if by_uid else "data_in_selection"
        raise ValidationFailed(
            {field: [f"A task reads at most {settings.WMS_TASK_MAX_INPUTS} datasets."]}
        )
    return new


def _append_inputs(
    task_id: int, existing: list[tuple[int, uuid.UUID]], datasets: Sequence[Any]
) -> list[TaskInput]:
    """The datasets as the task's next inputs, after ``existing`` ((position, uid) pairs read
    under the task row's lock, which the caller holds)."""
    start = max((pos for pos, _ in existing), default=-1) + 1
    rows = TaskInput.objects.bulk_create(
        [
            TaskInput(task_id=task_id, position=start + i, dataset_uid=ds.uid)
            for i, ds in enumerate(datasets)
        ]
    )
    Task.objects.filter(pk=task_id).update(updated_at=timezone.now())
    return rows


def task_follow_selection(*, task_id: int, dsm: Any) -> list[TaskInput]:
    """Append to a following task's series the input datasets that came to match its
    selection since the last look (in name order; the task's own output and datasets already
    in the series never). Nothing to do: no write at all.

    The DSM is asked first, outside any transaction (the splitter calls this at the start of
    each run); then the task row is locked (``FOR UPDATE``, as ``task_add_inputs``): a task
    that stopped following or ended meanwhile takes nothing. At most ``WMS_TASK_MAX_INPUTS``
    inputs: past that, the rest is logged and left out.
    """
    task = Task.objects.filter(pk=task_id, data_in_follow=True).first()
    if task is None or task.state in ENDED_TASK_STATES or not task.data_in_selection:
        return []
    found = dsm.find_datasets(task.data_in_selection, role="input", limit=MAX_FIND)
    taken = set(TaskInput.objects.filter(task_id=task_id).values_list("dataset_uid", flat=True))
    new = [ds for ds in found if ds.uid not in taken and ds.uid != task.data_out_uid]
    if not new:
        return []
    with transaction.atomic():
        task = (
            Task.objects.select_for_update()
            .filter(pk=task_id, data_in_follow=True)
            .exclude(state__in=ENDED_TASK_STATES)
            .first()
        )
        if task is None:
            return []
        existing = list(
            TaskInput.objects.filter(task_id=task_id).values_list("position", "dataset_uid")
        )
        taken = {uid for _, uid in existing}
        new = [ds for ds in new if ds.uid not in taken]
        room = settings.WMS_TASK_MAX_INPUTS - len(existing)
        if len(new) > room:
            log.warning(
                "task_inputs_limit",
                task_id=task_id,
                matching=len(new),
                room=room,
                limit=settings.WMS_TASK_MAX_INPUTS,
            )
            new = new[: max(0, room)]
        if not new:
            return []
        rows = _append_inputs(task_id, existing, new)
    log.info(
        "task_inputs_followed",
        task_id=task_id,
        pattern=task.data_in_selection,
        inputs=[ds.name for ds in new],
        first_position=rows[0].position,
    )
    return rows


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


@transaction.atomic
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
    stop_following = changes.get("data_in_follow") is False and task.state not in ENDED_TASK_STATES
    if stop_following:
        # The last look: datasets that matched before the user said "no more" still join.
        with get_dsm() as dsm:  # the row still says "following" until the save below
            task_follow_selection(task_id=task_id, dsm=dsm)
    task.save(update_fields=[*changes, "updated_at"])
    if "rank" in changes:
        Job.objects.filter(task_id=task_id, state__in=(JobState.DEFINED, JobState.HELD)).update(
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


@transaction.atomic
def task_pause(*, task_id: int, source: str, reason: str = "") -> TransitionResult:
    """→ paused: no new starts. The executor dispatches nothing more of the task, its
    ``queued`` jobs go back to ``defined`` and a start whose message was already on the
    broker is refused (``task_paused``); running jobs run to their end."""
    result = task_transition(task_id=task_id, target=TaskState.PAUSED, source=source, reason=reason)
    if result.won:
        unqueue_task(task_id, source=source, reason=f"task paused{': ' + reason if reason else ''}")
    return result


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
        kick_split(task_id=task_id)
        kick_dispatch()
    return result


@transaction.atomic
def task_cancel(*, task_id: int, source: str, reason: str = "") -> TransitionResult:
    """Cancel a task and every job of it that is not final yet (idempotent; a finished or
    failed task answers 409). Its splitter stops (it only splits defined/running tasks); the
    output dataset is closed by :func:`task_finalize` once no killed attempt may still write."""
    from jobs.services import jobs_cancel

    _get(task_id)
    result = task_transition(
        task_id=task_id, target=TaskState.CANCELLED, source=source, reason=reason
    )
    jobs_cancel(
        job_ids=list(
            Job.objects.filter(
                task_id=task_id,
                state__in=OPEN_JOB_STATES,
            ).values_list("pk", flat=True)
        ),
        source=source,
        reason=reason or f"task {task_id} cancelled",
    )
    kick_finalize(task_id=task_id)
    return result


# --- the end of a task (docs/lifecycle.md) ------------------------------------------------------


@dataclass(frozen=True)
class FinalizeResult:
    task_id: int
    state: str = ""  # the state the task was moved to ("" if it was not moved)
    output_closed: bool = False
    waiting: str = ""  # why nothing (more) was done, for logs and tests


def _kills_pending(task_id: int) -> bool:
    """Is a killed attempt of this task possibly still running? (``jobs.selectors``)"""
    return task_kills_pending(task_id=task_id)


def _input_fully_split(task: Task, dsm: Any) -> tuple[bool, str]:
    """Is every input dataset of the task closed, with every one of its files given a job?
    (Never while the task follows its selection: more datasets may come.)

    An input the splitter marked done (``split_done_at``) costs nothing. For any other, the
    dataset's state is read before its files (a closed dataset takes no more files), then ONE
    listing after the input's split cursor: nothing there means the splitter reached its end.
    """
    if task.data_in_follow:
        return False, "following its dataset selection"
    for task_input in TaskInput.objects.filter(task_id=task.pk, split_done_at__isnull=True):
        info = dsm.get_dataset(task_input.dataset_uid)
        if info.is_open:
            return False, "input dataset open"
        page = dsm.list_files(task_input.dataset_uid, after=task_input.split_cursor, limit=1)
        if page.files:
            return False, "input files without a job"
    return True, ""


def _end_counts(task_id: int) -> tuple[int, dict[str, int]]:
    from tasks.selectors import task_job_counts

    counts = task_job_counts(task_id=task_id)
    return sum(counts.values()), counts


def task_finalize(*, task_id: int, dsm: Any = None) -> FinalizeResult:
    """End a running task whose work is done, and close the output dataset of an ended task.

    1. A ``running`` task ends when every one of its input datasets is closed, every input
       file has a job (each input's split cursor is at its dataset's last file), every job
       is final and no killed attempt may still run: ``failed`` when more than
       ``max_failed_fraction`` of its jobs failed (0: any), else ``finished``. The counts go
       into ``jobs_finished``, ``jobs_failed``, ``jobs_cancelled`` and the transition's reason.
    2. An ended task (finished, failed, cancelled) whose output dataset is still open: once no
       job of it is queued/running/held and no killed attempt may still write, the outputs of
       a cancelled task are marked ``partial``, and the dataset is closed in the DSM with its
       file count and size in the reason; ``output_closed_at`` records it.

    Idempotent and safe to run twice at once: the task row is held ``FOR UPDATE SKIP LOCKED``
    (a task being split, retried or finalized elsewhere is skipped; the beat comes back).
    """
    own = dsm is None
    dsm = dsm or get_dsm()
    try:
        with transaction.atomic():
            return _finalize_locked(task_id, dsm)
    finally:
        if own:
            dsm.close()


def _finalize_locked(task_id: int, dsm: Any) -> FinalizeResult:
    from wms.switches import switch_enabled

    if not switch_enabled("finalizer"):
        return FinalizeResult(task_id=task_id, waiting="finalizer switched off")
    task = Task.objects.select_for_update(skip_locked=True).filter(pk=task_id).first()
    if task is None:
        return FinalizeResult(task_id=task_id, waiting="locked or gone")
    moved = ""
    if task.state == TaskState.RUNNING and task.merge_group_size:
        # The merger first (tasks.merger): a merge it creates is an open job, so the task
        # never ends while a merge can still be created.
        from tasks.merger import task_merge_locked

        def level0_complete() -> bool:
            return _input_fully_split(task, dsm)[0]

        task_merge_locked(task=task, level0_complete=level0_complete)
    if task.state == TaskState.RUNNING:
        if Job.objects.filter(task_id=task_id, state__in=OPEN_JOB_STATES).exists():
            return FinalizeResult(task_id=task_id, waiting="jobs not final")
        if _kills_pending(task_id):
            return FinalizeResult(task_id=task_id, waiting="killed attempts not ended")
        done, why = _input_fully_split(task, dsm)
        if not done:
            return FinalizeResult(task_id=task_id, waiting=why)
        total, counts = _end_counts(task_id)
        n_fin, n_fail, n_canc = (
            counts[JobState.FINISHED],
            counts[JobState.FAILED],
            counts[JobState.CANCELLED],
        )
        failed = total > 0 and n_fail / total > task.max_failed_fraction
        if failed:
            rule = f"more than {task.max_failed_fraction:g} of the jobs failed"
        else:
            rule = f"failed jobs within {task.max_failed_fraction:g}"
        if task.merge_groups_failed:
            failed = True
            rule += (
                f"; {task.merge_groups_failed} merge group(s) not merged "
                "(a member failed, rule fail)"
            )
        target = TaskState.FAILED if failed else TaskState.FINISHED
        reason = f"{total} jobs: {n_fin} finished, {n_fail} failed, {n_canc} cancelled ({rule})"
        apply_transition(
            Task,
            task_id,
            target,
            source=TransitionSource.SYSTEM,
            reason=reason,
            updates={
                "jobs_finished": n_fin,
                "jobs_failed": n_fail,
                "jobs_cancelled": n_canc,
            },
        )
        log.info(
            "task_ended",
            task_id=task_id,
            state=target,
            jobs=total,
            finished=n_fin,
            failed=n_fail,
            cancelled=n_canc,
        )
        task.state = moved = target
    if task.state not in ENDED_TASK_STATES or task.output_closed_at is not None:
        return FinalizeResult(task_id=task_id, state=moved, waiting="")
    if task.data_out_uid is None:
        return FinalizeResult(task_id=task_id, state=moved, waiting="no output dataset")
    # Never close while a job may still write into the dataset.
    if Job.objects.filter(task_id=task_id, state__in=OPEN_JOB_STATES).exists():
        return FinalizeResult(task_id=task_id, state=moved, waiting="jobs not final")
    if _kills_pending(task_id):
        return FinalizeResult(task_id=task_id, state=moved, waiting="killed attempts not ended")
    now = timezone.now()
    updates: dict[str, Any] = {"output_closed_at": now}
    if task.state == TaskState.CANCELLED:
        # What the task produced before its cancel is kept in the dataset, marked partial.
        File.objects.filter(
            task_id=task_id, type__in=(FileType.OUTPUT, FileType.LOG), status=FileStatus.READY
        ).update(status=FileStatus.PARTIAL, updated_at=now)
        total, counts = _end_counts(task_id)
        updates.update(
            jobs_finished=counts[JobState.FINISHED],
            jobs_failed=counts[JobState.FAILED],
            jobs_cancelled=counts[JobState.CANCELLED],
        )
    info = dsm.get_dataset(task.data_out_uid)
    reason = f"task {task_id} {task.state}: {info.file_count} files, {info.total_size} bytes"
    if info.is_open:
        info = dsm.close_dataset(task.data_out_uid, source="system", reason=reason)
    Task.objects.filter(pk=task_id).update(updated_at=now, **updates)
    log.info(
        "task_output_closed",
        task_id=task_id,
        dataset_uid=str(task.data_out_uid),
        files=info.file_count,
        size=info.total_size,
    )
    return FinalizeResult(task_id=task_id, state=moved, output_closed=True)


def tasks_finalize_all(*, beat: bool = False) -> list[FinalizeResult]:
    """One finalizer cycle (beat ``wms.finalize_tasks``): every running task with no open job,
    and every ended task whose output dataset is still open."""
    from wms.switches import service_tick, switch_enabled

    if beat and not service_tick("finalizer", min_interval=settings.WMS_FINALIZE_EVERY / 2):
        return []
    if not switch_enabled("finalizer"):
        return []
    open_jobs = Job.objects.filter(task_id=OuterRef("pk"), state__in=OPEN_JOB_STATES)
    ids = list(
        Task.objects.filter(
            Q(state=TaskState.RUNNING)
            | Q(
                state__in=ENDED_TASK_STATES,
                output_closed_at__isnull=True,
                data_out_uid__isnull=False,
            )
        )
        .exclude(Exists(open_jobs))
        .values_list("id", flat=True)
    )
    # A merging task is looked at while it still has open jobs: full groups merge at once.
    ids = sorted(
        {
            *ids,
            *Task.objects.filter(state=TaskState.RUNNING, merge_group_size__gt=0).values_list(
                "id", flat=True
            ),
        }
    )
    results = []
    dsm = get_dsm()
    try:
        for task_id in ids:
            try:
                results.append(task_finalize(task_id=task_id, dsm=dsm))
            except WMSError as exc:  # one task's DSM trouble must not stop the others
                log.warning(
                    "task_finalize_failed", task_id=task_id, error=exc.code, detail=str(exc)
                )
    finally:
        dsm.close()
    return results


# --- retry of a task's failed jobs ---------------------------------------------------------------


def task_retry_failed(*, task_id: int, source: str, reason: str = "") -> int:
    """Every failed job of the task goes back to ``defined`` with one more retry allowed.

    Each job keeps its attempts; its next attempt is ``cur_retry + 1`` and ``retries`` grows so
    that it is allowed. A finished or failed task goes back to ``running`` (its end is decided
    again when the retried jobs end); a cancelled task answers 409. When the output dataset of
    an ended task is already closed in the DSM (a closed dataset takes no more files), a new
    output dataset is registered for the task and the retried jobs write there. Returns how
    many jobs were retried (0: nothing failed, nothing changes).

    The DSM first, outside any transaction: is the output dataset closed, and if so the new
    one (``<name>.<id>.out.r<n>``, n the task's runs so far; its uid made from the task and n,
    :func:`output_dataset_uid`) registered idempotently: a retry that failed after it, or
    one running at the same time, registers the same dataset again and finds it. Then ONE
    short transaction holding the task row; should the task's output have changed between the
    two (another retry, a close by the finalizer), the DSM is asked again (a few times).
    """
    for _ in range(3):
        task = _get(task_id)
        if task.state == TaskState.CANCELLED:
            raise InvalidTransition(
                entity="task", pk=task_id, current=task.state, target=TaskState.RUNNING
            )
        new_output = None
        ended = task.state in (TaskState.FINISHED, TaskState.FAILED)
        if ended and task.data_out_uid is not None:
            if not Job.objects.filter(task_id=task_id, state=JobState.FAILED).exists():
                return 0
            new_output = _next_output_dataset(task)
        done = _retry_failed_locked(
            task_id,
            source=source,
            reason=reason,
            seen_output=(ended, task.data_out_uid, task.output_closed_at),
            new_output=new_output,
        )
        if done is not None:
            return done
    raise Conflict(f"Task {task_id} keeps changing: try its retry again.")


def _next_output_dataset(task: Task) -> Any:
    """The DSM's part of a retry: None while the task's output dataset is open, else the new
    output dataset (registered, or found registered by an earlier try)."""
    with get_dsm() as dsm:
        assert task.data_out_uid is not None
        if task.output_closed_at is None and dsm.get_dataset(task.data_out_uid).is_open:
            return None
        n = TaskTransition.objects.filter(subject_id=task.pk, to_state=TaskState.RUNNING).count()
        return _register_output_dataset(
            dsm,
            f"{(task.name or 'task')[:180]}.{task.pk}",
            suffix=f".out.r{n}",
            location=task.data_out_url,
            uid=output_dataset_uid(task.pk, n),
        )


@transaction.atomic
def _retry_failed_locked(
    task_id: int, *, source: str, reason: str, seen_output: tuple[Any, ...], new_output: Any
) -> int | None:
    """The retry's writes, under the task row's lock; None (nothing written) when the task's
    output is not what the DSM was asked about."""
    task = Task.objects.select_for_update().filter(pk=task_id).first()
    if task is None:
        raise NotFound(f"Task {task_id} does not exist.")
    if task.state == TaskState.CANCELLED:
        raise InvalidTransition(
            entity="task", pk=task_id, current=task.state, target=TaskState.RUNNING
        )
    ended = task.state in (TaskState.FINISHED, TaskState.FAILED)
    if (ended, task.data_out_uid, task.output_closed_at) != seen_output:
        return None  # another retry or the finalizer got there first: look again
    ids = list(
        Job.objects.select_for_update()
        .filter(task_id=task_id, state=JobState.FAILED)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not ids:
        return 0
    why = reason or f"retry of the failed jobs of task {task_id} ({source})"
    apply_transition_bulk(
        Job,
        ids,
        JobState.DEFINED,
        from_state=JobState.FAILED,
        source=source,
        reason=why,
        updates={
            "cur_retry": F("cur_retry") + 1,
            "retries": Greatest(F("retries"), F("cur_retry") + 1),
            "time_end": None,
        },
        locked=True,
    )
    if ended:
        task_transition(task_id=task_id, target=TaskState.RUNNING, source=source, reason=why)
        if task.data_out_uid is not None:
            changes: dict[str, Any] = {"output_closed_at": None}
            if new_output is not None:
                changes["data_out_uid"] = new_output.uid
            Task.objects.filter(pk=task_id).update(**changes)
    log.info("task_failed_jobs_retried", task_id=task_id, jobs=len(ids), source=source)

    kick_dispatch()
    return len(ids)
