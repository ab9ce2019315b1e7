"""Real races on the real database: several threads, each with its own Postgres connection.

The deterministic races hold the winner's transaction open until the loser is seen blocked on
the winner's row lock in ``pg_stat_activity``; only then does the winner commit. So the loser
really read the old state, really tried its conditional UPDATE, and must find out it lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction

from files.models import DatasetEntry, DatasetState
from files.services import dataset_add_files, dataset_close
from jobs.models import AttemptState, Job, JobAttempt, JobState, JobTransition
from tasks.lifecycle import task_cancel
from tasks.models import Task, TaskState, TaskTransition
from tests.factories import DatasetFactory, JobAttemptFactory, JobFactory, TaskFactory
from wms.exceptions import DatasetClosed, InvalidTransition
from wms.statemachine import apply_transition, apply_transition_bulk

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="row locks and pg_stat_activity: Postgres"
    ),
]

TIMEOUT = 20


class Racer(threading.Thread):
    """Runs ``fn`` in a thread with its own database connection; keeps its result or error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()

    def outcome(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "racer did not finish"
        return self.error if self.error is not None else self.result


def _lock_waiters() -> int:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cur.fetchone()[0]


def _wait_for_lock_waiters(n: int = 1) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _lock_waiters() < n:
        assert time.monotonic() < deadline, f"expected {n} connection(s) blocked on a row lock"
        time.sleep(0.01)


def _held_race(first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """``first`` applies inside a transaction it keeps open; ``second`` runs meanwhile and
    blocks on the row; once it is seen blocked, ``first`` commits. Returns both outcomes."""
    barrier = threading.Barrier(2)
    applied, release = threading.Event(), threading.Event()

    def run_first():
        barrier.wait(TIMEOUT)
        with transaction.atomic():
            result = first()
            applied.set()
            if not release.wait(TIMEOUT):
                raise RuntimeError("never released")
        return result

    def run_second():
        barrier.wait(TIMEOUT)
        if not applied.wait(TIMEOUT):
            raise RuntimeError("first never applied")
        return second()

    a, b = Racer(run_first), Racer(run_second)
    a.start()
    b.start()
    try:
        _wait_for_lock_waiters(1)
    finally:
        release.set()
    return a.outcome(), b.outcome()


# --- two writers, the same transition ----------------------------------------------------------


def test_job_queued_to_running_twice_has_one_winner():
    job = JobFactory(state=JobState.QUEUED)

    first, second = _held_race(
        lambda: apply_transition(Job, job.pk, JobState.RUNNING, source="pilot:1"),
        lambda: apply_transition(Job, job.pk, JobState.RUNNING, source="pilot:2"),
    )

    assert first.won is True
    assert second.won is False  # the loser saw the winner's state: a no-op, not an error
    assert second.from_state == JobState.RUNNING
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    rows = list(JobTransition.objects.filter(subject=job).values_list("from_state", "source"))
    assert rows == [("queued", "pilot:1")]


def test_task_cancel_held_then_start_loses_with_invalid_transition():
    task = TaskFactory(state=TaskState.DEFINED)

    first, second = _held_race(
        lambda: apply_transition(Task, task.pk, TaskState.CANCELLED, source="api"),
        lambda: apply_transition(Task, task.pk, TaskState.RUNNING, source="splitter"),
    )

    assert first.won is True
    assert isinstance(second, InvalidTransition)
    assert second.current == TaskState.CANCELLED
    task.refresh_from_db()
    assert task.state == TaskState.CANCELLED
    rows = list(TaskTransition.objects.filter(subject=task).values_list("from_state", "to_state"))
    assert rows == [("defined", "cancelled")]


def test_task_start_held_then_cancel_only_from_defined_loses():
    task = TaskFactory(state=TaskState.DEFINED)

    first, second = _held_race(
        lambda: apply_transition(Task, task.pk, TaskState.RUNNING, source="splitter"),
        lambda: apply_transition(
            Task, task.pk, TaskState.CANCELLED, source="api", only_from=[TaskState.DEFINED]
        ),
    )

    assert first.won is True
    assert isinstance(second, InvalidTransition)
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING
    rows = list(TaskTransition.objects.filter(subject=task).values_list("from_state", "to_state"))
    assert rows == [("defined", "running")]


def test_task_start_held_then_cancel_is_serialised_after_it():
    """Both are legal one after the other: the loser of the first round re-reads the state it
    lost to and goes on from there; the log is a consistent chain, no lost update."""
    task = TaskFactory(state=TaskState.DEFINED)

    first, second = _held_race(
        lambda: apply_transition(Task, task.pk, TaskState.RUNNING, source="splitter"),
        lambda: apply_transition(Task, task.pk, TaskState.CANCELLED, source="api"),
    )

    assert first.won is True and second.won is True
    assert second.from_state == TaskState.RUNNING  # not "defined": it saw the winner's write
    task.refresh_from_db()
    assert task.state == TaskState.CANCELLED
    rows = list(TaskTransition.objects.filter(subject=task).values_list("from_state", "to_state"))
    assert rows == [("defined", "running"), ("running", "cancelled")]


# --- many writers ------------------------------------------------------------------------------


def _stampede(n: int, fn: Callable[[int], Any], hold: float = 0.05) -> list[Any]:
    """``n`` threads start together; each applies inside a transaction held ``hold`` seconds."""
    barrier = threading.Barrier(n)

    def make(i: int) -> Callable[[], Any]:
        def run():
            barrier.wait(TIMEOUT)
            with transaction.atomic():
                result = fn(i)
                time.sleep(hold)
            return result

        return run

    racers = [Racer(make(i)) for i in range(n)]
    for r in racers:
        r.start()
    return [r.outcome() for r in racers]


def test_eight_threads_same_transition_one_winner_one_row():
    job = JobFactory(state=JobState.QUEUED)

    outcomes = _stampede(
        8, lambda i: apply_transition(Job, job.pk, JobState.RUNNING, source=f"pilot:{i}")
    )

    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    winners = [i for i, o in enumerate(outcomes) if o.won]
    assert len(winners) == 1
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    rows = list(JobTransition.objects.filter(subject=job).values_list("source", flat=True))
    assert rows == [f"pilot:{winners[0]}"]


def test_eight_threads_cancel_versus_start_one_winner_one_row():
    task = TaskFactory(state=TaskState.DEFINED)
    targets = [TaskState.CANCELLED, TaskState.RUNNING] * 4

    outcomes = _stampede(
        8,
        lambda i: apply_transition(
            Task, task.pk, targets[i], source=f"t{i}", only_from=[TaskState.DEFINED]
        ),
    )

    winners = [i for i, o in enumerate(outcomes) if not isinstance(o, BaseException) and o.won]
    assert len(winners) == 1
    won_target = targets[winners[0]]
    for i, o in enumerate(outcomes):
        if i == winners[0]:
            continue
        if targets[i] == won_target:
            assert o.won is False  # same target: a no-op
        else:
            assert isinstance(o, InvalidTransition)  # the other target: refused
    task.refresh_from_db()
    assert task.state == won_target
    assert TaskTransition.objects.filter(subject=task).count() == 1


# --- the bulk path -----------------------------------------------------------------------------


def test_bulk_does_not_log_a_row_another_writer_moved_meanwhile():
    contested, free = JobFactory(state=JobState.DEFINED), JobFactory(state=JobState.DEFINED)

    first, second = _held_race(
        lambda: apply_transition(Job, contested.pk, JobState.QUEUED, source="executor-1"),
        lambda: apply_transition_bulk(
            Job,
            [contested.pk, free.pk],
            JobState.QUEUED,
            from_state=JobState.DEFINED,
            source="executor-2",
        ),
    )

    assert first.won is True
    assert second == [free.pk]
    assert list(
        JobTransition.objects.filter(subject=contested).values_list("source", flat=True)
    ) == ["executor-1"]
    assert list(JobTransition.objects.filter(subject=free).values_list("source", flat=True)) == [
        "executor-2"
    ]


def test_eight_bulk_writers_move_each_row_once():
    task = TaskFactory()
    pks = [JobFactory(task=task, state=JobState.DEFINED).pk for _ in range(40)]

    outcomes = _stampede(
        8,
        lambda i: apply_transition_bulk(
            Job, pks[i % 2 :], JobState.QUEUED, from_state=JobState.DEFINED, source=f"ex{i}"
        ),
        hold=0.02,
    )

    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    moved = [pk for o in outcomes for pk in o]
    assert sorted(moved) == sorted(pks)  # every row once, none twice
    assert Job.objects.filter(pk__in=pks, state=JobState.QUEUED).count() == len(pks)
    assert JobTransition.objects.filter(subject_id__in=pks).count() == len(pks)


# --- services racing ---------------------------------------------------------------------------


def test_task_cancel_while_a_job_finishes_cancels_the_rest():
    """A pilot reports a job finished while the user cancels its task: the task is cancelled,
    the finished job stays finished, the other jobs are cancelled; no 409 for the user."""
    task = TaskFactory(state=TaskState.RUNNING)
    finishing = JobFactory(task=task, state=JobState.RUNNING)
    attempt = JobAttemptFactory(job=finishing)
    waiting = JobFactory(task=task, state=JobState.DEFINED)

    def pilot_finishes():
        JobAttempt.objects.filter(pk=attempt.pk).update(state=AttemptState.FINISHED)
        return apply_transition(Job, finishing.pk, JobState.FINISHED, source="pilot:1")

    first, second = _held_race(
        pilot_finishes, lambda: task_cancel(task_id=task.pk, source="api", reason="user")
    )

    assert first.won is True
    assert not isinstance(second, BaseException), second
    assert second.won is True
    task.refresh_from_db()
    finishing.refresh_from_db()
    waiting.refresh_from_db()
    attempt.refresh_from_db()
    assert task.state == TaskState.CANCELLED
    assert finishing.state == JobState.FINISHED
    assert attempt.state == AttemptState.FINISHED and attempt.kill_requested_at is None
    assert waiting.state == JobState.CANCELLED
    assert list(
        JobTransition.objects.filter(subject=finishing).values_list("to_state", flat=True)
    ) == ["finished"]


def test_no_file_slips_into_a_dataset_being_closed():
    ds = DatasetFactory()

    first, second = _held_race(
        lambda: dataset_close(dataset=ds, source="api"),
        lambda: dataset_add_files(dataset=ds, files=[{"name": "late.root", "size": 1}]),
    )

    assert first.won is True
    assert isinstance(second, DatasetClosed)
    ds.refresh_from_db()
    assert (ds.state, ds.file_count) == (DatasetState.CLOSED, 0)
    assert not DatasetEntry.objects.filter(dataset=ds).exists()


def test_files_added_before_a_close_are_all_counted():
    ds = DatasetFactory()

    first, second = _held_race(
        lambda: dataset_add_files(
            dataset=ds, files=[{"name": f"f{i}.root", "size": 10} for i in range(3)]
        ),
        lambda: dataset_close(dataset=ds, source="api"),
    )

    assert len(first) == 3
    assert second.won is True
    ds.refresh_from_db()
    assert (ds.state, ds.file_count, ds.total_size) == (DatasetState.CLOSED, 3, 30)
    assert DatasetEntry.objects.filter(dataset=ds).count() == 3
