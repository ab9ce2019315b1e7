"""A task over a series of input datasets (``TaskInput``): creation, the splitter across the
series, the finalizer's wait for every input, appending inputs, the API and the admin."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from files.models import Dataset, DatasetEntry, DatasetRole, File, FileType
from files.services import dataset_add_files, dataset_close, dataset_register
from jobs.models import Job, JobState
from tasks.create import task_create
from tasks.finalizer import task_finalize
from tasks.inputs import task_add_inputs
from tasks.models import Task, TaskInput, TaskState
from tasks.splitter import split_all, task_split
from tests.factories import TaskFactory
from wms.exceptions import InvalidTransition, NotFound, ValidationFailed

pytestmark = pytest.mark.django_db

URL = "/api/v1/tasks/"
ADD = reverse("admin:tasks_task_add")
NO_MATCH = "No input dataset (not already an input) matches this pattern."
ALREADY = "This dataset is in the task's inputs already."
UNKNOWN = "No dataset with this uid."
ONE_WAY = "Give only one of data_in_uid, data_in_uids and data_in_selection."


# --- helpers -------------------------------------------------------------------------------------


def _ds(name: str, n: int = 0, *, close: bool = False) -> Dataset:
    """An input dataset of the local DSM with ``n`` files (``<name>.f000`` ...)."""
    ds = dataset_register(name=name)
    if n:
        _add(ds, *(f"{name}.f{i:03d}" for i in range(n)))
    if close:
        dataset_close(dataset=ds, source="test")
    return ds


def _add(ds: Dataset, *names: str) -> None:
    dataset_add_files(dataset=ds, files=[{"name": n, "size": 7} for n in names])


def _close(ds: Dataset) -> None:
    dataset_close(dataset=ds, source="test")


def _series(task) -> list[uuid.UUID]:
    rows = TaskInput.objects.filter(task_id=task.pk).order_by("position")
    positions = [r.position for r in rows]
    assert positions == list(range(len(positions)))  # no gaps, from 0
    return [r.dataset_uid for r in rows]


def _input(task, ds) -> TaskInput:
    return TaskInput.objects.get(task_id=task.pk, dataset_uid=ds.uid)


def _jobs(task) -> list[tuple[int, str, int]]:
    """Every job of the task in id order: (job id, THE dataset of its inputs, n inputs)."""
    by_job: dict[int, list[str]] = defaultdict(list)
    for job_id, name in File.objects.filter(task_id=task.pk, type=FileType.INPUT).values_list(
        "job_id", "dataset__name"
    ):
        by_job[job_id].append(name)
    out = []
    for job_id in sorted(by_job):
        names = set(by_job[job_id])
        assert len(names) == 1, f"job {job_id} mixes datasets {names}"
        out.append((job_id, names.pop(), len(by_job[job_id])))
    assert len(out) == Job.objects.filter(task_id=task.pk).count()  # no job without inputs
    return out


def _each_file_once(task, *datasets: Dataset) -> None:
    """Every file of these datasets has exactly one input FILE_DAT row (one job) in the task."""
    for ds in datasets:
        entries = sorted(DatasetEntry.objects.filter(dataset=ds).values_list("id", flat=True))
        used = sorted(
            File.objects.filter(
                task_id=task.pk, type=FileType.INPUT, entry__dataset=ds
            ).values_list("entry_id", flat=True)
        )
        assert used == entries, ds.name


def _finish_jobs(task) -> None:
    Job.objects.filter(task_id=task.pk).update(state=JobState.FINISHED)


def _nothing_written() -> None:
    assert not Task.objects.exists()
    assert not TaskInput.objects.exists()
    assert not Dataset.objects.filter(role=DatasetRole.OUTPUT).exists()


def _create(user, **kwargs) -> Task:
    return task_create(owner=user, executable="wms-payload-map", **kwargs)


# --- 1. task_create -------------------------------------------------------------------------------


def test_create_with_a_list_keeps_its_order(user):
    a = _ds("list.a", 2, close=True)
    b = _ds("list.b")  # pre-registered: open and empty
    c = _ds("list.c", 1, close=True)

    task = _create(user, data_in_uids=[str(c.uid), a.uid, str(b.uid)], name="series")

    assert _series(task) == [c.uid, a.uid, b.uid]  # the list's order, not the catalogue's
    task.refresh_from_db()
    assert task.data_in_uid == c.uid and task.data_in_selection == ""
    assert (
        not TaskInput.objects.filter(task=task, split_cursor__isnull=False).exists()
        and not TaskInput.objects.filter(task=task, split_done_at__isnull=False).exists()
    )
    out = Dataset.objects.get(uid=task.data_out_uid)
    assert (out.role, out.name) == (DatasetRole.OUTPUT, f"series.{task.pk}.out")


def test_create_with_a_selection_takes_the_matches_in_name_order(user):
    b = _ds("run7.b.raw", 1)
    a = _ds("run7.a.raw")  # registered after b: name order is not id order
    _ds("run8.x.raw", 1)
    _ds("run7.a.raw.bak", 1)  # the pattern matches the whole name

    task = _create(user, data_in_selection="run7.*.raw")

    assert _series(task) == [a.uid, b.uid]
    task.refresh_from_db()
    assert task.data_in_uid == a.uid and task.data_in_selection == "run7.*.raw"


def test_create_with_one_uid_is_a_series_of_one(user):
    a = _ds("one.a", 1)
    task = _create(user, data_in_uid=str(a.uid))
    assert _series(task) == [a.uid]
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
    a, b, c = _ds("err.a", 1), _ds("err.b"), _ds("err.c")
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
        _create(user, **kwargs)

    assert info.value.detail == expected
    _nothing_written()


@pytest.mark.parametrize("pattern", ["*", "?*?", "   "])
def test_create_with_a_bad_pattern_is_a_400_on_the_selection(user, pattern):
    _ds("pat.a", 1)
    with pytest.raises(ValidationFailed) as info:
        _create(user, data_in_selection=pattern)
    assert list(info.value.detail) == ["data_in_selection"]
    assert info.value.detail["data_in_selection"]
    _nothing_written()


def test_a_task_field_error_after_the_inputs_resolved_writes_nothing(user):
    a, b = _ds("fe.a", 1), _ds("fe.b", 1)
    with pytest.raises(ValidationFailed) as info:
        _create(user, data_in_uids=[a.uid, b.uid], files_per_job=0)
    assert set(info.value.detail) == {"files_per_job"}
    _nothing_written()


# --- 2. the splitter over a series ----------------------------------------------------------------


def test_jobs_follow_the_series_and_never_mix_datasets(user):
    a = _ds("sp.a", 4, close=True)
    b = _ds("sp.b", 3, close=True)
    c = _ds("sp.c", 2, close=True)
    task = _create(user, data_in_uids=[b.uid, a.uid, c.uid], files_per_job=2)

    result = task_split(task_id=task.pk)

    assert (result.jobs, result.files, result.more) == (5, 9, False)
    # job ids grow along the series (b, a, c), and a short group closes each closed dataset
    assert [(name, n) for _, name, n in _jobs(task)] == [
        ("sp.b", 2),
        ("sp.b", 1),
        ("sp.a", 2),
        ("sp.a", 2),
        ("sp.c", 2),
    ]
    _each_file_once(task, a, b, c)
    for ds in (a, b, c):
        ti = _input(task, ds)
        last = DatasetEntry.objects.filter(dataset=ds).order_by("-id").values_list("id", flat=True)
        assert ti.split_cursor == last[0] and ti.split_done_at is not None
    assert task_split(task_id=task.pk).jobs == 0  # idempotent


def test_an_open_middle_dataset_does_not_block_the_next_one(user):
    a = _ds("mid.a", 4, close=True)
    b = _ds("mid.b", 3)  # open
    c = _ds("mid.c", 2, close=True)
    task = _create(user, data_in_uids=[a.uid, b.uid, c.uid], files_per_job=2)

    assert task_split(task_id=task.pk).jobs == 4  # a: 2, b: 1 (one file waits), c: 1
    first = _jobs(task)
    assert [(name, n) for _, name, n in first] == [
        ("mid.a", 2),
        ("mid.a", 2),
        ("mid.b", 2),
        ("mid.c", 2),
    ]
    assert _input(task, a).split_done_at and _input(task, c).split_done_at
    waiting = _input(task, b)
    assert waiting.split_done_at is None
    b_entries = list(DatasetEntry.objects.filter(dataset=b).order_by("id"))
    assert waiting.split_cursor == b_entries[1].id  # the third file waits for a partner

    _add(b, "mid.b.late0", "mid.b.late1")  # the waiting file + late0 make a job; late1 waits
    assert task_split(task_id=task.pk).jobs == 1
    assert _input(task, b).split_done_at is None
    assert task_split(task_id=task.pk).jobs == 0  # still open: the short group still waits

    _close(b)
    result = task_split(task_id=task.pk)
    assert (result.jobs, result.files) == (1, 1)

    jobs = _jobs(task)
    late = jobs[len(first) :]
    assert [(name, n) for _, name, n in late] == [("mid.b", 2), ("mid.b", 1)]
    assert min(j for j, _, _ in late) > max(j for j, _, _ in first)  # c did not wait for b
    assert _input(task, b).split_done_at is not None
    _each_file_once(task, a, b, c)


def test_split_done_at_is_set_exactly_when_closed_and_fully_split(user):
    a = _ds("done.a", 2)  # open, an even number of files: all get jobs
    task = _create(user, data_in_uids=[a.uid], files_per_job=1)
    assert task_split(task_id=task.pk).jobs == 2
    assert _input(task, a).split_done_at is None  # every file has a job, but it is open

    _add(a, "done.a.late")
    _close(a)
    # closed, but one file has no job yet: not done until the splitter gives it one
    assert _input(task, a).split_done_at is None
    assert task_split(task_id=task.pk).jobs == 1
    done_at = _input(task, a).split_done_at
    assert done_at is not None
    assert task_split(task_id=task.pk).jobs == 0
    assert _input(task, a).split_done_at == done_at  # a done input is not read again
    _each_file_once(task, a)


def test_an_empty_preregistered_first_input_does_not_block(user):
    a = _ds("pre.a")  # open and empty
    b = _ds("pre.b", 2, close=True)
    task = _create(user, data_in_uids=[a.uid, b.uid])
    assert task_split(task_id=task.pk).jobs == 2
    assert [name for _, name, _ in _jobs(task)] == ["pre.b", "pre.b"]
    assert _input(task, a).split_cursor is None and _input(task, a).split_done_at is None
    _add(a, "pre.a.0")
    _close(a)
    assert task_split(task_id=task.pk).jobs == 1
    assert [name for _, name, _ in _jobs(task)] == ["pre.b", "pre.b", "pre.a"]
    assert _input(task, a).split_done_at is not None
    _each_file_once(task, a, b)


def test_the_per_run_bound_spans_the_inputs(user, settings):
    settings.WMS_SPLIT_MAX_JOBS_PER_RUN = 3
    settings.WMS_SPLIT_PAGE = 2  # the bound is checked between pages
    a = _ds("bd.a", 5, close=True)
    b = _ds("bd.b", 2, close=True)
    c = _ds("bd.c", 2, close=True)
    task = _create(user, data_in_uids=[a.uid, b.uid, c.uid], files_per_job=1)

    r1 = task_split(task_id=task.pk)
    assert (r1.jobs, r1.more) == (4, True)  # two pages of a, then the bound
    assert {name for _, name, _ in _jobs(task)} == {"bd.a"}
    assert _input(task, a).split_done_at is None

    r2 = task_split(task_id=task.pk)
    assert (r2.jobs, r2.more) == (3, True)  # the rest of a and all of b; c waits
    assert [name for _, name, _ in _jobs(task)] == ["bd.a"] * 5 + ["bd.b"] * 2
    assert _input(task, c).split_cursor is None

    r3 = task_split(task_id=task.pk)
    assert (r3.jobs, r3.more) == (2, False)
    assert [name for _, name, _ in _jobs(task)] == ["bd.a"] * 5 + ["bd.b"] * 2 + ["bd.c"] * 2
    assert not TaskInput.objects.filter(task=task, split_done_at__isnull=True).exists()
    _each_file_once(task, a, b, c)


def test_split_all_goes_through_every_series(user):
    a, b = _ds("all.a", 1, close=True), _ds("all.b", 2, close=True)
    t1 = _create(user, data_in_uids=[a.uid, b.uid])
    t2 = _create(user, data_in_uids=[b.uid])  # a dataset may be read by two tasks
    results = {r.task_id: r.jobs for r in split_all()}
    assert results == {t1.pk: 3, t2.pk: 2}
    _each_file_once(t1, a, b)
    _each_file_once(t2, b)


# --- 3. the finalizer with a series ---------------------------------------------------------------


def test_the_task_waits_for_an_open_input_then_ends(user):
    a = _ds("fin.a", 2, close=True)
    b = _ds("fin.b", 1)  # open
    task = _create(user, data_in_uids=[a.uid, b.uid], files_per_job=1)
    assert task_split(task_id=task.pk).jobs == 3
    _finish_jobs(task)

    result = task_finalize(task_id=task.pk)
    assert (result.state, result.waiting) == ("", "input dataset open")
    assert Task.objects.get(pk=task.pk).state == TaskState.RUNNING

    _close(b)
    assert task_split(task_id=task.pk).jobs == 0
    assert _input(task, b).split_done_at is not None
    result = task_finalize(task_id=task.pk)
    assert result.state == TaskState.FINISHED
    task.refresh_from_db()
    assert task.state == TaskState.FINISHED and task.jobs_finished == 3


def test_a_closed_input_with_files_without_a_job_holds_the_task(user):
    a = _ds("nj.a", 1, close=True)
    b = _ds("nj.b", 1)
    task = _create(user, data_in_uids=[a.uid, b.uid], files_per_job=1)
    assert task_split(task_id=task.pk).jobs == 2
    _finish_jobs(task)
    _add(b, "nj.b.late")
    _close(b)  # closed, one file not split yet

    assert task_finalize(task_id=task.pk).waiting == "input files without a job"
    assert Task.objects.get(pk=task.pk).state == TaskState.RUNNING

    assert task_split(task_id=task.pk).jobs == 1
    assert task_finalize(task_id=task.pk).waiting == "jobs not final"
    _finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED
    _each_file_once(task, a, b)


def test_a_closed_input_split_to_its_end_ends_the_task_even_unmarked(user):
    """Closed after its last file got a job: nothing after the cursor, no need to wait for the
    splitter to mark it done."""
    a = _ds("um.a", 2)
    task = _create(user, data_in_uids=[a.uid], files_per_job=1)
    assert task_split(task_id=task.pk).jobs == 2
    _finish_jobs(task)
    _close(a)
    assert _input(task, a).split_done_at is None
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED


# --- 4. task_add_inputs ---------------------------------------------------------------------------


def test_add_inputs_appends_and_the_new_files_are_split(user):
    a = _ds("add.a", 2, close=True)
    task = _create(user, data_in_uids=[a.uid], files_per_job=2)
    assert task_split(task_id=task.pk).jobs == 1
    b, c = _ds("add.b", 3, close=True), _ds("add.c", 1)

    rows = task_add_inputs(task_id=task.pk, data_in_uids=[str(c.uid), b.uid])

    assert [(r.position, r.dataset_uid) for r in rows] == [(1, c.uid), (2, b.uid)]
    assert _series(task) == [a.uid, c.uid, b.uid]
    assert Task.objects.get(pk=task.pk).data_in_uid == a.uid  # the first input stays
    assert task_split(task_id=task.pk).jobs == 2  # b: 2 + 1; c: its one file waits (open)
    assert [(name, n) for _, name, n in _jobs(task)] == [
        ("add.a", 2),
        ("add.b", 2),
        ("add.b", 1),
    ]
    _close(c)
    assert task_split(task_id=task.pk).jobs == 1
    _each_file_once(task, a, b, c)


def test_add_inputs_to_a_paused_task(user):
    from tasks.lifecycle import task_pause

    a, b = _ds("pz.a", 1), _ds("pz.b", 1)
    task = _create(user, data_in_uids=[a.uid])
    task_pause(task_id=task.pk, source="api")
    task_add_inputs(task_id=task.pk, data_in_uids=[b.uid])
    assert _series(task) == [a.uid, b.uid]


@pytest.mark.parametrize("state", [TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED])
def test_add_inputs_to_an_ended_task_is_a_409(user, state):
    a, b = _ds("end.a", 1), _ds("end.b", 1)
    task = _create(user, data_in_uids=[a.uid])
    Task.objects.filter(pk=task.pk).update(state=state)

    with pytest.raises(InvalidTransition) as info:
        task_add_inputs(task_id=task.pk, data_in_uids=[b.uid])

    assert info.value.status == 409
    assert _series(task) == [a.uid]


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
    a, b, c = _ds("rep.a", 1), _ds("rep.b", 1), _ds("other.c", 1)
    task = _create(user, data_in_uids=[a.uid])
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
    assert _series(task) == [a.uid]


def test_add_inputs_by_selection_skips_the_series(user):
    a = _ds("run9.a.raw", 1, close=True)
    c = _ds("run9.c.raw", 1)
    b = _ds("run9.b.raw", 1)
    task = _create(user, data_in_uids=[c.uid])

    rows = task_add_inputs(task_id=task.pk, data_in_selection="run9.*.raw")

    assert [(r.position, r.dataset_uid) for r in rows] == [(1, a.uid), (2, b.uid)]
    assert _series(task) == [c.uid, a.uid, b.uid]
    assert Task.objects.get(pk=task.pk).data_in_selection == ""  # the task was listed


def test_after_the_task_ended_adding_an_input_is_a_409(user):
    a = _ds("race.a", 1, close=True)
    b = _ds("race.b", 1, close=True)
    task = _create(user, data_in_uids=[a.uid])
    task_split(task_id=task.pk)
    _finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED

    with pytest.raises(InvalidTransition):
        task_add_inputs(task_id=task.pk, data_in_uids=[b.uid])
    assert _series(task) == [a.uid]


def test_an_input_added_before_the_end_holds_the_task(user):
    a = _ds("hold.a", 1, close=True)
    b = _ds("hold.b", 1, close=True)
    task = _create(user, data_in_uids=[a.uid])
    task_split(task_id=task.pk)
    _finish_jobs(task)
    task_add_inputs(task_id=task.pk, data_in_uids=[b.uid])

    assert task_finalize(task_id=task.pk).waiting == "input files without a job"
    assert task_split(task_id=task.pk).jobs == 1
    _finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED
    assert Task.objects.get(pk=task.pk).jobs_finished == 2


# --- 5. API ---------------------------------------------------------------------------------------


def _post(client, body, url=URL):
    return client.post(url, body, format="json")


def _inputs_of(body) -> list[tuple[int, str]]:
    assert all(
        set(row) == {"position", "dataset_uid", "split_cursor", "split_done_at"}
        for row in body["inputs"]
    )
    return [(row["position"], row["dataset_uid"]) for row in body["inputs"]]


def test_api_create_with_a_list(api_client, user):
    a, b = _ds("api.a", 1), _ds("api.b")
    response = _post(api_client, {"executable": "x", "data_in_uids": [str(b.uid), str(a.uid)]})
    assert response.status_code == 201, response.json()
    body = response.json()
    assert _inputs_of(body) == [(0, str(b.uid)), (1, str(a.uid))]
    assert body["data_in_uid"] == str(b.uid) and body["data_in_selection"] == ""
    assert _series(Task.objects.get(pk=body["id"])) == [b.uid, a.uid]


def test_api_create_with_a_selection(api_client):
    b, a = _ds("sel.b.raw"), _ds("sel.a.raw")
    response = _post(api_client, {"executable": "x", "data_in_selection": "sel.?.raw"})
    assert response.status_code == 201, response.json()
    body = response.json()
    assert _inputs_of(body) == [(0, str(a.uid)), (1, str(b.uid))]
    assert body["data_in_selection"] == "sel.?.raw"


def test_api_create_with_two_ways_lists_both_with_the_other_errors(api_client):
    a = _ds("two.a")
    response = _post(
        api_client,
        {
            "executable": "x",
            "data_in_uid": str(a.uid),
            "data_in_uids": [str(a.uid)],
            "files_per_job": 0,
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "validation_failed"
    assert set(body["detail"]) == {"data_in_uid", "data_in_uids", "files_per_job"}
    _nothing_written()


def test_api_create_with_no_input_is_a_400(api_client):
    response = _post(api_client, {"executable": "x"})
    assert response.status_code == 400
    assert set(response.json()["detail"]) == {"data_in_uid"}
    _nothing_written()


def test_api_create_with_an_unknown_uid_in_the_list(api_client):
    a = _ds("unk.a", 1)
    response = _post(
        api_client, {"executable": "x", "data_in_uids": [str(a.uid), str(uuid.uuid4())]}
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "validation_failed",
        "detail": {"data_in_uids[1]": [UNKNOWN]},
    }
    _nothing_written()


def test_api_add_inputs(api_client, user):
    a, b, c = _ds("ai.a", 1), _ds("ai.b", 1), _ds("ai.c", 1)
    task = _create(user, data_in_uids=[a.uid])
    url = f"{URL}{task.pk}/inputs/"

    response = _post(api_client, {"data_in_uids": [str(c.uid), str(b.uid)]}, url)
    assert response.status_code == 201, response.json()
    assert _inputs_of(response.json()) == [(0, str(a.uid)), (1, str(c.uid)), (2, str(b.uid))]

    response = _post(api_client, {"data_in_uids": [str(b.uid)]}, url)
    assert response.status_code == 400
    assert response.json()["detail"] == {"data_in_uids[0]": [ALREADY]}

    for body, keys in [
        ({}, {"data_in_uids"}),
        (
            {"data_in_uids": [str(b.uid)], "data_in_selection": "ai.*"},
            {"data_in_uids", "data_in_selection"},
        ),
        ({"data_in_uid": str(b.uid)}, {"data_in_uid", "data_in_uids"}),
    ]:
        response = _post(api_client, body, url)
        assert response.status_code == 400, body
        assert set(response.json()["detail"]) == keys, response.json()
    assert _series(task) == [a.uid, c.uid, b.uid]


def test_api_add_inputs_to_another_users_task_is_a_404(api_client, other_user):
    a, b = _ds("ou.a", 1), _ds("ou.b", 1)
    task = _create(other_user, data_in_uids=[a.uid])
    response = _post(api_client, {"data_in_uids": [str(b.uid)]}, f"{URL}{task.pk}/inputs/")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert _series(task) == [a.uid]


def test_api_add_inputs_to_a_finished_task_is_a_409(api_client, user):
    a, b = _ds("af.a", 1, close=True), _ds("af.b", 1)
    task = _create(user, data_in_uids=[a.uid])
    task_split(task_id=task.pk)
    _finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED

    response = _post(api_client, {"data_in_uids": [str(b.uid)]}, f"{URL}{task.pk}/inputs/")

    assert response.status_code == 409
    assert set(response.json()) == {"error", "detail"}
    assert _series(task) == [a.uid]


def test_api_detail_shows_how_far_each_input_is_split(api_client, user):
    a = _ds("det.a", 2, close=True)
    b = _ds("det.b", 1)
    task = _create(user, data_in_uids=[a.uid, b.uid])
    task_split(task_id=task.pk)

    body = api_client.get(f"{URL}{task.pk}/").json()

    first, second = body["inputs"]
    last_a = DatasetEntry.objects.filter(dataset=a).order_by("-id").first()
    assert first["split_cursor"] == last_a.id and first["split_done_at"] is not None
    assert second["split_cursor"] is not None and second["split_done_at"] is None


def test_api_detail_costs_the_same_for_one_input_or_many(api_client, user):
    many = [_ds(f"nq.{i}") for i in range(6)]
    small = _create(user, data_in_uids=[many[0].uid])
    big = _create(user, data_in_uids=[d.uid for d in many])
    counts = []
    for task in (small, big):
        with CaptureQueriesContext(connection) as ctx:
            response = api_client.get(f"{URL}{task.pk}/")
        assert response.status_code == 200
        counts.append(len(ctx.captured_queries))
    assert len(response.json()["inputs"]) == 6
    assert counts[0] == counts[1]


# --- 6. admin -------------------------------------------------------------------------------------


def _admin_form(**inputs) -> dict:
    return {
        "name": inputs.pop("name", "adm"),
        "executable": "wms-payload-map",
        "device_type": "cpu",
        "mode": "map",
        "rank": "0",
        "files_per_job": "1",
        "max_retries": "1",
        "max_failed_fraction": "0",
        **inputs,
    }


def test_admin_add_with_more_inputs(admin_client_logged):
    a, b, c = _ds("adm.a"), _ds("adm.b", 1), _ds("adm.c", 1)
    response = admin_client_logged.post(
        ADD,
        _admin_form(data_in_uid=str(a.uid), more_inputs=f"{c.uid}\n\n  {b.uid}  \n"),
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    task = Task.objects.get(name="adm")
    assert _series(task) == [a.uid, c.uid, b.uid]
    assert task.data_in_uid == a.uid and task.data_out_uid is not None


def test_admin_add_with_a_bad_uid_on_line_2(admin_client_logged):
    a, b = _ds("bad.a"), _ds("bad.b")
    response = admin_client_logged.post(
        ADD, _admin_form(data_in_uid=str(a.uid), more_inputs=f"{b.uid}\nnot-a-uuid")
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert list(errors) == ["more_inputs"]
    assert errors["more_inputs"] == ["line 2: Not a valid UUID."]
    _nothing_written()


def test_admin_add_with_an_unknown_first_uid_and_a_repeat(admin_client_logged):
    b = _ds("rp.b")
    response = admin_client_logged.post(
        ADD,
        _admin_form(data_in_uid=str(uuid.uuid4()), more_inputs=f"{b.uid}\n{b.uid}"),
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["data_in_uid"] == [UNKNOWN]
    assert errors["more_inputs"] == [f"line 2: {ALREADY}"]
    _nothing_written()


def test_admin_add_by_selection(admin_client_logged):
    b, a = _ds("as.b.raw"), _ds("as.a.raw")
    response = admin_client_logged.post(ADD, _admin_form(data_in_selection="as.*.raw"))
    assert response.status_code == 302, response.context["adminform"].form.errors
    task = Task.objects.get(name="adm")
    assert _series(task) == [a.uid, b.uid]
    assert task.data_in_selection == "as.*.raw"


def test_admin_add_with_two_ways_or_none(admin_client_logged):
    a = _ds("tw.a")
    response = admin_client_logged.post(
        ADD, _admin_form(data_in_uid=str(a.uid), data_in_selection="tw.*")
    )
    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {"data_in_uid", "data_in_selection"}
    response = admin_client_logged.post(ADD, _admin_form())
    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {"data_in_uid"}
    _nothing_written()


def test_admin_change_page_shows_the_inputs_in_order(admin_client_logged):
    a = _ds("chg.a", 1, close=True)
    b = _ds("chg.b")
    task = TaskFactory(data_in_uid=b.uid, inputs=[b.uid, a.uid])

    response = admin_client_logged.get(reverse("admin:tasks_task_change", args=[task.pk]))

    assert response.status_code == 200
    inline = next(
        i for i in response.context["inline_admin_formsets"] if i.formset.model is TaskInput
    )
    assert [f.instance.dataset_uid for f in inline.formset.forms] == [b.uid, a.uid]
    html = response.content.decode()
    section = html[html.index('id="inputs-group"') :]
    assert section.index(">chg.b</a> (open)") < section.index(">chg.a</a> (closed)")


def test_admin_change_page_reads_the_inputs_datasets_once(admin_client_logged):
    few = TaskFactory(inputs=[_ds(f"few.{i}").uid for i in range(2)])
    many = TaskFactory(inputs=[_ds(f"many.{i}").uid for i in range(12)])

    def queries(task) -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert (
                admin_client_logged.get(
                    reverse("admin:tasks_task_change", args=[task.pk])
                ).status_code
                == 200
            )
        return len(ctx.captured_queries)

    assert queries(many) == queries(few)


def test_a_task_never_reads_its_own_output(user):
    a = _ds("own.a", 1)
    task = _create(user, data_in_uids=[a.uid], name="own")
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
    assert _series(task) == [a.uid]


def test_add_inputs_with_nothing_names_its_own_field(user):
    task = _create(user, data_in_uids=[_ds("none.a").uid])
    with pytest.raises(ValidationFailed) as info:
        task_add_inputs(task_id=task.pk)
    assert info.value.detail == {"data_in_uids": ["This field is required (or data_in_selection)."]}


def test_an_output_dataset_is_no_input(user):
    """Another task's output dataset holds its logs and intermediate outputs too: refused by
    uid, skipped by a selection."""
    producer = _create(user, data_in_uids=[_ds("chain.in", 1).uid], name="chain")
    out = Dataset.objects.get(uid=producer.data_out_uid)
    assert out.name.startswith("chain.") and out.role == DatasetRole.OUTPUT

    with pytest.raises(ValidationFailed) as info:
        _create(user, data_in_uids=[_ds("chain.other", 1).uid, out.uid])
    assert list(info.value.detail) == ["data_in_uids[1]"]
    assert "is an output dataset" in info.value.detail["data_in_uids[1]"][0]

    task = _create(user, data_in_selection="chain.*")  # matches chain.in, chain.other, the output
    assert _series(task) == [
        Dataset.objects.get(name="chain.in").uid,
        Dataset.objects.get(name="chain.other").uid,
    ]


# --- following a selection -----------------------------------------------------------------------


def test_follow_needs_a_selection(user):
    a = _ds("fol.a", 1)
    with pytest.raises(ValidationFailed) as info:
        _create(user, data_in_uids=[a.uid], data_in_follow=True)
    assert list(info.value.detail) == ["data_in_follow"]
    _nothing_written()


def test_a_following_task_takes_the_datasets_that_come_to_match(user):
    first = _ds("follow.r1.raw", 2, close=True)
    _ds("other.r2.raw", 1, close=True)  # does not match
    task = _create(user, data_in_selection="follow.*.raw", data_in_follow=True)
    assert _series(task) == [first.uid]
    assert task_split(task_id=task.pk).jobs == 2

    # New runs are registered: the next splitter run adds them (name order) and splits them.
    r3 = _ds("follow.r3.raw", 1)
    r2 = _ds("follow.r2.raw", 2, close=True)
    assert task_split(task_id=task.pk).jobs == 2 + 1  # r2's two files and r3's one so far
    assert _series(task) == [first.uid, r2.uid, r3.uid]
    assert task_split(task_id=task.pk).jobs == 0  # nothing new: no input, no job

    # Every input is done but r3 (open); even once r3 is closed and split, the task follows:
    # it does not end.
    _close(r3)
    task_split(task_id=task.pk)
    _finish_jobs(task)
    assert not TaskInput.objects.filter(task=task, split_done_at__isnull=True).exists()
    assert task_finalize(task_id=task.pk).waiting == "following its dataset selection"

    # Stop following: one last look first (r4 matched before the user said "no more").
    r4 = _ds("follow.r4.raw", 1, close=True)
    from tasks.create import task_update

    task_update(task_id=task.pk, data_in_follow=False)
    assert _series(task) == [first.uid, r2.uid, r3.uid, r4.uid]
    task_split(task_id=task.pk)
    _finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED
    _each_file_once(task, first, r2, r3, r4)
    # After the end, new matches join no more.
    _ds("follow.r5.raw", 1, close=True)
    from files.dsm import get_dsm
    from tasks.inputs import task_follow_selection

    with get_dsm() as dsm:
        assert task_follow_selection(task_id=task.pk, dsm=dsm) == []
    assert len(_series(task)) == 4


def test_following_never_takes_outputs_and_respects_the_limit(user, settings):
    from files.dsm import get_dsm
    from tasks.inputs import task_follow_selection

    settings.WMS_TASK_MAX_INPUTS = 3
    a = _ds("lim.a", 1)
    task = _create(user, data_in_selection="lim*", data_in_follow=True, name="lim")
    out = Dataset.objects.get(uid=task.data_out_uid)
    assert out.name.startswith("lim.")  # matches the pattern, but is an output
    b, c, _d = _ds("lim.b", 1), _ds("lim.c", 1), _ds("lim.d", 1)

    with get_dsm() as dsm:
        rows = task_follow_selection(task_id=task.pk, dsm=dsm)
        assert [(r.position, r.dataset_uid) for r in rows] == [(1, b.uid), (2, c.uid)]
        assert task_follow_selection(task_id=task.pk, dsm=dsm) == []  # full: lim.d left out
    assert _series(task) == [a.uid, b.uid, c.uid]


def test_api_follow_and_unfollow(api_client, user):
    a = _ds("apifol.1", 1, close=True)
    response = _post(
        api_client, {"executable": "x", "data_in_selection": "apifol.*", "data_in_follow": True}
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["data_in_follow"] is True and _inputs_of(body) == [(0, str(a.uid))]

    b = _ds("apifol.2", 1, close=True)
    response = api_client.patch(f"{URL}{body['id']}/", {"data_in_follow": False}, format="json")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["data_in_follow"] is False
    assert _inputs_of(body) == [(0, str(a.uid)), (1, str(b.uid))]

    response = api_client.patch(f"{URL}{body['id']}/", {"data_in_follow": True}, format="json")
    assert response.status_code == 200  # a selection task may follow again

    listed = _post(api_client, {"executable": "x", "data_in_uids": [str(a.uid)]}).json()
    response = api_client.patch(f"{URL}{listed['id']}/", {"data_in_follow": True}, format="json")
    assert response.status_code == 400
    assert list(response.json()["detail"]) == ["data_in_follow"]


def test_a_dsm_failure_while_following_does_not_stop_the_split(user):
    from files.dsm.local import LocalDSMClient
    from wms.exceptions import DSMError

    class FindFails(LocalDSMClient):
        def find_datasets(self, pattern, *, role="input", limit=1000):
            raise DSMError("The DSM answered GET /datasets with 503.")

    a = _ds("flaky.a", 3, close=True)
    task = _create(user, data_in_selection="flaky.*", data_in_follow=True)
    _ds("flaky.b", 1, close=True)  # would join, but the DSM cannot be asked now

    assert task_split(task_id=task.pk, dsm=FindFails()).jobs == 3
    assert _series(task) == [a.uid]
    assert task_split(task_id=task.pk).jobs == 1  # the DSM answers again: b joins and is split
