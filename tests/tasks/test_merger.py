"""The merger (tasks.merger, docs/lifecycle.md "Merge jobs"): groups, tree, rules, races."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from files.dsm import get_dsm
from files.models import Dataset, File, FileStatus, FileType
from files.services import dataset_add_files, dataset_close, dataset_register
from jobs.models import Job, JobState
from tasks.create import task_create, task_update
from tasks.finalizer import task_finalize, tasks_finalize_all
from tasks.lifecycle import task_cancel
from tasks.merger import task_merge_locked
from tasks.models import Task, TaskState
from tasks.splitter import task_split
from wms.choices import Mode
from wms.exceptions import ValidationFailed

pytestmark = pytest.mark.django_db

FIN = JobState.FINISHED


def _task(user, n_files=10, *, close=True, **kwargs) -> Task:
    ds = dataset_register(name=f"merge.in.{Dataset.objects.count()}")
    dataset_add_files(
        dataset=ds, files=[{"name": f"f{i:02d}.json", "size": 10} for i in range(n_files)]
    )
    if close:
        dataset_close(dataset=ds, source="test")
    kwargs.setdefault("merge_group_size", 3)
    task = task_create(owner=user, executable="wms-payload-map", data_in_uid=ds.uid, **kwargs)
    task_split(task_id=task.pk)
    task.refresh_from_db()
    return task


def _end(jobs, state=FIN) -> None:
    """End these jobs as a pilot's report would: a finished job's output is registered in the
    task's output dataset and becomes its FILE_DAT output row."""
    for job in jobs:
        job.refresh_from_db()
        if state == FIN:
            task = job.task
            with get_dsm() as dsm:
                [info] = dsm.register_files(
                    task.data_out_uid,
                    [{"name": f"{job.uuid}/hist.json", "size": 7, "url": f"file:///out/{job.pk}"}],
                )
            out = File.objects.create(
                file_name=info.name,
                type=FileType.OUTPUT,
                size=7,
                status=FileStatus.READY,
                url=info.url,
                job=job,
                task=task,
                dataset=Dataset.objects.get(uid=task.data_out_uid),
                entry_id=info.id,
            )
            Job.objects.filter(pk=job.pk).update(state=state, file_out=out)
        else:
            Job.objects.filter(pk=job.pk).update(state=state)


def _level(task, level):
    return list(Job.objects.filter(task=task, level=level).order_by("id"))


def _children(job):
    return list(Job.objects.filter(parent_job=job).order_by("id").values_list("id", flat=True))


def test_ten_map_jobs_in_groups_of_three_make_a_tree_with_one_root(user):
    task = _task(user, 10)
    maps = _level(task, 0)
    assert len(maps) == 10

    _end(maps)
    result = task_finalize(task_id=task.pk)

    assert result.waiting == "jobs not final" and not result.state
    level1 = _level(task, 1)
    # 3, 3, 3 and the short last group of one is not merged alone: it waits for level 1's end
    assert [_children(m) for m in level1] == [[j.pk for j in maps[i : i + 3]] for i in (0, 3, 6)]
    assert Job.objects.get(pk=maps[9].pk).parent_job_id is None
    for m in level1:
        assert (m.mode, m.state, m.executable, m.device_type) == (
            Mode.MERGE,
            JobState.DEFINED,
            "wms-payload-merge",
            task.device_type,
        )
        assert m.retries == task.max_retries
        inputs = list(File.objects.filter(job=m, type=FileType.INPUT).order_by("id"))
        kids = Job.objects.filter(parent_job=m).order_by("id")
        assert [f.entry_id for f in inputs] == [k.file_out.entry_id for k in kids]
        assert m.file_in_id == inputs[0].pk
    # the consumed outputs are intermediate, the tenth (not consumed yet) is not
    assert File.objects.filter(task=task, type=FileType.OUTPUT, intermediate=True).count() == 9

    _end(level1)
    task_finalize(task_id=task.pk)
    [level2] = _level(task, 2)
    assert _children(level2) == [m.pk for m in level1]
    assert Job.objects.get(pk=maps[9].pk).parent_job_id is None  # carried on, to level 2

    _end([level2])
    assert task_finalize(task_id=task.pk).waiting == "jobs not final"
    [root] = _level(task, 3)
    assert _children(root) == [maps[9].pk, level2.pk]
    assert task.__class__.objects.get(pk=task.pk).state == TaskState.RUNNING

    _end([root])
    result = task_finalize(task_id=task.pk)
    assert result.state == TaskState.FINISHED and result.output_closed
    task.refresh_from_db()
    task.state = TaskState.RUNNING  # the merger's view of the finished tree, run once more
    again = task_merge_locked(task=task, level0_complete=lambda: True)
    assert (again.created, again.blocked, again.root_id) == ([], 0, root.pk)
    assert not _level(task, 4)
    # every job but the root has a parent; only the root's output is final
    assert list(
        Job.objects.filter(task=task, parent_job__isnull=True).values_list("id", flat=True)
    ) == [root.pk]
    finals = File.objects.filter(task=task, type=FileType.OUTPUT, intermediate=False)
    assert [f.job_id for f in finals] == [root.pk]
    task.refresh_from_db()
    assert task.jobs_finished == 15 and task.merge_groups_failed == 0


