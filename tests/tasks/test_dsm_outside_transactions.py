"""The DSM is never called inside a transaction (docs/architecture.md, "The DSM"): task_create,
task_add_inputs and task_retry_failed ask and register first, then write in one short
transaction; a failure of that write leaves nothing half made.

Against the fake external DSM of tests/files/fake_dsm.py (a real HTTP server): every call the
WMS's client sends is watched, on its way out, for an open transaction on the database
connection (``connection.in_atomic_block``). The tests are transactional (``transaction=True``):
no test transaction wraps them, so what is seen is the service's own. A failure of the write is
a real one: a trigger planted in PostgreSQL refuses the statement.
"""

from __future__ import annotations

import uuid

import pytest
from django.db import DatabaseError, connection
from django.urls import reverse

from files.dsm.http import HTTPDSMClient
from jobs.models import Job, JobState
from tasks.create import output_dataset_uid, task_create
from tasks.finalizer import task_finalize
from tasks.inputs import task_add_inputs
from tasks.lifecycle import task_retry_failed, task_transition
from tasks.models import Task, TaskInput, TaskState
from tests.factories import JobFactory, UserFactory
from tests.files.fake_dsm import FakeDSM
from wms.exceptions import DSMError

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "dsm-owners-token"


@pytest.fixture
def server():
    fake = FakeDSM(token=TOKEN).start()
    yield fake
    fake.stop()


@pytest.fixture
def calls(server, settings, monkeypatch):
    """The HTTP DSM is the configured one; each call it sends is recorded with whether a
    transaction was open on the database connection at that moment."""
    settings.WMS_DSM_BACKEND = "http"
    settings.WMS_DSM_URL = server.url
    settings.WMS_DSM_TOKEN = TOKEN
    settings.WMS_DSM_BACKOFF = 0.01
    seen: list[tuple[str, str, bool]] = []
    send = HTTPDSMClient._request

    def watched(self, method, path, **kwargs):
        seen.append((method, path, connection.in_atomic_block))
        return send(self, method, path, **kwargs)

    monkeypatch.setattr(HTTPDSMClient, "_request", watched)
    return seen


@pytest.fixture
def dsm(server):
    client = HTTPDSMClient(server.url, token=TOKEN, backoff=0.01)
    yield client
    client.close()


def in_transaction(calls):
    return [(method, path) for method, path, atomic in calls if atomic]


class PlantedFailure:
    """``plant("INSERT")``: PostgreSQL refuses that statement on tasks_task until ``remove()``
    (or the test's end)."""

    def plant(self, statement: str) -> None:
        with connection.cursor() as cur:
            cur.execute(
                "CREATE OR REPLACE FUNCTION owners_planted_failure() RETURNS trigger AS $$ "
                "BEGIN RAISE EXCEPTION 'planted failure'; END $$ LANGUAGE plpgsql"
            )
            cur.execute(
                f"CREATE TRIGGER owners_planted_failure BEFORE {statement} ON tasks_task "
                "FOR EACH ROW EXECUTE FUNCTION owners_planted_failure()"
            )

    def remove(self) -> None:
        with connection.cursor() as cur:
            cur.execute("DROP TRIGGER IF EXISTS owners_planted_failure ON tasks_task")
            cur.execute("DROP FUNCTION IF EXISTS owners_planted_failure()")


@pytest.fixture
def failure():
    if connection.vendor != "postgresql":
        pytest.skip("the planted failure is a PostgreSQL trigger")
    planted = PlantedFailure()
    yield planted
    planted.remove()


def outputs(server, suffix=".out"):
    return [d for d in server.datasets.values() if d.role == "output" and d.name.endswith(suffix)]


def ended_task_with_failed_jobs(dsm, owner, n_failed=2):
    """A finished task whose output dataset the DSM has closed, with failed jobs."""
    data_in = dsm.register_dataset("owners.in")
    task = task_create(owner=owner, executable="noop", data_in_uid=data_in.uid, name="rt")
    JobFactory.create_batch(n_failed, task=task, state=JobState.FAILED)
    for target in (TaskState.RUNNING, TaskState.FINISHED):
        task_transition(task_id=task.pk, target=target, source="system")
    dsm.close_dataset(task.data_out_uid)
    return Task.objects.get(pk=task.pk)


def test_task_create_asks_and_registers_outside_any_transaction(calls, dsm):
    data_in = dsm.register_dataset("owners.create.in")
    calls.clear()

    task = task_create(owner=UserFactory(), executable="noop", data_in_uid=data_in.uid)

    assert ("POST", "/datasets") in {(m, p) for m, p, _ in calls}  # the output registered
    assert any(m == "GET" for m, _, _ in calls)  # the input resolved
    assert in_transaction(calls) == []
    assert task.data_out_uid == output_dataset_uid(task.pk)
    assert dsm.get_dataset(task.data_out_uid).name == f"task.{task.pk}.out"


def test_task_add_inputs_resolves_outside_any_transaction(calls, dsm):
    first = dsm.register_dataset("owners.add.a")
    task = task_create(owner=UserFactory(), executable="noop", data_in_uid=first.uid)
    second = dsm.register_dataset("owners.add.b")
    calls.clear()

    rows = task_add_inputs(task_id=task.pk, data_in_uids=[second.uid])

    assert [r.dataset_uid for r in rows] == [second.uid]
    assert calls and in_transaction(calls) == []


