"""A task's series of input datasets (``TaskInput``) through the services: ``task_create``
with one uid, a list or a selection, ``task_add_inputs``, and the datasets never taken (its
own output, another task's). The splitter and finalizer over a series: test_series; the API
and the admin: test_inputs_api."""

from __future__ import annotations

import uuid

import pytest

from files.models import Dataset, DatasetRole
from tasks.finalizer import task_finalize
from tasks.inputs import task_add_inputs
from tasks.models import Task, TaskInput, TaskState
from tasks.splitter import task_split
from tests.tasks.series import (
    ALREADY,
    NO_MATCH,
    ONE_WAY,
    UNKNOWN,
    close_dataset,
    create_task,
    each_file_once,
    finish_jobs,
    input_dataset,
    jobs_of,
    nothing_written,
    series_of,
)
from wms.exceptions import InvalidTransition, NotFound, ValidationFailed

pytestmark = pytest.mark.django_db


# --- task_create ----------------------------------------------------------------------------------


def test_create_with_a_list_keeps_its_order(user):
    a = input_dataset("list.a", 2, close=True)
    b = input_dataset("list.b")  # pre-registered: open and empty
    c = input_dataset("list.c", 1, close=True)

    task = create_task(user, data_in_uids=[str(c.uid), a.uid, str(b.uid)], name="series")

    assert series_of(task) == [c.uid, a.uid, b.uid]  # the list's order, not the catalogue's
    task.refresh_from_db()
    assert task.data_in_uid == c.uid and task.data_in_selection == ""
    assert (
        not TaskInput.objects.filter(task=task, split_cursor__isnull=False).exists()
        and not TaskInput.objects.filter(task=task, split_done_at__isnull=False).exists()
    )
    out = Dataset.objects.get(uid=task.data_out_uid)
    assert (out.role, out.name) == (DatasetRole.OUTPUT, f"series.{task.pk}.out")


def test_create_with_a_selection_takes_the_matches_in_name_order(user):
    b = input_dataset("run7.b.raw", 1)
    a = input_dataset("run7.a.raw")  # registered after b: name order is not id order
    input_dataset("run8.x.raw", 1)
    input_dataset("run7.a.raw.bak", 1)  # the pattern matches the whole name

    task = create_task(user, data_in_selection="run7.*.raw")

    assert series_of(task) == [a.uid, b.uid]
    task.refresh_from_db()
    assert task.data_in_uid == a.uid and task.data_in_selection == "run7.*.raw"


def test_create_with_one_uid_is_a_series_of_one(user):
    a = input_dataset("one.a", 1)
    task = create_task(user, data_in_uid=str(a.uid))
    assert series_of(task) == [a.uid]
    assert Task.objects.get(pk=task.pk).data_in_selection == ""


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "none",
            {"data_in_uid": ["This field is required (or data_in_uids, or data_in_selection)."]},
        ),
        ("uid+uids", {"data_in_uid": [ONE_WAY], "data_in_uids": [ONE_WAY]}),
        ("uid+selection", {"data_in_uid": [ONE_WAY], "data_in_selection": [ONE_WAY]}),
        (
            "all three",
            {"data_in_uid": [ONE_WAY], "data_in_uids": [ONE_WAY], "data_in_selection": [ONE_WAY]},
        ),
        ("uids not a list", {"data_in_uids": ["Must be a list of dataset uids."]}),
        ("uids empty", {"data_in_uids": ["Must name at least one dataset."]}),
        (
            "uids over the max",
            {"data_in_uids": ["At most 2 datasets (a task reads at most 2)."]},
        ),
        ("bad uuid", {"data_in_uids[1]": ["Not a valid UUID."]}),
        ("repeat", {"data_in_uids[1]": [ALREADY]}),
        ("unknown", {"data_in_uids[1]": [UNKNOWN]}),
        (
            "several bad",
            {"data_in_uids[0]": ["Not a valid UUID."], "data_in_uids[1]": [UNKNOWN]},
        ),
        (
            "no match",
            {"data_in_selection": [NO_MATCH]},
        ),
        (
            "selection over the max",
            {
                "data_in_selection": [
                    "More than 2 datasets match this pattern: narrow it "
                    "(a task reads at most 2 datasets)."
                ]
            },
        ),
    ],
)
def test_create_input_errors_are_400s_and_write_nothing(user, settings, case, expected):
    settings.WMS_TASK_MAX_INPUTS = 2
    a, b, c = input_dataset("err.a", 1), input_dataset("err.b"), input_dataset("err.c")
    kwargs = {
        "none": {},
        "uid+uids": {"data_in_uid": a.uid, "data_in_uids": [b.uid]},
        "uid+selection": {"data_in_uid": a.uid, "data_in_selection": "err.*"},
        "all three": {"data_in_uid": a.uid, "data_in_uids": [b.uid], "data_in_selection": "e*"},
        "uids not a list": {"data_in_uids": str(a.uid)},
        "uids empty": {"data_in_uids": []},
        "uids over the max": {"data_in_uids": [a.uid, b.uid, c.uid]},
        "bad uuid": {"data_in_uids": [a.uid, "not-a-uuid"]},
        "repeat": {"data_in_uids": [a.uid, str(a.uid)]},
        "unknown": {"data_in_uids": [a.uid, uuid.uuid4()]},
        "several bad": {"data_in_uids": ["nope", uuid.uuid4()]},
        "no match": {"data_in_selection": "nothing.*"},
        "selection over the max": {"data_in_selection": "err.?"},
    }[case]

    with pytest.raises(ValidationFailed) as info:
        create_task(user, **kwargs)

    assert info.value.detail == expected
    nothing_written()


