"""The writes of tasks (tasks.create, tasks.inputs, tasks.lifecycle) and tasks.selectors on
the real database: every write and read."""

from __future__ import annotations

import uuid

import pytest
from django.utils import timezone

from jobs.models import AttemptState, Job, JobState, JobTransition
from tasks.create import task_create, task_update
from tasks.lifecycle import task_cancel, task_pause, task_resume, task_transition
from tasks.models import Task, TaskState, TaskTransition
from tasks.selectors import task_job_counts, tasks_job_counts
from tests.factories import DatasetFactory, JobAttemptFactory, JobFactory, TaskFactory
from wms.exceptions import InvalidTransition, NotFound, ValidationFailed

pytestmark = pytest.mark.django_db


@pytest.fixture
def dataset():
    return DatasetFactory()


# --- task_create -------------------------------------------------------------------------------


def test_task_create_writes_every_field(user, dataset):
    task = task_create(
        owner=user,
        executable="wms-payload-map",
        data_in_uid=str(dataset.uid),
        args="--events 500",
        rank=7,
        device_type="gpu",
        mode="merge",
        storage_url="file:///storage",
        data_out_url=f"file:///out/{user.username}/reco-2024",
        name="reco-2024",
        files_per_job=3,
        max_retries=5,
        splitter_enabled=False,
        executor_enabled=False,
    )

    stored = Task.objects.get(pk=task.pk)
    assert stored.owner == user
    assert stored.state == TaskState.DEFINED
    assert stored.data_in_uid == dataset.uid
    assert (stored.executable, stored.args, stored.rank) == ("wms-payload-map", "--events 500", 7)
    assert (stored.device_type, stored.mode) == ("gpu", "merge")
    assert (stored.storage_url, stored.data_out_url) == (
        "file:///storage",
        f"file:///out/{user.username}/reco-2024",
    )
    assert (stored.name, stored.files_per_job, stored.max_retries) == ("reco-2024", 3, 5)
    assert stored.splitter_enabled is False and stored.executor_enabled is False
    assert not stored.transitions.exists()  # created in its initial state, no transition


def test_task_create_defaults(user, dataset):
    task = task_create(owner=user, executable="run.sh", data_in_uid=dataset.uid)
    task.refresh_from_db()
    assert (task.rank, task.device_type, task.mode) == (0, "cpu", "map")
    assert (task.files_per_job, task.max_retries) == (1, 3)
    assert task.splitter_enabled and task.executor_enabled


def test_task_create_reports_every_invalid_field_and_writes_nothing(user, dataset):
    with pytest.raises(ValidationFailed) as info:
        task_create(
            owner=user,
            executable="",
            data_in_uid=dataset.uid,
            rank=40000,
            device_type="tpu",
            mode="reduce",
            files_per_job=0,
            max_retries=101,
        )
    assert info.value.status == 400 and info.value.code == "validation_failed"
    assert set(info.value.detail) == {
        "executable",
        "rank",
        "device_type",
        "mode",
        "files_per_job",
        "max_retries",
    }
    assert all(isinstance(msgs, list) and msgs for msgs in info.value.detail.values())
    assert Task.objects.count() == 0


@pytest.mark.parametrize("uid", [None, ""])
def test_task_create_requires_an_input_dataset(user, uid):
    with pytest.raises(ValidationFailed) as info:
        task_create(owner=user, executable="run.sh", data_in_uid=uid)
    assert set(info.value.detail) == {"data_in_uid"}
    assert Task.objects.count() == 0


@pytest.mark.parametrize(
    "uid, message",
    [
        (uuid.uuid4(), "No dataset with this uid."),
        (str(uuid.uuid4()), "No dataset with this uid."),
        ("not-a-uuid", "Not a valid UUID."),
    ],
)
def test_task_create_unknown_input_dataset_is_a_field_error(user, uid, message):
    with pytest.raises(ValidationFailed) as info:
        task_create(owner=user, executable="run.sh", data_in_uid=uid)
    assert info.value.detail == {"data_in_uid": [message]}
    assert Task.objects.count() == 0


