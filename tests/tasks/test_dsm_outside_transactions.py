"""The DSM is never called inside a transaction (docs/architecture.md, "The DSM"): task_create,
task_add_inputs, task_retry_failed, the finalizer and pilots' final reports (through each of
their doors) ask and register first, then write in one short transaction; a failure of that
write leaves nothing half made, and the call sent again finds what was registered.

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
from files.models import File
from jobs.models import AttemptState, Job, JobAttempt, JobState
from jobs.outputs import RegistrationStale
from jobs.reports import job_events_apply, job_events_commit, job_events_prepare
from pilots.services import pilot_register
from tasks.create import output_dataset_uid, task_create
from tasks.finalizer import task_finalize
from tasks.inputs import task_add_inputs
from tasks.lifecycle import task_retry_failed, task_transition
from tasks.models import Task, TaskInput, TaskState
from tests.conftest import TEST_OUTPUT_ROOT
from tests.factories import JobAttemptFactory, JobFactory, UserFactory
from tests.files.fake_dsm import FakeDSM
from wms import checksums
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
    """``plant("INSERT")``: PostgreSQL refuses that statement on tasks_task (or ``table``)
    until ``remove()`` (or the test's end)."""

    table = "tasks_task"

    def plant(self, statement: str, table: str = "tasks_task") -> None:
        self.table = table
        with connection.cursor() as cur:
            cur.execute(
                "CREATE OR REPLACE FUNCTION owners_planted_failure() RETURNS trigger AS $$ "
                "BEGIN RAISE EXCEPTION 'planted failure'; END $$ LANGUAGE plpgsql"
            )
            cur.execute(
                f"CREATE TRIGGER owners_planted_failure BEFORE {statement} ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION owners_planted_failure()"
            )

    def remove(self) -> None:
        with connection.cursor() as cur:
            cur.execute(f"DROP TRIGGER IF EXISTS owners_planted_failure ON {self.table}")
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


# --- pilots' final reports -------------------------------------------------------------------


def running_report_job(dsm, name="owners.rep"):
    """A task with its output dataset in the (fake, external) DSM, and a job of it whose
    attempt 0 runs on a new pilot: (task, job, pilot, pilot token)."""
    data_in = dsm.register_dataset(f"{name}.in")
    task = task_create(owner=UserFactory(), executable="noop", data_in_uid=data_in.uid, name=name)
    Task.objects.filter(pk=task.pk).update(data_out_url=TEST_OUTPUT_ROOT)
    pilot, token = pilot_register(hostname="wn-owners")
    job = JobFactory(task=task, state=JobState.RUNNING, pilot=pilot)
    JobAttemptFactory(job=job, pilot=pilot, number=0)
    return Task.objects.get(pk=task.pk), job, pilot, token


def final_report(job, name="hist.json", data=b"hist"):
    return {
        "job_uuid": str(job.uuid),
        "attempt": 0,
        "state": "finished",
        "exit_code": 0,
        "outputs": [
            {
                "name": name,
                "type": "output",
                "size": len(data),
                "check_sum": checksums.bytes_checksum(data),
                "url": f"{TEST_OUTPUT_ROOT}/{name}",
            }
        ],
    }


def registered_names(server, uid):
    return sorted(f["name"] for f in server.datasets[str(uid)].files)


def send(door, job, pilot, token, report):
    """``report`` through one of its doors: REST ``report`` or bulk ``events`` (with an
    idempotency key, whose transaction wraps the call), or the function the bus consumer
    calls."""
    if door == "service":
        report = {**report, "pilot_id": pilot.pk}
        [outcome] = job_events_apply(events=[report])
        return outcome.outcome
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Pilot {token}")
    key = {"HTTP_IDEMPOTENCY_KEY": str(uuid.uuid4())}
    if door == "report":
        body = {k: v for k, v in report.items() if k != "job_uuid"}
        response = client.post(f"/api/v1/jobs/{job.uuid}/report/", body, format="json", **key)
        assert response.status_code == 200, response.json()
        return response.json()["outcome"]
    response = client.post(
        f"/api/v1/pilots/{pilot.pk}/events/", {"events": [report]}, format="json", **key
    )
    assert response.status_code == 200, response.json()
    return response.json()["results"][0]["outcome"]


@pytest.mark.parametrize("door", ["report", "events", "service"])
def test_a_final_report_registers_its_outputs_outside_any_transaction(calls, dsm, server, door):
    task, job, pilot, token = running_report_job(dsm, f"owners.{door}")
    calls.clear()

    assert send(door, job, pilot, token, final_report(job)) == "applied"

    assert ("POST", f"/datasets/{task.data_out_uid}/files") in {(m, p) for m, p, _ in calls}
    assert in_transaction(calls) == []
    job.refresh_from_db()
    assert job.state == JobState.FINISHED
    [row] = File.objects.filter(job=job)
    assert (row.file_name, row.status) == (f"{job.uuid}/hist.json", "ready")
    assert registered_names(server, task.data_out_uid) == [f"{job.uuid}/hist.json"]


def test_a_report_whose_write_failed_changes_nothing_and_is_applied_when_sent_again(
    calls, dsm, server, failure
):
    task, job, pilot, _ = running_report_job(dsm)
    report = {**final_report(job), "pilot_id": pilot.pk}
    failure.plant("INSERT", table="files_file")

    with pytest.raises(DatabaseError, match="planted failure"):
        job_events_apply(events=[report])

    # nothing half made in the WMS: the job and its attempt run on, no FILE_DAT row ...
    job.refresh_from_db()
    assert job.state == JobState.RUNNING
    assert JobAttempt.objects.get(job=job).state == AttemptState.RUNNING
    assert not File.objects.filter(job=job).exists()
    # ... and the DSM holds the output, registered before the write
    assert registered_names(server, task.data_out_uid) == [f"{job.uuid}/hist.json"]

    failure.remove()
    [outcome] = job_events_apply(events=[report])  # the pilot's spool sends it again

    assert outcome.outcome == "applied"
    job.refresh_from_db()
    assert job.state == JobState.FINISHED
    assert File.objects.get(job=job).status == "ready"
    assert registered_names(server, task.data_out_uid) == [f"{job.uuid}/hist.json"]  # once
    assert in_transaction(calls) == []


def test_a_report_whose_output_dataset_changed_meanwhile_is_prepared_again(calls, dsm, server):
    """The registration made before the transaction no longer covers the report (the task
    took another output dataset in between): the transaction writes nothing and refuses
    (503 through REST); the whole call, made again, registers in the new dataset."""
    task, job, pilot, _ = running_report_job(dsm)
    report = {**final_report(job), "pilot_id": pilot.pk}
    prepared = job_events_prepare(events=[report])
    moved = dsm.register_dataset("owners.rep.moved", role="output")
    Task.objects.filter(pk=task.pk).update(data_out_uid=moved.uid)

    with pytest.raises(RegistrationStale):
        job_events_commit(prepared)
    job.refresh_from_db()
    assert job.state == JobState.RUNNING and not File.objects.filter(job=job).exists()

    [outcome] = job_events_apply(events=[report])

    assert outcome.outcome == "applied"
    assert registered_names(server, moved.uid) == [f"{job.uuid}/hist.json"]
    assert File.objects.get(job=job).status == "ready"
    assert in_transaction(calls) == []