@pytest.mark.parametrize("pattern", ["*", "?*?", "   "])
def test_create_with_a_bad_pattern_is_a_400_on_the_selection(user, pattern):
    input_dataset("pat.a", 1)
    with pytest.raises(ValidationFailed) as info:
        create_task(user, data_in_selection=pattern)
    assert list(info.value.detail) == ["data_in_selection"]
    assert info.value.detail["data_in_selection"]
    nothing_written()


def test_a_task_field_error_after_the_inputs_resolved_writes_nothing(user):
    a, b = input_dataset("fe.a", 1), input_dataset("fe.b", 1)
    with pytest.raises(ValidationFailed) as info:
        create_task(user, data_in_uids=[a.uid, b.uid], files_per_job=0)
    assert set(info.value.detail) == {"files_per_job"}
    nothing_written()


# --- task_add_inputs ------------------------------------------------------------------------------


def test_add_inputs_appends_and_the_new_files_are_split(user):
    a = input_dataset("add.a", 2, close=True)
    task = create_task(user, data_in_uids=[a.uid], files_per_job=2)
    assert task_split(task_id=task.pk).jobs == 1
    b, c = input_dataset("add.b", 3, close=True), input_dataset("add.c", 1)

    rows = task_add_inputs(task_id=task.pk, data_in_uids=[str(c.uid), b.uid])

    assert [(r.position, r.dataset_uid) for r in rows] == [(1, c.uid), (2, b.uid)]
    assert series_of(task) == [a.uid, c.uid, b.uid]
    assert Task.objects.get(pk=task.pk).data_in_uid == a.uid  # the first input stays
    assert task_split(task_id=task.pk).jobs == 2  # b: 2 + 1; c: its one file waits (open)
    assert [(name, n) for _, name, n in jobs_of(task)] == [
        ("add.a", 2),
        ("add.b", 2),
        ("add.b", 1),
    ]
    close_dataset(c)
    assert task_split(task_id=task.pk).jobs == 1
    each_file_once(task, a, b, c)


def test_add_inputs_to_a_paused_task(user):
    from tasks.lifecycle import task_pause

    a, b = input_dataset("pz.a", 1), input_dataset("pz.b", 1)
    task = create_task(user, data_in_uids=[a.uid])
    task_pause(task_id=task.pk, source="api")
    task_add_inputs(task_id=task.pk, data_in_uids=[b.uid])
    assert series_of(task) == [a.uid, b.uid]


@pytest.mark.parametrize("state", [TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED])
def test_add_inputs_to_an_ended_task_is_a_409(user, state):
    a, b = input_dataset("end.a", 1), input_dataset("end.b", 1)
    task = create_task(user, data_in_uids=[a.uid])
    Task.objects.filter(pk=task.pk).update(state=state)

    with pytest.raises(InvalidTransition) as info:
        task_add_inputs(task_id=task.pk, data_in_uids=[b.uid])

    assert info.value.status == 409
    assert series_of(task) == [a.uid]


