"""jobs.build: the one bulk builder of Job rows (and, through files.build, their inputs), on
PostgreSQL's COPY path and on the portable one (``WMS_BULK_COPY=false``)."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction

from files.build import NewFile
from files.models import File, FileStatus, FileType
from jobs.build import JobSpec, jobs_build
from jobs.models import Job, JobState
from tests.factories import DatasetEntryFactory, JobFactory, TaskFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["copy", "portable"])
def bulk_path(request, settings):
    settings.WMS_BULK_COPY = request.param == "copy"
    return request.param


def spec_of(task, **changes):
    values = {
        "task_id": task.pk,
        "executable": task.executable,
        "args": task.args,
        "rank": task.rank,
        "retries": task.max_retries,
        "device_type": task.device_type,
        "mode": task.mode,
    }
    return JobSpec(**{**values, **changes})


def input_of(entry, task):
    return NewFile(
        file_name=entry.name,
        type=FileType.INPUT,
        size=entry.size,
        status=FileStatus.READY,
        check_sum=entry.check_sum,
        url=f"file:///data/{entry.name}",
        job_id=None,
        task_id=task.pk,
        dataset_id=entry.dataset_id,
        entry_id=entry.pk,
    )


def test_jobs_take_the_spec_and_their_inputs(bulk_path):
    task = TaskFactory(executable="wms-payload-map", args="--events 10", rank=12, max_retries=5)
    entries = DatasetEntryFactory.create_batch(5)
    groups = [[input_of(e, task) for e in entries[:2]], [input_of(e, task) for e in entries[2:]]]

    ids = jobs_build(spec=spec_of(task, device_type="gpu"), inputs=groups)

    assert len(ids) == 2
    jobs = list(Job.objects.filter(pk__in=ids).order_by("pk"))
    assert [j.pk for j in jobs] == sorted(ids)
    for job in jobs:
        assert job.task_id == task.pk
        assert (job.executable, job.args, job.rank) == ("wms-payload-map", "--events 10", 12)
        assert (job.device_type, job.mode, job.retries, job.level) == ("gpu", "map", 5, 0)
        assert (job.state, job.cur_retry, job.parent_job_id) == (JobState.DEFINED, 0, None)
        assert not job.transitions.exists()
    for job_id, group in zip(ids, groups, strict=True):
        rows = list(File.objects.filter(job_id=job_id).order_by("pk"))
        assert [(f.file_name, f.entry_id, f.task_id) for f in rows] == [
            (g.file_name, g.entry_id, task.pk) for g in group
        ]
        assert all(f.type == "input" and f.status == "ready" for f in rows)
        assert Job.objects.get(pk=job_id).file_in_id == rows[0].pk  # its first input
    assert len({j.uuid for j in jobs}) == 2


def test_a_job_without_inputs_has_no_file_in(bulk_path):
    task = TaskFactory()
    [job_id] = jobs_build(spec=spec_of(task), inputs=[[]])
    job = Job.objects.get(pk=job_id)
    assert job.file_in_id is None and not File.objects.filter(job_id=job_id).exists()


def test_nothing_to_build_writes_nothing(bulk_path):
    assert jobs_build(spec=spec_of(TaskFactory()), inputs=[]) == []
    assert not Job.objects.exists()


def test_merge_jobs_adopt_their_children(bulk_path):
    task = TaskFactory()
    kids = JobFactory.create_batch(4, task=task)

    ids = jobs_build(
        spec=spec_of(task, mode="merge", level=1, args="--sum"),
        inputs=[[], []],
        children=[[kids[0].pk, kids[1].pk], [kids[2].pk, kids[3].pk]],
    )

    merges = {j.pk: j for j in Job.objects.filter(pk__in=ids)}
    assert {(j.mode, j.level, j.args) for j in merges.values()} == {("merge", 1, "--sum")}
    parents = dict(Job.objects.filter(pk__in=[k.pk for k in kids]).values_list("pk", "parent_job"))
    assert parents == {
        kids[0].pk: ids[0],
        kids[1].pk: ids[0],
        kids[2].pk: ids[1],
        kids[3].pk: ids[1],
    }


def test_a_child_that_has_a_parent_already_is_refused_and_nothing_stays(bulk_path):
    task = TaskFactory()
    first = JobFactory(task=task)
    kid = JobFactory(task=task, parent_job=first)

    with pytest.raises(RuntimeError), transaction.atomic():
        jobs_build(spec=spec_of(task, mode="merge", level=1), inputs=[[]], children=[[kid.pk]])

    assert Job.objects.filter(task=task).count() == 2
    kid.refresh_from_db()
    assert kid.parent_job_id == first.pk


def test_the_spec_parent_is_every_new_jobs_parent(bulk_path):
    task = TaskFactory()
    merge = JobFactory(task=task, mode="merge")
    ids = jobs_build(spec=spec_of(task, parent_job_id=merge.pk), inputs=[[], []])
    assert set(Job.objects.get(pk=merge.pk).children.values_list("pk", flat=True)) == set(ids)


def test_an_input_file_gets_one_job_per_task_whatever_the_path(bulk_path):
    task = TaskFactory()
    entry = DatasetEntryFactory()
    jobs_build(spec=spec_of(task), inputs=[[input_of(entry, task)]])
    with pytest.raises(IntegrityError), transaction.atomic():
        jobs_build(spec=spec_of(task), inputs=[[input_of(entry, task)]])
    assert Job.objects.filter(task=task).count() == 1