def test_one_dataset_may_feed_several_tasks(user, dataset):
    a = task_create(owner=user, executable="a", data_in_uid=dataset.uid)
    b = task_create(owner=user, executable="b", data_in_uid=dataset.uid)
    assert a.pk != b.pk and a.data_in_uid == b.data_in_uid == dataset.uid


# --- task_update -------------------------------------------------------------------------------


def test_task_update_rank_propagates_to_defined_jobs_only():
    task = TaskFactory(rank=1)
    defined = [JobFactory(task=task, state=JobState.DEFINED) for _ in range(3)]
    others = {
        state: JobFactory(task=task, state=state)
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.FINISHED, JobState.CANCELLED)
    }
    other_task_job = JobFactory(task=TaskFactory(rank=1), state=JobState.DEFINED)

    updated = task_update(task_id=task.pk, rank=50)

    assert updated.rank == 50
    task.refresh_from_db()
    assert task.rank == 50
    assert set(
        Job.objects.filter(pk__in=[j.pk for j in defined]).values_list("rank", flat=True)
    ) == {50}
    for job in others.values():
        job.refresh_from_db()
        assert job.rank == 1
    other_task_job.refresh_from_db()
    assert other_task_job.rank == 1


def test_task_update_other_fields_leave_jobs_alone():
    task = TaskFactory(rank=1, name="old")
    job = JobFactory(task=task, state=JobState.DEFINED)

    task_update(
        task_id=task.pk, name="new", max_retries=9, splitter_enabled=False, executor_enabled=False
    )

    task.refresh_from_db()
    assert (task.name, task.max_retries) == ("new", 9)
    assert task.splitter_enabled is False and task.executor_enabled is False
    job.refresh_from_db()
    assert job.rank == 1


@pytest.mark.parametrize("field", ["state", "executable", "data_in_uid", "owner", "bogus"])
def test_task_update_refuses_a_field_that_cannot_change(field):
    task = TaskFactory(rank=1)
    with pytest.raises(ValidationFailed) as info:
        task_update(task_id=task.pk, rank=9, **{field: "x"})
    assert info.value.detail == {field: ["This field cannot be changed."]}
    task.refresh_from_db()
    assert task.rank == 1


def test_task_update_invalid_value_writes_nothing():
    task = TaskFactory(rank=1)
    job = JobFactory(task=task)
    with pytest.raises(ValidationFailed) as info:
        task_update(task_id=task.pk, rank=99999)
    assert set(info.value.detail) == {"rank"}
    task.refresh_from_db()
    job.refresh_from_db()
    assert task.rank == 1 and job.rank == 1


def test_task_update_missing_task():
    with pytest.raises(NotFound):
        task_update(task_id=987654, rank=1)


# --- pause / resume / transition ---------------------------------------------------------------


def test_pause_and_resume_a_running_task():
    task = TaskFactory(state=TaskState.RUNNING)

    assert task_pause(task_id=task.pk, source="api", reason="maintenance").won
    task.refresh_from_db()
    assert task.state == TaskState.PAUSED

    assert task_resume(task_id=task.pk, source="admin").won
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING

    rows = list(task.transitions.values_list("from_state", "to_state", "source", "reason"))
    assert rows == [
        ("running", "paused", "api", "maintenance"),
        ("paused", "running", "admin", ""),
    ]


def test_pause_twice_is_a_no_op():
    task = TaskFactory(state=TaskState.RUNNING)
    assert task_pause(task_id=task.pk, source="api").won
    assert task_pause(task_id=task.pk, source="api").won is False
    assert task.transitions.count() == 1


@pytest.mark.parametrize("state", [TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED])
def test_pause_and_resume_of_a_final_task_are_refused(state):
    task = TaskFactory(state=state)
    with pytest.raises(InvalidTransition):
        task_pause(task_id=task.pk, source="api")
    with pytest.raises(InvalidTransition):
        task_resume(task_id=task.pk, source="api")
    task.refresh_from_db()
    assert task.state == state
    assert not task.transitions.exists()