def test_task_retry_failed_registers_the_new_output_outside_any_transaction(calls, dsm):
    task = ended_task_with_failed_jobs(dsm, UserFactory())
    calls.clear()

    assert task_retry_failed(task_id=task.pk, source="api") == 2

    assert ("POST", "/datasets") in {(m, p) for m, p, _ in calls}
    assert in_transaction(calls) == []
    task.refresh_from_db()
    assert task.state == TaskState.RUNNING
    assert dsm.get_dataset(task.data_out_uid).name == f"rt.{task.pk}.out.r1"


def test_a_retry_whose_write_failed_leaves_nothing_and_its_retry_reuses_the_dataset(
    calls, dsm, server, failure
):
    task = ended_task_with_failed_jobs(dsm, UserFactory())
    old_output = task.data_out_uid
    failure.plant("UPDATE")

    with pytest.raises(DatabaseError, match="planted failure"):
        task_retry_failed(task_id=task.pk, source="api")

    # nothing half made: the jobs, the task and its output are what they were
    task.refresh_from_db()
    assert (task.state, task.data_out_uid) == (TaskState.FINISHED, old_output)
    assert set(Job.objects.filter(task=task).values_list("state", flat=True)) == {"failed"}
    registered = outputs(server, ".out.r1")
    assert len(registered) == 1  # registered before the write, and only once

    failure.remove()
    assert task_retry_failed(task_id=task.pk, source="api") == 2

    task.refresh_from_db()
    assert task.state == TaskState.RUNNING
    assert str(task.data_out_uid) == registered[0].uid  # the same dataset, found again
    assert len(outputs(server, ".out.r1")) == 1  # no orphan duplicate
    assert in_transaction(calls) == []


def test_a_create_whose_write_failed_leaves_no_task_and_no_open_output(calls, dsm, server, failure):
    data_in = dsm.register_dataset("owners.fail.in")
    owner = UserFactory()
    failure.plant("INSERT")

    with pytest.raises(DatabaseError, match="planted failure"):
        task_create(owner=owner, executable="noop", data_in_uid=data_in.uid, name="lost")

    assert not Task.objects.exists() and not TaskInput.objects.exists()
    [abandoned] = outputs(server)
    assert (abandoned.state, abandoned.files) == ("closed", [])  # it takes no file

    failure.remove()
    task = task_create(owner=owner, executable="noop", data_in_uid=data_in.uid, name="lost")

    assert Task.objects.get().pk == task.pk
    open_outputs = [d for d in outputs(server) if d.state == "open"]
    assert [uuid.UUID(d.uid) for d in open_outputs] == [task.data_out_uid]
    assert in_transaction(calls) == []


def test_task_finalize_ends_a_task_and_closes_its_output_outside_any_transaction(calls, dsm):
    """The finalizer reads the inputs (closed, fully split) and closes the output dataset in
    the DSM outside its transaction: the output is claimed first, so a retry meanwhile takes
    a new dataset."""
    data_in = dsm.register_dataset("owners.fin.in")
    dsm.close_dataset(data_in.uid)
    task = task_create(owner=UserFactory(), executable="noop", data_in_uid=data_in.uid)
    task_transition(task_id=task.pk, target=TaskState.RUNNING, source="system")
    calls.clear()

    result = task_finalize(task_id=task.pk, dsm=dsm)

    assert (result.state, result.output_closed) == (TaskState.FINISHED, True)
    assert any(m == "GET" for m, _, _ in calls)  # the input's state read
    assert calls and in_transaction(calls) == []
    task.refresh_from_db()
    assert task.output_closed_at is not None
    assert not dsm.get_dataset(task.data_out_uid).is_open


def test_a_close_the_dsm_refused_is_taken_back_and_done_by_the_next_cycle(calls, dsm, monkeypatch):
    data_in = dsm.register_dataset("owners.fin2.in")
    dsm.close_dataset(data_in.uid)
    task = task_create(owner=UserFactory(), executable="noop", data_in_uid=data_in.uid)
    task_transition(task_id=task.pk, target=TaskState.RUNNING, source="system")
    real_close = dsm.close_dataset

    def refuse(*args, **kwargs):
        raise DSMError("the DSM is down")

    monkeypatch.setattr(dsm, "close_dataset", refuse)
    with pytest.raises(DSMError):
        task_finalize(task_id=task.pk, dsm=dsm)
    task.refresh_from_db()
    assert task.state == TaskState.FINISHED and task.output_closed_at is None  # taken back
    assert dsm.get_dataset(task.data_out_uid).is_open

    monkeypatch.setattr(dsm, "close_dataset", real_close)
    assert task_finalize(task_id=task.pk, dsm=dsm).output_closed
    task.refresh_from_db()
    assert task.output_closed_at is not None and not dsm.get_dataset(task.data_out_uid).is_open


def test_a_task_added_in_the_admin_asks_the_dsm_outside_any_transaction(calls, dsm, client):
    data_in = dsm.register_dataset("owners.admin.in")
    admin_user = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(admin_user)
    calls.clear()

    response = client.post(
        reverse("admin:tasks_task_add"),
        {
            "name": "from-the-admin",
            "executable": "wms-payload-map",
            "args": "",
            "data_in_uid": str(data_in.uid),
            "device_type": "cpu",
            "mode": "map",
            "rank": "0",
            "files_per_job": "1",
            "max_retries": "1",
            "max_failed_fraction": "0",
            "storage_url": "",
            "data_out_url": "",
            "splitter_enabled": "on",
            "executor_enabled": "on",
        },
    )

    assert response.status_code == 302, response.context["adminform"].form.errors
    assert ("POST", "/datasets") in {(m, p) for m, p, _ in calls}
    assert in_transaction(calls) == []
    assert Task.objects.filter(name="from-the-admin", owner=admin_user).exists()
