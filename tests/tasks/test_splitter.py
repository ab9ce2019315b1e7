"""The splitter on the real Postgres: files become jobs, exactly once."""

import math
import threading

import pytest
from django.db import connection

from files.dsm.local import LocalDSMClient
from files.models import File, FileType
from files.services import dataset_add_files, dataset_close, dataset_register
from jobs.models import Job
from tasks.models import Task, TaskInput, TaskState
from tasks.splitter import split_all, task_split
from tests.factories import TaskFactory
from wms.switches import switch_set


def _dataset(n: int, name: str = "mc.test"):
    ds = dataset_register(name=name)
    if n:
        dataset_add_files(
            dataset=ds,
            files=[{"name": f"f{i:05d}.root", "size": 100 + i} for i in range(n)],
        )
    return ds


@pytest.mark.parametrize(("n_files", "per_job"), [(10, 1), (10, 3), (7, 7), (1, 5), (25, 4)])
def test_closed_dataset_gives_ceil_n_over_k_jobs(db, n_files, per_job):
    ds = _dataset(n_files)
    dataset_close(dataset=ds, source="api")
    task = TaskFactory(data_in_uid=ds.uid, files_per_job=per_job)
    result = task_split(task_id=task.pk)
    assert result.jobs == math.ceil(n_files / per_job)
    assert Job.objects.filter(task=task).count() == math.ceil(n_files / per_job)
    inputs = File.objects.filter(task=task, type=FileType.INPUT)
    assert inputs.count() == n_files
    assert inputs.values("entry").distinct().count() == n_files
    # each job: file_in is its first input, at most per_job inputs, inherits the task
    for job in Job.objects.filter(task=task).prefetch_related("files"):
        names = sorted(f.file_name for f in job.files.all())
        assert 1 <= len(names) <= per_job
        assert job.file_in.file_name == names[0]
        assert (job.executable, job.rank, job.retries) == (
            task.executable,
            task.rank,
            task.max_retries,
        )
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING
    assert (
        task.transitions.filter(from_state="defined", to_state="running", source="splitter").count()
        == 1
    )


def test_open_dataset_keeps_a_short_group_until_closed(db):
    ds = _dataset(7)
    task = TaskFactory(data_in_uid=ds.uid, files_per_job=3)
    assert task_split(task_id=task.pk).jobs == 2  # 6 files, 1 waits
    dataset_add_files(dataset=ds, files=[{"name": "late.root", "size": 1}])
    assert task_split(task_id=task.pk).jobs == 0  # 2 waiting files, still open
    dataset_close(dataset=ds, source="api")
    assert task_split(task_id=task.pk).jobs == 1
    assert File.objects.filter(task=task, type=FileType.INPUT).count() == 8
    assert task_split(task_id=task.pk).jobs == 0


def test_running_twice_creates_nothing_new(db):
    ds = _dataset(30)
    task = TaskFactory(data_in_uid=ds.uid)
    assert task_split(task_id=task.pk).jobs == 30
    assert task_split(task_id=task.pk).jobs == 0
    # even with the cursor reset, the unique constraint refuses a second job for a file
    TaskInput.objects.filter(task=task).update(split_cursor=None, split_done_at=None)
    with pytest.raises(Exception):  # noqa: B017 - IntegrityError through the ORM
        task_split(task_id=task.pk)
    assert Job.objects.filter(task=task).count() == 30


@pytest.mark.django_db(transaction=True)
def test_two_threads_split_one_task_without_duplicates():
    ds = _dataset(500, name="mc.race")
    dataset_close(dataset=ds, source="api")
    task = TaskFactory(data_in_uid=ds.uid, files_per_job=2)
    barrier = threading.Barrier(2)
    results, errors = [], []

    def run():
        try:
            barrier.wait()
            results.append(task_split(task_id=task.pk).jobs)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(results) == 250
    assert Job.objects.filter(task=task).count() == 250
    assert (
        File.objects.filter(task=task, type=FileType.INPUT).values("entry").distinct().count()
        == 500
    )


def test_one_dataset_feeds_two_tasks(db):
    ds = _dataset(5)
    t1, t2 = TaskFactory(data_in_uid=ds.uid), TaskFactory(data_in_uid=ds.uid)
    assert task_split(task_id=t1.pk).jobs == 5
    assert task_split(task_id=t2.pk).jobs == 5


