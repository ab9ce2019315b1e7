"""A task's series of input datasets: resolved through the DSM (:func:`resolve_inputs`),
added by hand (:func:`task_add_inputs`) or as they come to match a followed selection
(:func:`task_follow_selection`, from the splitter)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from files.dsm import MAX_FIND, get_dsm
from tasks.models import ENDED_TASK_STATES, Task, TaskInput
from tasks.selectors import task_get
from wms.exceptions import InvalidTransition, NotFound, ValidationFailed
from wms.kicks import kick_split

log = structlog.get_logger(__name__)


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
    task = task_get(task_id=task_id)
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