def test_add_inputs_to_a_missing_task_is_a_404(db):
    with pytest.raises(NotFound):
        task_add_inputs(task_id=987654, data_in_uids=[uuid.uuid4()])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("already an input", {"data_in_uids[1]": [ALREADY]}),
        ("repeated in the list", {"data_in_uids[1]": [ALREADY]}),
        ("unknown", {"data_in_uids[0]": [UNKNOWN]}),
        ("over the room", {"data_in_uids": ["At most 2 datasets (a task reads at most 3)."]}),
        (
            "selection of inputs only",
            {"data_in_selection": [NO_MATCH]},
        ),
        ("uid and selection", {"data_in_uids": [ONE_WAY], "data_in_selection": [ONE_WAY]}),
    ],
)
def test_add_inputs_errors_are_400s_and_write_nothing(user, settings, case, expected):
    settings.WMS_TASK_MAX_INPUTS = 3
    a, b, c = input_dataset("rep.a", 1), input_dataset("rep.b", 1), input_dataset("other.c", 1)
    task = create_task(user, data_in_uids=[a.uid])
    kwargs = {
        "already an input": {"data_in_uids": [b.uid, a.uid]},
        "repeated in the list": {"data_in_uids": [b.uid, b.uid]},
        "unknown": {"data_in_uids": [uuid.uuid4()]},
        "over the room": {"data_in_uids": [b.uid, c.uid, uuid.uuid4()]},
        "selection of inputs only": {"data_in_selection": "rep.a"},
        "uid and selection": {"data_in_uids": [b.uid], "data_in_selection": "other.*"},
    }[case]

    with pytest.raises(ValidationFailed) as info:
        task_add_inputs(task_id=task.pk, **kwargs)

    assert info.value.detail == expected
    assert series_of(task) == [a.uid]


def test_add_inputs_by_selection_skips_the_series(user):
    a = input_dataset("run9.a.raw", 1, close=True)
    c = input_dataset("run9.c.raw", 1)
    b = input_dataset("run9.b.raw", 1)
    task = create_task(user, data_in_uids=[c.uid])

    rows = task_add_inputs(task_id=task.pk, data_in_selection="run9.*.raw")

    assert [(r.position, r.dataset_uid) for r in rows] == [(1, a.uid), (2, b.uid)]
    assert series_of(task) == [c.uid, a.uid, b.uid]
    assert Task.objects.get(pk=task.pk).data_in_selection == ""  # the task was listed


def test_after_the_task_ended_adding_an_input_is_a_409(user):
    a = input_dataset("race.a", 1, close=True)
    b = input_dataset("race.b", 1, close=True)
    task = create_task(user, data_in_uids=[a.uid])
    task_split(task_id=task.pk)
    finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED

    with pytest.raises(InvalidTransition):
        task_add_inputs(task_id=task.pk, data_in_uids=[b.uid])
    assert series_of(task) == [a.uid]


def test_an_input_added_before_the_end_holds_the_task(user):
    a = input_dataset("hold.a", 1, close=True)
    b = input_dataset("hold.b", 1, close=True)
    task = create_task(user, data_in_uids=[a.uid])
    task_split(task_id=task.pk)
    finish_jobs(task)
    task_add_inputs(task_id=task.pk, data_in_uids=[b.uid])

    assert task_finalize(task_id=task.pk).waiting == "input files without a job"
    assert task_split(task_id=task.pk).jobs == 1
    finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED
    assert Task.objects.get(pk=task.pk).jobs_finished == 2


def test_a_task_never_reads_its_own_output(user):
    a = input_dataset("own.a", 1)
    task = create_task(user, data_in_uids=[a.uid], name="own")
    out = Dataset.objects.get(uid=task.data_out_uid)
    assert out.name.startswith("own.")

    with pytest.raises(ValidationFailed) as info:
        task_add_inputs(task_id=task.pk, data_in_uids=[out.uid])
    assert info.value.detail == {
        "data_in_uids[0]": ["This is the task's own output dataset: it cannot be its input."]
    }
    # A selection that matches the output skips it (here: nothing else is left to add).
    with pytest.raises(ValidationFailed) as info:
        task_add_inputs(task_id=task.pk, data_in_selection="own.*")
    assert list(info.value.detail) == ["data_in_selection"]
    assert series_of(task) == [a.uid]


def test_add_inputs_with_nothing_names_its_own_field(user):
    task = create_task(user, data_in_uids=[input_dataset("none.a").uid])
    with pytest.raises(ValidationFailed) as info:
        task_add_inputs(task_id=task.pk)
    assert info.value.detail == {"data_in_uids": ["This field is required (or data_in_selection)."]}


def test_an_output_dataset_is_no_input(user):
    """Another task's output dataset holds its logs and intermediate outputs too: refused by
    uid, skipped by a selection."""
    producer = create_task(user, data_in_uids=[input_dataset("chain.in", 1).uid], name="chain")
    out = Dataset.objects.get(uid=producer.data_out_uid)
    assert out.name.startswith("chain.") and out.role == DatasetRole.OUTPUT

    with pytest.raises(ValidationFailed) as info:
        create_task(user, data_in_uids=[input_dataset("chain.other", 1).uid, out.uid])
    assert list(info.value.detail) == ["data_in_uids[1]"]
    assert "is an output dataset" in info.value.detail["data_in_uids[1]"][0]

    task = create_task(
        user, data_in_selection="chain.*"
    )  # matches chain.in, chain.other, the output
    assert series_of(task) == [
        Dataset.objects.get(name="chain.in").uid,
        Dataset.objects.get(name="chain.other").uid,
    ]