def test_disabled_splitter_does_nothing_until_enabled(db):
    ds = _dataset(4)
    task = TaskFactory(data_in_uid=ds.uid, splitter_enabled=False)
    assert task_split(task_id=task.pk).jobs == 0
    Task.objects.filter(pk=task.pk).update(splitter_enabled=True)
    switch_set(name="splitter", enabled=False, by="test")
    assert split_all().__len__() == 0
    assert task_split(task_id=task.pk).jobs == 0
    assert Job.objects.filter(task=task).count() == 0
    switch_set(name="splitter", enabled=True, by="test")
    assert sum(r.jobs for r in split_all()) == 4


def test_paused_or_cancelled_tasks_are_not_split(db):
    ds = _dataset(3)
    paused = TaskFactory(data_in_uid=ds.uid, state=TaskState.PAUSED)
    cancelled = TaskFactory(data_in_uid=ds.uid, state=TaskState.CANCELLED)
    assert task_split(task_id=paused.pk).jobs == 0
    assert task_split(task_id=cancelled.pk).jobs == 0


def test_beat_cycle_runs_once_per_interval(db, settings):
    settings.WMS_SPLIT_EVERY = 3600
    ds = _dataset(2)
    TaskFactory(data_in_uid=ds.uid)
    first = split_all(beat=True)
    second = split_all(beat=True)  # a second beat in the same cycle
    assert sum(r.jobs for r in first) == 2
    assert second == []


def test_portable_bulk_create_path_gives_the_same_jobs(db, settings):
    """WMS_BULK_COPY=false: the path SQLite takes, run here on Postgres."""
    settings.WMS_BULK_COPY = False
    ds = _dataset(11)
    dataset_close(dataset=ds, source="api")
    task = TaskFactory(data_in_uid=ds.uid, files_per_job=4)
    assert task_split(task_id=task.pk).jobs == 3
    for job in Job.objects.filter(task=task):
        first = job.files.filter(type=FileType.INPUT).order_by("id").first()
        assert job.file_in_id == first.id
    assert File.objects.filter(task=task, type=FileType.INPUT).count() == 11


def test_resume_applies_only_to_a_paused_task(db):
    from tasks.lifecycle import task_pause, task_resume
    from wms.exceptions import InvalidTransition

    ds = _dataset(1)
    task = TaskFactory(data_in_uid=ds.uid)
    with pytest.raises(InvalidTransition):
        task_resume(task_id=task.pk, source="api")  # defined: the splitter starts it
    task_pause(task_id=task.pk, source="api")
    assert task_split(task_id=task.pk).jobs == 0
    assert task_resume(task_id=task.pk, source="api").won
    assert task_split(task_id=task.pk).jobs == 1


def test_groups_span_dsm_pages(db, settings):
    settings.WMS_SPLIT_PAGE = 4  # pages of 4 files, groups of 3
    ds = _dataset(10)
    dataset_close(dataset=ds, source="api")
    task = TaskFactory(data_in_uid=ds.uid, files_per_job=3)
    assert task_split(task_id=task.pk).jobs == 4
    sizes = sorted(j.files.count() for j in Job.objects.filter(task=task))
    assert sizes == [1, 3, 3, 3]


class _WatchingDSM(LocalDSMClient):
    """The local DSM, with a hook run at every ``list_files`` call (the splitter's DSM reads)."""

    def __init__(self, hook) -> None:
        super().__init__()
        self.hook = hook
        self.calls = 0

    def list_files(self, dataset_uid, *, after=None, limit=1000):
        self.calls += 1
        self.hook(self.calls)
        return super().list_files(dataset_uid, after=after, limit=limit)


