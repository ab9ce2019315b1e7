"""A task over a series of input datasets: the splitter across the series, the finalizer's
wait for every input, and a task following its selection as datasets come to match it."""

from __future__ import annotations

import pytest

from files.models import Dataset, DatasetEntry
from tasks.finalizer import task_finalize
from tasks.models import Task, TaskInput, TaskState
from tasks.splitter import split_all, task_split
from tests.tasks.series import (
    add_files,
    close_dataset,
    create_task,
    each_file_once,
    finish_jobs,
    input_dataset,
    input_row,
    jobs_of,
    nothing_written,
    series_of,
)
from wms.exceptions import ValidationFailed

pytestmark = pytest.mark.django_db


# --- the splitter over a series -------------------------------------------------------------------


def test_jobs_follow_the_series_and_never_mix_datasets(user):
    a = input_dataset("sp.a", 4, close=True)
    b = input_dataset("sp.b", 3, close=True)
    c = input_dataset("sp.c", 2, close=True)
    task = create_task(user, data_in_uids=[b.uid, a.uid, c.uid], files_per_job=2)

    result = task_split(task_id=task.pk)

    assert (result.jobs, result.files, result.more) == (5, 9, False)
    # job ids grow along the series (b, a, c), and a short group closes each closed dataset
    assert [(name, n) for _, name, n in jobs_of(task)] == [
        ("sp.b", 2),
        ("sp.b", 1),
        ("sp.a", 2),
        ("sp.a", 2),
        ("sp.c", 2),
    ]
    each_file_once(task, a, b, c)
    for ds in (a, b, c):
        ti = input_row(task, ds)
        last = DatasetEntry.objects.filter(dataset=ds).order_by("-id").values_list("id", flat=True)
        assert ti.split_cursor == last[0] and ti.split_done_at is not None
    assert task_split(task_id=task.pk).jobs == 0  # idempotent


def test_an_open_middle_dataset_does_not_block_the_next_one(user):
    a = input_dataset("mid.a", 4, close=True)
    b = input_dataset("mid.b", 3)  # open
    c = input_dataset("mid.c", 2, close=True)
    task = create_task(user, data_in_uids=[a.uid, b.uid, c.uid], files_per_job=2)

    assert task_split(task_id=task.pk).jobs == 4  # a: 2, b: 1 (one file waits), c: 1
    first = jobs_of(task)
    assert [(name, n) for _, name, n in first] == [
        ("mid.a", 2),
        ("mid.a", 2),
        ("mid.b", 2),
        ("mid.c", 2),
    ]
    assert input_row(task, a).split_done_at and input_row(task, c).split_done_at
    waiting = input_row(task, b)
    assert waiting.split_done_at is None
    b_entries = list(DatasetEntry.objects.filter(dataset=b).order_by("id"))
    assert waiting.split_cursor == b_entries[1].id  # the third file waits for a partner

    add_files(b, "mid.b.late0", "mid.b.late1")  # the waiting file + late0 make a job; late1 waits
    assert task_split(task_id=task.pk).jobs == 1
    assert input_row(task, b).split_done_at is None
    assert task_split(task_id=task.pk).jobs == 0  # still open: the short group still waits

    close_dataset(b)
    result = task_split(task_id=task.pk)
    assert (result.jobs, result.files) == (1, 1)

    jobs = jobs_of(task)
    late = jobs[len(first) :]
    assert [(name, n) for _, name, n in late] == [("mid.b", 2), ("mid.b", 1)]
    assert min(j for j, _, _ in late) > max(j for j, _, _ in first)  # c did not wait for b
    assert input_row(task, b).split_done_at is not None
    each_file_once(task, a, b, c)


def test_split_done_at_is_set_exactly_when_closed_and_fully_split(user):
    a = input_dataset("done.a", 2)  # open, an even number of files: all get jobs
    task = create_task(user, data_in_uids=[a.uid], files_per_job=1)
    assert task_split(task_id=task.pk).jobs == 2
    assert input_row(task, a).split_done_at is None  # every file has a job, but it is open

    add_files(a, "done.a.late")
    close_dataset(a)
    # closed, but one file has no job yet: not done until the splitter gives it one
    assert input_row(task, a).split_done_at is None
    assert task_split(task_id=task.pk).jobs == 1
    done_at = input_row(task, a).split_done_at
    assert done_at is not None
    assert task_split(task_id=task.pk).jobs == 0
    assert input_row(task, a).split_done_at == done_at  # a done input is not read again
    each_file_once(task, a)


