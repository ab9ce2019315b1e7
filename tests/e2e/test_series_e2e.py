"""Issue 5's series of datasets end to end: one map task over three input datasets, on the real
web app, worker with beat and a pilot agent (Postgres + RabbitMQ).

- ``A`` is closed with its files before the task starts;
- ``B`` is pre-registered empty and stays open: its files arrive in batches while the task
  runs, and it is closed last;
- ``C`` is closed with its files.

The task follows ``B`` as it fills (the open ``B`` never holds up ``C``), stays ``running``
while ``B`` is open although every job it has is done, and ends ``finished`` only after ``B``
is closed. Every input file of the three datasets is processed exactly once: one input row per
catalogue entry, and the histograms of all outputs merge to exactly the seeds of all files.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from devtools.demo import demo_inputs_write
from files.dsm import get_dsm
from files.models import Dataset, DatasetEntry, DatasetState, File, FileType
from jobs.models import FINAL_JOB_STATES, Job, JobState
from payloads import histo
from tasks.create import task_create
from tasks.models import Task, TaskInput, TaskState
from tests.e2e.conftest import wait_until
from tests.factories import UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

EVENTS = 200
PER_JOB = 2


def _local(url: str) -> Path:
    return Path(unquote(urlparse(url).path))


def _all_final(task_id: int) -> bool:
    jobs = Job.objects.filter(task_id=task_id)
    return jobs.exists() and not jobs.exclude(state__in=FINAL_JOB_STATES).exists()


def test_a_task_over_three_datasets_follows_the_open_one_and_ends_after_its_close(
    make_stack, tmp_path
):
    owner = UserFactory()
    a_files, a_seeds = demo_inputs_write(
        directory=tmp_path / "a", files=5, events=EVENTS, base_seed=11_000
    )
    b_files, b_seeds = demo_inputs_write(
        directory=tmp_path / "b", files=7, events=EVENTS, base_seed=12_000
    )
    c_files, c_seeds = demo_inputs_write(
        directory=tmp_path / "c", files=4, events=EVENTS, base_seed=13_000
    )
    with get_dsm() as dsm:
        a, b, c = dsm.register_datasets(
            [{"name": "e2e.series.a"}, {"name": "e2e.series.b"}, {"name": "e2e.series.c"}]
        )
        dsm.register_files(a.uid, a_files)
        dsm.close_dataset(a.uid, source="command")
        dsm.register_files(c.uid, c_files)
        dsm.close_dataset(c.uid, source="command")
        # B: pre-registered, empty, open. Its first files come before the task starts.
        dsm.register_files(b.uid, b_files[:2])
    _stack, out = make_stack(cpu=1, gpu=0, slots=2, env={"WMS_FINALIZE_EVERY": "1"})
    out_url = (tmp_path / "outputs" / owner.username / "run").resolve().as_uri() + "/"
    task = task_create(
        owner=owner,
        name="series",
        executable="wms-payload-map",
        args=f"--events {EVENTS}",
        data_in_uids=[a.uid, b.uid, c.uid],
        files_per_job=PER_JOB,
        data_out_url=out_url,
        storage_url=out_url,
    )
    assert list(TaskInput.objects.filter(task=task).values_list("dataset_uid", flat=True)) == [
        a.uid,
        b.uid,
        c.uid,
    ]

    # A (3 jobs: 2+2+1) and C (2 jobs) are split and run; B's first two files make one job.
    # The open B holds up neither C nor the jobs already made.
    wait_until(
        lambda: Job.objects.filter(task=task).count() == 6 and _all_final(task.pk),
        timeout=180,
        what="the jobs of A, C and B's first files to end",
        out=out,
    )
    done_inputs = set(
        TaskInput.objects.filter(task=task, split_done_at__isnull=False).values_list(
            "dataset_uid", flat=True
        )
    )
    assert done_inputs == {a.uid, c.uid}
    # Every job it has is done, but B is open: the task goes on.
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING and task.output_closed_at is None

    # B's files arrive while the task runs: 3 now (one pair plus one that must wait for a
    # partner), then the last 2.
    with get_dsm() as dsm:
        dsm.register_files(b.uid, b_files[2:5])
    wait_until(
        lambda: Job.objects.filter(task=task).count() == 7 and _all_final(task.pk),
        timeout=120,
        what="a job for B's second batch",
        out=out,
    )
    # The odd file waits for more: it has no job yet, and the task is still running.
    waiting = DatasetEntry.objects.get(dataset__uid=b.uid, name=b_files[4]["name"])
    assert not File.objects.filter(task=task, type=FileType.INPUT, entry=waiting).exists()
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING
    with get_dsm() as dsm:
        dsm.register_files(b.uid, b_files[5:])
        # The task must not end before B is closed, even once these are processed.
    wait_until(
        lambda: Job.objects.filter(task=task).count() == 8 and _all_final(task.pk),
        timeout=120,
        what="a job for B's third batch",
        out=out,
    )
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING and task.output_closed_at is None
    with get_dsm() as dsm:
        dsm.close_dataset(b.uid, source="command")  # the producer is done: the last file goes

    wait_until(
        # the finalizer claims output_closed_at in its transaction and closes the output
        # dataset after that commits: both are awaited
        lambda: (
            Task.objects.filter(pk=task.pk, output_closed_at__isnull=False).exists()
            and Dataset.objects.filter(uid=task.data_out_uid, state=DatasetState.CLOSED).exists()
        ),
        timeout=180,
        what="the task to end after B's close and its output dataset to close",
        out=out,
    )
    task.refresh_from_db()
    assert task.state == TaskState.FINISHED, out.text()[-4000:]
    assert Dataset.objects.get(uid=task.data_out_uid).state == DatasetState.CLOSED
    assert TaskInput.objects.filter(task=task, split_done_at__isnull=True).count() == 0

    jobs = list(Job.objects.filter(task=task).order_by("id"))
    # ceil(5/2) + ceil(7/2) + ceil(4/2) jobs, each finished exactly once.
    assert len(jobs) == 3 + 4 + 2
    assert {j.state for j in jobs} == {JobState.FINISHED}
    assert task.jobs_finished == len(jobs) and task.jobs_failed == 0
    assert all(j.attempts.count() == 1 for j in jobs)

    # Every input file of the three datasets has exactly one input row, and a job reads from
    # one dataset only.
    inputs = File.objects.filter(task=task, type=FileType.INPUT)
    entries = DatasetEntry.objects.filter(dataset__uid__in=[a.uid, b.uid, c.uid])
    assert entries.count() == 16
    assert sorted(inputs.values_list("entry_id", flat=True)) == sorted(
        entries.values_list("id", flat=True)
    )
    for job in jobs:
        assert inputs.filter(job=job).values("dataset_id").distinct().count() == 1

    # The content: each output is the histogram of its own input files' seeds, and all the
    # outputs together hold every seed of the three datasets exactly once.
    seeds = {a.uid: a_seeds, b.uid: b_seeds, c.uid: c_seeds}
    for job in jobs:
        job_seeds = [
            seeds[uid][name]
            for name, uid in inputs.filter(job=job).values_list("file_name", "dataset__uid")
        ]
        expected = histo.generate([(seed, EVENTS) for seed in job_seeds])
        assert histo.load(_local(job.file_out.url)) == expected
    merged = histo.merge(histo.load(_local(j.file_out.url)) for j in jobs)
    assert sorted(merged.seeds) == sorted([*a_seeds.values(), *b_seeds.values(), *c_seeds.values()])