def test_full_groups_merge_while_the_input_is_open_the_short_group_waits(user):
    task = _task(user, 5, close=False)
    maps = _level(task, 0)
    _end(maps[:3])
    _end(maps[3:4])
    task_finalize(task_id=task.pk)
    [m] = _level(task, 1)
    assert _children(m) == [j.pk for j in maps[:3]]

    _end(maps[4:])
    task_finalize(task_id=task.pk)
    assert len(_level(task, 1)) == 1  # [4, 5] is short and more files may still come

    dataset_close(dataset=Dataset.objects.get(uid=task.data_in_uid), source="test")
    task_finalize(task_id=task.pk)
    level1 = _level(task, 1)
    assert [_children(x) for x in level1] == [[j.pk for j in maps[:3]], [maps[3].pk, maps[4].pk]]


def test_a_group_waits_until_all_its_members_are_final(user):
    task = _task(user, 3)
    maps = _level(task, 0)
    _end(maps[:2])
    Job.objects.filter(pk=maps[2].pk).update(state=JobState.RUNNING)
    tasks_finalize_all()  # the beat looks at merging tasks with open jobs too
    assert not _level(task, 1)
    _end(maps[2:])
    tasks_finalize_all()
    assert len(_level(task, 1)) == 1


def test_rule_fail_creates_no_merge_and_fails_the_task(user):
    task = _task(user, 6, max_failed_fraction=0.5)
    maps = _level(task, 0)
    _end(maps[:2])
    _end(maps[2:3], JobState.FAILED)
    _end(maps[3:])

    result = task_finalize(task_id=task.pk)

    assert not _level(task, 1)  # not even the complete second group: the tree cannot end
    assert result.state == TaskState.FAILED
    task.refresh_from_db()
    assert task.merge_groups_failed == 1
    reason = task.transitions.order_by("-id").first().reason
    assert "1 merge group(s) not merged" in reason


def test_rule_partial_merges_what_finished(user):
    task = _task(user, 6, merge_on_child_failure="partial", max_failed_fraction=0.5)
    maps = _level(task, 0)
    _end(maps[:1])
    _end(maps[1:2], JobState.FAILED)
    _end(maps[2:])

    task_finalize(task_id=task.pk)

    level1 = _level(task, 1)
    assert [_children(m) for m in level1] == [[j.pk for j in maps[:3]], [j.pk for j in maps[3:]]]
    inputs = File.objects.filter(job=level1[0], type=FileType.INPUT)
    assert sorted(f.entry_id for f in inputs) == sorted(
        j.file_out.entry_id for j in Job.objects.filter(pk__in=[maps[0].pk, maps[2].pk])
    )
    _end(level1)
    task_finalize(task_id=task.pk)
    [root] = _level(task, 2)
    _end([root])
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED


def test_merge_max_level_stops_the_tree(user):
    task = _task(user, 10, merge_max_level=1)
    _end(_level(task, 0))
    task_finalize(task_id=task.pk)
    level1 = _level(task, 1)
    assert len(level1) == 3
    _end(level1)
    result = task_finalize(task_id=task.pk)
    assert not _level(task, 2)
    assert result.state == TaskState.FINISHED
    # the tops: the three level-1 merges and the tenth map job (never merged alone)
    tops = Job.objects.filter(task=task, parent_job__isnull=True)
    assert tops.count() == 4


def test_a_single_map_job_is_its_own_root(user):
    task = _task(user, 1)
    _end(_level(task, 0))
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED
    assert not _level(task, 1)


def test_no_merge_without_a_group_size(user):
    task = _task(user, 4, merge_group_size=0)
    _end(_level(task, 0))
    assert task_finalize(task_id=task.pk).state == TaskState.FINISHED
    assert not Job.objects.filter(task=task, mode=Mode.MERGE).exists()


def test_running_the_merger_twice_creates_nothing_twice(user):
    task = _task(user, 9)
    _end(_level(task, 0))
    task_finalize(task_id=task.pk)
    task_finalize(task_id=task.pk)
    tasks_finalize_all()
    assert len(_level(task, 1)) == 3
    assert File.objects.filter(task=task, type=FileType.INPUT, job__level=1).count() == 9


def test_a_cancelled_task_creates_no_merge_jobs(user):
    task = _task(user, 6)
    maps = _level(task, 0)
    _end(maps[:3])
    task_cancel(task_id=task.pk, source="api")
    task_finalize(task_id=task.pk)
    tasks_finalize_all()
    assert not _level(task, 1)


def test_a_group_size_of_one_is_refused(user):
    with pytest.raises(ValidationFailed) as exc:
        _task(user, 2, merge_group_size=1)
    assert "merge_group_size" in exc.value.detail


def test_the_tree_shape_is_fixed_once_merging_started(user):
    task = _task(user, 3)
    task_update(task_id=task.pk, merge_group_size=2, merge_args="--sleep 0")
    _end(_level(task, 0))
    task_finalize(task_id=task.pk)
    assert len(_level(task, 1)) == 1
    with pytest.raises(ValidationFailed):
        task_update(task_id=task.pk, merge_group_size=4)
    task_update(task_id=task.pk, merge_args="--sleep 1")  # the rest may change


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks: Postgres")
def test_two_mergers_at_once_create_each_merge_once(user):
    task = _task(user, 12)
    _end(_level(task, 0))
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def run():
        try:
            barrier.wait(5)
            task_finalize(task_id=task.pk)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    task_finalize(task_id=task.pk)  # whoever was skipped: the next run finds nothing to do
    assert len(_level(task, 1)) == 4
    assert File.objects.filter(task=task, type=FileType.INPUT, job__level=1).count() == 12