def test_task_transition_missing_task():
    with pytest.raises(NotFound):
        task_transition(task_id=987654, target=TaskState.RUNNING, source="api")


# --- task_cancel -------------------------------------------------------------------------------


def test_task_cancel_cancels_every_job_that_is_not_final():
    task = TaskFactory(state=TaskState.RUNNING)
    jobs = {state: JobFactory(task=task, state=state) for state in JobState.values}
    running_job = jobs[JobState.RUNNING]
    old_attempt = JobAttemptFactory(job=running_job, number=0, state=AttemptState.FAILED)
    running_job.cur_retry = 1
    running_job.save(update_fields=["cur_retry"])
    attempt = JobAttemptFactory(job=running_job, number=1)
    other_task_job = JobFactory(state=JobState.RUNNING)
    before = timezone.now()

    result = task_cancel(task_id=task.pk, source="api", reason="wrong input")

    assert result.won and result.from_state == TaskState.RUNNING
    task.refresh_from_db()
    assert task.state == TaskState.CANCELLED
    assert list(task.transitions.values_list("from_state", "to_state", "source", "reason")) == [
        ("running", "cancelled", "api", "wrong input")
    ]
    expected = {
        JobState.DEFINED: JobState.CANCELLED,
        JobState.QUEUED: JobState.CANCELLED,
        JobState.HELD: JobState.CANCELLED,
        JobState.RUNNING: JobState.CANCELLED,
        JobState.FINISHED: JobState.FINISHED,
        JobState.FAILED: JobState.FAILED,
        JobState.CANCELLED: JobState.CANCELLED,
    }
    for was, job in jobs.items():
        job.refresh_from_db()
        assert job.state == expected[was], was
        moved = was in (JobState.DEFINED, JobState.QUEUED, JobState.HELD, JobState.RUNNING)
        assert job.transitions.count() == (1 if moved else 0), was
        if moved:
            assert job.time_end is not None and job.time_end >= before
            row = job.transitions.get()
            assert (row.from_state, row.to_state, row.source) == (was, "cancelled", "api")
    # the running attempt is marked cancelled with the time the kill was asked for
    attempt.refresh_from_db()
    assert attempt.state == AttemptState.CANCELLED
    assert attempt.kill_requested_at is not None and attempt.kill_requested_at >= before
    assert attempt.ended_at == attempt.kill_requested_at
    old_attempt.refresh_from_db()
    assert old_attempt.state == AttemptState.FAILED and old_attempt.kill_requested_at is None
    other_task_job.refresh_from_db()
    assert other_task_job.state == JobState.RUNNING


@pytest.mark.parametrize("state", [TaskState.DEFINED, TaskState.PAUSED])
def test_task_cancel_from_defined_or_paused(state):
    task = TaskFactory(state=state)
    job = JobFactory(task=task, state=JobState.DEFINED)
    assert task_cancel(task_id=task.pk, source="admin").won
    task.refresh_from_db()
    job.refresh_from_db()
    assert task.state == job.state == "cancelled"
    assert job.transitions.get().reason == f"task {task.pk} cancelled"


def test_task_cancel_twice_is_idempotent():
    task = TaskFactory(state=TaskState.RUNNING)
    job = JobFactory(task=task, state=JobState.QUEUED)
    assert task_cancel(task_id=task.pk, source="api").won
    again = task_cancel(task_id=task.pk, source="api")
    assert again.won is False
    assert TaskTransition.objects.filter(subject=task).count() == 1
    assert JobTransition.objects.filter(subject=job).count() == 1


@pytest.mark.parametrize("state", [TaskState.FINISHED, TaskState.FAILED])
def test_task_cancel_of_a_finished_task_is_refused_and_changes_nothing(state):
    task = TaskFactory(state=state)
    job = JobFactory(task=task, state=JobState.DEFINED)  # a straggler, must stay untouched
    with pytest.raises(InvalidTransition) as info:
        task_cancel(task_id=task.pk, source="api")
    assert info.value.current == state
    task.refresh_from_db()
    job.refresh_from_db()
    assert task.state == state and job.state == JobState.DEFINED
    assert not task.transitions.exists() and not job.transitions.exists()