def test_an_empty_preregistered_first_input_does_not_block(user):
    a = input_dataset("pre.a")  # open and empty
    b = input_dataset("pre.b", 2, close=True)
    task = create_task(user, data_in_uids=[a.uid, b.uid])
    assert task_split(task_id=task.pk).jobs == 2
    assert [name for _, name, _ in jobs_of(task)] == ["pre.b", "pre.b"]
    assert input_row(task, a).split_cursor is None and input_row(task, a).split_done_at is None
    add_files(a, "pre.a.0")
    close_dataset(a)
    assert task_split(task_id=task.pk).jobs == 1
    assert [name for _, name, _ in jobs_of(task)] == ["pre.b", "pre.b", "pre.a"]
    assert input_row(task, a).split_done_at is not None
    each_file_once(task, a, b)


def test_the_per_run_bound_spans_the_inputs(user, settings):
    settings.WMS_SPLIT_MAX_JOBS_PER_RUN = 3
    settings.WMS_SPLIT_PAGE = 2  # the bound is checked between pages
    a = input_dataset("bd.a", 5, close=True)
    b = input_dataset("bd.b", 2, close=True)
    c = input_dataset("bd.c", 2, close=True)
    task = create_task(user, data_in_uids=[a.uid, b.uid, c.uid], files_per_job=1)

    r1 = task_split(task_id=task.pk)
    assert (r1.jobs, r1.more) == (4, True)  # two pages of a, then the bound
    assert {name for _, name, _ in jobs_of(task)} == {"bd.a"}
    assert input_row(task, a).split_done_at is None

    r2 = task_split(task_id=task.pk)
    assert (r2.jobs, r2.more) == (3, True)  # the rest of a and all of b; c waits
    assert [name for _, name, _ in jobs_of(task)] == ["bd.a"] * 5 + ["bd.b"] * 2
    assert input_row(task, c).split_cursor is None

    r3 = task_split(task_id=task.pk)
    assert (r3.jobs, r3.more) == (2, False)
    assert [name for _, name, _ in jobs_of(task)] == ["bd.a"] * 5 + ["bd.b"] * 2 + ["bd.c"] * 2
    assert not TaskInput.objects.filter(task=task, split_done_at__isnull=True).exists()
    each_file_once(task, a, b, c)


def test_split_all_goes_through_every_series(user):
    a, b = input_dataset("all.a", 1, close=True), input_dataset("all.b", 2, close=True)
    t1 = create_task(user, data_in_uids=[a.uid, b.uid])
    t2 = create_task(user, data_in_uids=[b.uid])  # a dataset may be read by two tasks
    results = {r.task_id: r.jobs for r in split_all()}
    assert results == {t1.pk: 3, t2.pk: 2}
    each_file_once(t1, a, b)
    each_file_once(t2, b)


# --- the finalizer with a series ------------------------------------------------------------------


def test_the_task_waits_for_an_open_input_then_ends(user):
    a = input_dataset("fin.a", 2, close=True)
    b = input_dataset("fin.b", 1)  # open
    task = create_task(user, data_in_uids=[a.uid, b.uid], files_per_job=1)
    assert task_split(task_id=task.pk).jobs == 3
    finish_jobs(task)

    result = task_finalize(task_id=task.pk)
    assert (result.state, result.waiting) == ("", "input dataset open")
    assert Task.objects.get(pk=task.pk).state == TaskState.RUNNING

    close_dataset(b)
    assert task_split(task_id=task.pk).jobs == 0
    assert input_row(task, b).split_done_at is not None
    result = task_finalize(task_id=task.pk)
    assert result.state == TaskState.FINISHED
    task.refresh_from_db()
    assert task.state == TaskState.FINISHED and task.jobs_finished == 3


def test_a_closed_input_with_files_without_a_job_holds_the_task(user):
    a = input_dataset("nj.a", 1, close=True)
    b = input_dataset("nj.b", 1)
    task = create_task(user, data_in_uids=[a.uid, b.uid], files_per_job=1)
    assert task_split(task_id=task.pk).jobs == 2
    finish_jobs(task)
    add_files(b, "nj.b.late")
    close_dataset(b)  # closed, one file not split yet

    assert task_finalize(task_id=task.pk).waiting == "input files without a job"
    assert Task.objects.get(pk=task.pk).state == TaskState.RUNNING

    assert task_split(task_id=task.pk).jobs == 1
    assert task_finalize(task_id=task.pk).waiting == "jobs not final"
    finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED
    each_file_once(task, a, b)