def _in_other_connection(fn):
    """Run ``fn`` in a thread with its own database connection; return its result or raise."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as exc:
            out["error"] = exc
        finally:
            connection.close()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.mark.django_db(transaction=True)
def test_the_dsm_is_read_with_no_row_of_the_task_locked(settings):
    """A slow external DSM must never keep the task row locked: while the splitter reads, a
    cancel (another connection, NOWAIT) takes the task row at once."""
    settings.WMS_SPLIT_PAGE = 10
    ds = _dataset(30, name="mc.nolock")
    dataset_close(dataset=ds, source="api")
    task = TaskFactory(data_in_uid=ds.uid)
    seen = []

    def lock_it(_call):
        def grab():
            from django.db import transaction

            with transaction.atomic():
                Task.objects.select_for_update(nowait=True).get(pk=task.pk)
                TaskInput.objects.select_for_update(nowait=True).filter(task=task).count()
            return True

        seen.append(_in_other_connection(grab))  # DatabaseError (lock not available) if held

    dsm = _WatchingDSM(lock_it)
    assert task_split(task_id=task.pk, dsm=dsm).jobs == 30
    assert dsm.calls == 3 and seen == [True] * 3  # 3 pages of 10


@pytest.mark.django_db(transaction=True)
def test_a_task_cancelled_while_the_dsm_is_read_gets_no_more_jobs(settings):
    from tasks.lifecycle import task_cancel

    settings.WMS_SPLIT_PAGE = 10
    ds = _dataset(30, name="mc.cancelmid")
    dataset_close(dataset=ds, source="api")
    task = TaskFactory(data_in_uid=ds.uid)

    def cancel_on_second_page(call):
        if call == 2:  # the first page's jobs are written; cancel before the second's
            _in_other_connection(lambda: task_cancel(task_id=task.pk, source="api"))

    result = task_split(task_id=task.pk, dsm=_WatchingDSM(cancel_on_second_page))

    assert result.jobs == 10
    assert Job.objects.filter(task=task).count() == 10
    assert set(Job.objects.filter(task=task).values_list("state", flat=True)) == {"cancelled"}
    cursor = TaskInput.objects.get(task=task).split_cursor
    assert File.objects.filter(task=task, type=FileType.INPUT, entry_id__gt=cursor).count() == 0
    assert Task.objects.get(pk=task.pk).state == TaskState.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_a_splitter_that_read_a_page_another_one_wrote_drops_it(settings):
    """Two splitters read the same files; the one whose cursor moved under it writes nothing
    (compare-and-set on the input's cursor), and every file still has exactly one job."""
    settings.WMS_SPLIT_PAGE = 10
    ds = _dataset(20, name="mc.cas")
    dataset_close(dataset=ds, source="api")
    task = TaskFactory(data_in_uid=ds.uid)
    other = []

    def race(call):
        if call == 1:  # this run read nothing yet; another splitter does the whole task now
            other.append(_in_other_connection(lambda: task_split(task_id=task.pk).jobs))

    mine = task_split(task_id=task.pk, dsm=_WatchingDSM(race))

    assert other == [20] and mine.jobs == 0
    assert Job.objects.filter(task=task).count() == 20
    assert (
        File.objects.filter(task=task, type=FileType.INPUT).values("entry").distinct().count() == 20
    )
    assert TaskInput.objects.get(task=task).split_done_at is not None


def test_a_dataset_that_gained_files_kicks_the_tasks_still_reading_it(db):
    """files kicks ``wms.split_dataset`` by name (it imports no tasks); the tasks app finds
    the tasks to split: active, and not done with the dataset."""
    from tasks.selectors import tasks_reading
    from tasks.tasks import split_dataset

    ds = _dataset(2)
    reading = TaskFactory(data_in_uid=ds.uid, state=TaskState.RUNNING)
    done = TaskFactory(data_in_uid=ds.uid, state=TaskState.RUNNING)
    TaskFactory(data_in_uid=ds.uid, state=TaskState.FINISHED)  # ended: not kicked
    TaskInput.objects.filter(task=done).update(split_done_at=done.created_at)

    assert tasks_reading(dataset_uid=ds.uid) == [reading.pk]
    assert split_dataset(str(ds.uid)) == 1


TEST_FILE_ROOT = "file:///data"


def test_only_an_input_dataset_that_gained_files_or_closed_kicks_the_splitter(db, monkeypatch):
    """An output dataset gains a file with every final report: it is read by no task (only
    input datasets are), so it kicks nothing, and a worker is not woken for every job."""
    from files import services as files_services
    from files.models import DatasetRole
    from tests.factories import DatasetFactory

    kicked: list[str] = []
    monkeypatch.setattr(
        files_services, "kick_split_dataset", lambda *, dataset_uid: kicked.append(dataset_uid)
    )
    inputs = DatasetFactory(role=DatasetRole.INPUT)
    outputs = DatasetFactory(role=DatasetRole.OUTPUT)
    for ds in (inputs, outputs):
        files_services.dataset_add_files(
            dataset=ds,
            files=[{"name": "a.root", "size": 1, "url": f"{TEST_FILE_ROOT}/{ds.uid}/a.root"}],
            url_roots=[TEST_FILE_ROOT],
        )
        files_services.dataset_close(dataset=ds, source="test")

    assert kicked == [str(inputs.uid), str(inputs.uid)]