def test_task_cancel_missing_task():
    with pytest.raises(NotFound):
        task_cancel(task_id=987654, source="api")


# --- selectors ---------------------------------------------------------------------------------


def test_task_job_counts_every_state_present():
    task = TaskFactory()
    for state, n in ((JobState.DEFINED, 3), (JobState.RUNNING, 2), (JobState.FINISHED, 1)):
        for _ in range(n):
            JobFactory(task=task, state=state)
    JobFactory(state=JobState.DEFINED)  # another task's job

    counts = task_job_counts(task_id=task.pk)

    assert counts == {
        "defined": 3,
        "queued": 0,
        "held": 0,
        "running": 2,
        "finished": 1,
        "failed": 0,
        "cancelled": 0,
    }


def test_task_job_counts_of_a_task_without_jobs_is_all_zero():
    task = TaskFactory()
    assert task_job_counts(task_id=task.pk) == {s: 0 for s in JobState.values}
    assert task_job_counts(task_id=987654) == {s: 0 for s in JobState.values}


def test_tasks_job_counts_in_one_query(django_assert_num_queries):
    tasks = [TaskFactory() for _ in range(4)]
    for i, task in enumerate(tasks):
        for _ in range(i):
            JobFactory(task=task, state=JobState.QUEUED)
        JobFactory(task=task, state=JobState.FAILED)

    with django_assert_num_queries(1):
        counts = tasks_job_counts(task_ids=(t.pk for t in tasks))

    assert set(counts) == {t.pk for t in tasks}
    for i, task in enumerate(tasks):
        assert counts[task.pk]["queued"] == i
        assert counts[task.pk]["failed"] == 1
        assert sum(counts[task.pk].values()) == i + 1


def test_tasks_job_counts_of_nothing():
    assert tasks_job_counts(task_ids=[]) == {}


# --- the output dataset ------------------------------------------------------------------------


def test_task_create_registers_its_output_dataset_in_the_dsm(user, dataset, settings):
    from files.dsm import get_dsm

    settings.WMS_OUTPUT_ROOT = "file:///data/wms/"
    task = task_create(owner=user, executable="run.sh", data_in_uid=dataset.uid, name="reco")
    twin = task_create(owner=user, executable="run.sh", data_in_uid=dataset.uid, name="reco")

    task.refresh_from_db()
    assert task.data_out_url == f"file:///data/wms/{user.username}/task-{task.pk}"
    with get_dsm() as dsm:
        info = dsm.get_dataset(task.data_out_uid)
    assert (info.name, info.role, info.state, info.location) == (
        f"reco.{task.pk}.out",
        "output",
        "open",
        task.data_out_url,
    )
    assert twin.data_out_uid != task.data_out_uid  # same task name, distinct datasets


def test_task_create_keeps_a_given_output_url_and_names_a_nameless_task(user, dataset, settings):
    from files.models import Dataset

    settings.WMS_OUTPUT_ROOT = "root://EOS.example.org//wms"
    given = f"root://eos.example.org//wms/{user.username}//reco/./v1/"
    task = task_create(owner=user, executable="run.sh", data_in_uid=dataset.uid, data_out_url=given)
    place = f"root://eos.example.org/wms/{user.username}/reco/v1"  # canonical
    out = Dataset.objects.get(uid=task.data_out_uid)
    assert (out.name, out.location) == (f"task.{task.pk}.out", place)
    assert Task.objects.get(pk=task.pk).data_out_url == place


def test_an_invalid_task_registers_no_output_dataset(user, dataset):
    from files.models import Dataset

    with pytest.raises(ValidationFailed):
        task_create(owner=user, executable="", data_in_uid=dataset.uid)
    assert not Dataset.objects.filter(role="output").exists()