def test_a_closed_input_split_to_its_end_ends_the_task_even_unmarked(user):
    """Closed after its last file got a job: nothing after the cursor, no need to wait for the
    splitter to mark it done."""
    a = input_dataset("um.a", 2)
    task = create_task(user, data_in_uids=[a.uid], files_per_job=1)
    assert task_split(task_id=task.pk).jobs == 2
    finish_jobs(task)
    close_dataset(a)
    assert input_row(task, a).split_done_at is None
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED


# --- following a selection ------------------------------------------------------------------------


def test_follow_needs_a_selection(user):
    a = input_dataset("fol.a", 1)
    with pytest.raises(ValidationFailed) as info:
        create_task(user, data_in_uids=[a.uid], data_in_follow=True)
    assert list(info.value.detail) == ["data_in_follow"]
    nothing_written()


def test_a_following_task_takes_the_datasets_that_come_to_match(user):
    first = input_dataset("follow.r1.raw", 2, close=True)
    input_dataset("other.r2.raw", 1, close=True)  # does not match
    task = create_task(user, data_in_selection="follow.*.raw", data_in_follow=True)
    assert series_of(task) == [first.uid]
    assert task_split(task_id=task.pk).jobs == 2

    # New runs are registered: the next splitter run adds them (name order) and splits them.
    r3 = input_dataset("follow.r3.raw", 1)
    r2 = input_dataset("follow.r2.raw", 2, close=True)
    assert task_split(task_id=task.pk).jobs == 2 + 1  # r2's two files and r3's one so far
    assert series_of(task) == [first.uid, r2.uid, r3.uid]
    assert task_split(task_id=task.pk).jobs == 0  # nothing new: no input, no job

    # Every input is done but r3 (open); even once r3 is closed and split, the task follows:
    # it does not end.
    close_dataset(r3)
    task_split(task_id=task.pk)
    finish_jobs(task)
    assert not TaskInput.objects.filter(task=task, split_done_at__isnull=True).exists()
    assert task_finalize(task_id=task.pk).waiting == "following its dataset selection"

    # Stop following: one last look first (r4 matched before the user said "no more").
    r4 = input_dataset("follow.r4.raw", 1, close=True)
    from tasks.create import task_update

    task_update(task_id=task.pk, data_in_follow=False)
    assert series_of(task) == [first.uid, r2.uid, r3.uid, r4.uid]
    task_split(task_id=task.pk)
    finish_jobs(task)
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED
    each_file_once(task, first, r2, r3, r4)
    # After the end, new matches join no more.
    input_dataset("follow.r5.raw", 1, close=True)
    from files.dsm import get_dsm
    from tasks.inputs import task_follow_selection

    with get_dsm() as dsm:
        assert task_follow_selection(task_id=task.pk, dsm=dsm) == []
    assert len(series_of(task)) == 4


def test_following_never_takes_outputs_and_respects_the_limit(user, settings):
    from files.dsm import get_dsm
    from tasks.inputs import task_follow_selection

    settings.WMS_TASK_MAX_INPUTS = 3
    a = input_dataset("lim.a", 1)
    task = create_task(user, data_in_selection="lim*", data_in_follow=True, name="lim")
    out = Dataset.objects.get(uid=task.data_out_uid)
    assert out.name.startswith("lim.")  # matches the pattern, but is an output
    b, c, _d = input_dataset("lim.b", 1), input_dataset("lim.c", 1), input_dataset("lim.d", 1)

    with get_dsm() as dsm:
        rows = task_follow_selection(task_id=task.pk, dsm=dsm)
        assert [(r.position, r.dataset_uid) for r in rows] == [(1, b.uid), (2, c.uid)]
        assert task_follow_selection(task_id=task.pk, dsm=dsm) == []  # full: lim.d left out
    assert series_of(task) == [a.uid, b.uid, c.uid]


def test_a_dsm_failure_while_following_does_not_stop_the_split(user):
    from files.dsm.local import LocalDSMClient
    from wms.exceptions import DSMError

    class FindFails(LocalDSMClient):
        def find_datasets(self, pattern, *, role="input", limit=1000):
            raise DSMError("The DSM answered GET /datasets with 503.")

    a = input_dataset("flaky.a", 3, close=True)
    task = create_task(user, data_in_selection="flaky.*", data_in_follow=True)
    input_dataset("flaky.b", 1, close=True)  # would join, but the DSM cannot be asked now

    assert task_split(task_id=task.pk, dsm=FindFails()).jobs == 3
    assert series_of(task) == [a.uid]
    assert task_split(task_id=task.pk).jobs == 1  # the DSM answers again: b joins and is split
