"""The executor on the real Postgres and the real RabbitMQ."""

import math
from datetime import timedelta

import pytest
from django.utils import timezone

from files.services import dataset_add_files, dataset_close, dataset_register
from jobs.executor import dispatch, republish_stale
from jobs.models import Job, JobState
from tasks.models import Task, TaskState
from tasks.splitter import task_split
from tests.factories import TaskFactory
from wms import bus
from wms.switches import switch_set
from wms.topology import rank_to_priority


def _task(n: int, *, name: str, **kw):
    ds = dataset_register(name=name)
    dataset_add_files(dataset=ds, files=[{"name": f"{name}.{i:04d}", "size": i} for i in range(n)])
    dataset_close(dataset=ds, source="api")
    task = TaskFactory.create(data_in_uid=ds.uid, **kw)
    task_split(task_id=task.pk)
    return task


def test_jobs_reach_their_device_queue_with_priorities(db, bus_prefix, drain_queue):
    cpu = _task(10, name="cpu.ds", files_per_job=3, rank=40, device_type="cpu")
    gpu = _task(4, name="gpu.ds", files_per_job=1, rank=-20, device_type="gpu")
    result = dispatch()
    assert result.published == {"cpu": math.ceil(10 / 3), "gpu": 4}
    assert set(Job.objects.values_list("state", flat=True)) == {JobState.QUEUED}
    cpu_msgs, gpu_msgs = drain_queue("cpu"), drain_queue("gpu")
    assert len(cpu_msgs) == 4 and len(gpu_msgs) == 4
    assert {m["task_id"] for m, _ in cpu_msgs} == {cpu.pk}
    assert {m["task_id"] for m, _ in gpu_msgs} == {gpu.pk}
    assert {p for _, p in cpu_msgs} == {rank_to_priority(40)}
    assert {p for _, p in gpu_msgs} == {rank_to_priority(-20)}
    # messages carry what a pilot needs
    uuids = {str(u) for u in Job.objects.filter(task=cpu).values_list("uuid", flat=True)}
    assert {m["job_uuid"] for m, _ in cpu_msgs} == uuids
    assert sum(len(m["inputs"]) for m, _ in cpu_msgs) == 10
    first = cpu_msgs[0][0]
    assert first["v"] == 1 and first["attempt"] == 0 and first["device_type"] == "cpu"
    # every job has one defined→queued transition from the executor
    for job in Job.objects.all():
        assert list(job.transitions.values_list("from_state", "to_state", "source")) == [
            ("defined", "queued", "executor")
        ]


def test_higher_rank_is_claimed_first(db, bus_prefix, drain_queue, settings):
    settings.WMS_DISPATCH_MAX_PER_RUN = 3
    low = _task(3, name="low.ds", rank=0)
    high = _task(3, name="high.ds", rank=100)
    dispatch()
    assert set(Job.objects.filter(state=JobState.QUEUED).values_list("task_id", flat=True)) == {
        high.pk
    }
    assert Job.objects.filter(task=low, state=JobState.DEFINED).count() == 3


def test_backpressure_stops_at_max_depth(db, bus_prefix, drain_queue, settings):
    settings.WMS_QUEUE_MAX_DEPTH = 5
    _task(12, name="deep.ds")
    assert dispatch().published["cpu"] == 5
    assert dispatch().throttled == ["cpu", "gpu"] or dispatch().published.get("cpu", 0) == 0
    assert Job.objects.filter(state=JobState.QUEUED).count() == 5
    assert len(drain_queue("cpu")) == 5  # consumers took them
    assert dispatch().published["cpu"] == 5
    assert Job.objects.filter(state=JobState.DEFINED).count() == 2


def test_disabled_executor_globally_or_per_task(db, bus_prefix, drain_queue):
    task = _task(3, name="off.ds", executor_enabled=False)
    assert dispatch().total == 0
    Task.objects.filter(pk=task.pk).update(executor_enabled=True)
    switch_set(name="executor", enabled=False, by="test")
    assert dispatch().total == 0
    assert Job.objects.filter(state=JobState.DEFINED).count() == 3
    switch_set(name="executor", enabled=True, by="test")
    assert dispatch().total == 3
    assert len(drain_queue("cpu")) == 3


def test_paused_task_jobs_are_not_dispatched(db, bus_prefix):
    task = _task(2, name="paused.ds")
    Task.objects.filter(pk=task.pk).update(state=TaskState.PAUSED)
    assert dispatch().total == 0


def test_failed_publish_leaves_jobs_defined(db, bus_prefix, settings):
    _task(4, name="nobroker.ds")
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens there
    bus.reset_connection()
    result = dispatch()
    assert result.total == 0
    assert set(Job.objects.values_list("state", flat=True)) == {JobState.DEFINED}


def test_publish_failure_after_claim_returns_the_batch(db, bus_prefix, monkeypatch):
    """The broker fails between the claim and the publish: the batch goes back to defined."""
    _task(3, name="midway.ds")
    from wms.exceptions import BrokerError

    def refuse(messages):
        raise BrokerError("the broker refused the batch")

    monkeypatch.setattr(bus, "publish_jobs", refuse)
    result = dispatch()
    assert result.failed == 3 and result.total == 0
    assert set(Job.objects.values_list("state", flat=True)) == {JobState.DEFINED}
    job = Job.objects.first()
    assert list(job.transitions.values_list("to_state", flat=True)) == ["queued", "defined"]


def test_reconciler_republishes_stale_queued_jobs(db, bus_prefix, drain_queue):
    _task(3, name="stale.ds")
    dispatch()
    assert len(drain_queue("cpu")) == 3  # ... and the messages are then lost
    assert republish_stale(older_than=600) == 0  # not stale yet
    Job.objects.update(state_changed_at=timezone.now() - timedelta(minutes=11))
    assert republish_stale(older_than=600) == 3
    msgs = drain_queue("cpu")
    assert len(msgs) == 3
    assert {m["job_uuid"] for m, _ in msgs} == {
        str(u) for u in Job.objects.values_list("uuid", flat=True)
    }
    assert republish_stale(older_than=600) == 0  # once per timeout


@pytest.mark.parametrize("rank", [-32768, -100, -1, 0, 9, 10, 55, 32767])
def test_rank_to_priority_is_monotonic_and_bounded(rank):
    p = rank_to_priority(rank)
    assert 0 <= p <= 10
    assert rank_to_priority(rank + 10) >= p if rank < 32757 else True
