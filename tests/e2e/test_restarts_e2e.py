"""Issue 13, item 4, with real processes: the database or the broker restarted.

The processes under test reach Postgres and RabbitMQ through a :class:`tests.relay.Relay`
that the test cuts for a few seconds and restores (the machine's servers are never touched):

- the web app under gunicorn (two workers, persistent database connections as configured):
  a pilot's heartbeat, start and report calls answer only 2xx or 503 with ``Retry-After``
  while the database is away, never 500, never a hang; once it is back they succeed again;
- the calls that publish to the broker (a user's cancel, a final report's kick) keep working
  while the broker is away (what they publish is best effort: the heartbeat carries the
  command), ``/healthz`` answers 503 ``broker`` unavailable; once it is back, they publish;
- the Celery worker with beat and the events consumer run on through either outage, with no
  restart: the task's jobs are dispatched and the task finishes.

A "refused" outage is a server restarting (nobody listens on the port); a "black-holed" one
is a server that accepts connections and never answers (a hung host, a dropped route).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from django.conf import settings

from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.models import CommandKind, PilotCommand
from pilots.services import pilot_register
from tasks.create import task_create
from tasks.models import Task, TaskState
from tests.e2e.conftest import _broker_url, _db_url, wait_until
from tests.e2e.test_pilots_e2e import _dataset, _task
from tests.factories import (
    DatasetFactory,
    JobAttemptFactory,
    JobFactory,
    UserFactory,
    api_token,
)
from tests.jobs.pilot_reports import output, publish, signed
from wms.contract import StatusEvent

pytestmark = [pytest.mark.slow, pytest.mark.outage, pytest.mark.django_db(transaction=True)]

CLIENT_TIMEOUT = 30  # seconds: what a pilot waits for an answer (its --http-timeout default)
MAX_TRIES = 200  # a call retried more often than this means the outage never ended for it


# --- a pilot's calls, retried as the agent does -------------------------------------------------


@dataclass
class Answer:
    call: str
    status: int
    error: str = ""
    retry_after: str | None = None
    phase: str = ""  # what the relay was doing when the call was sent


@dataclass
class Caller:
    """Sends calls the way a pilot does: on a 503 the same call again, with the same
    ``Idempotency-Key``, until it is accepted. Records every answer and the phase of the
    outage it was sent in; anything but 2xx or a 503 with ``Retry-After`` is a failure."""

    url: str
    headers: dict[str, str]
    phase: str = "before"
    answers: list[Answer] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def post(self, name: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        key = str(uuid.uuid4())
        for _ in range(MAX_TRIES):
            phase = self.phase
            try:
                response = requests.post(
                    self.url + path,
                    json=body,
                    headers={**self.headers, "Idempotency-Key": key},
                    timeout=CLIENT_TIMEOUT,
                )
            except requests.RequestException as exc:  # a hang or a dropped connection
                self.fail(f"{name}: no answer ({type(exc).__name__}: {exc}) [{phase}]")
                raise
            data = response.json() if response.content else {}
            answer = Answer(
                name,
                response.status_code,
                data.get("error", "") if isinstance(data, dict) else "",
                response.headers.get("Retry-After"),
                phase,
            )
            with self.lock:
                self.answers.append(answer)
            if 200 <= response.status_code < 300:
                return data
            if response.status_code != 503 or not answer.retry_after:
                self.fail(f"{name}: {response.status_code} {response.text[:300]} [{phase}]")
                raise AssertionError(self.failures[-1])
            threading.Event().wait(0.2)  # the agent backs off; a test need not wait long
        self.fail(f"{name}: still refused after {MAX_TRIES} tries")
        raise AssertionError(self.failures[-1])

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def after(self, phase: str) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if a.phase == phase]


def _pilot_caller(url: str, hostname: str) -> tuple[Any, Caller]:
    pilot, token = pilot_register(hostname=hostname, device_type="cpu")
    return pilot, Caller(url, {"Authorization": f"Pilot {token}"})


def _run_job(caller: Caller, pilot_id: int, job: Job, *, finish: bool = True) -> None:
    """What a pilot does with one job message: heartbeat, start, a running report, the final
    report with its output, and a heartbeat."""
    uuid_ = str(job.uuid)
    caller.post("heartbeat", f"/api/v1/pilots/{pilot_id}/heartbeat/", {"state": "idle"})
    started = caller.post("start", f"/api/v1/jobs/{uuid_}/start/", {"attempt": 0})
    assert started["job_uuid"] == uuid_
    caller.post(
        "report",
        f"/api/v1/jobs/{uuid_}/report/",
        {"attempt": 0, "state": "running", "metrics": {"cpu_time": 1.5}},
    )
    if not finish:
        return
    caller.post(
        "heartbeat",
        f"/api/v1/pilots/{pilot_id}/heartbeat/",
        {"state": "busy", "jobs": [{"job_uuid": uuid_, "attempt": 0, "cpu_time": 2.0}]},
    )
    done = caller.post(
        "report",
        f"/api/v1/jobs/{uuid_}/report/",
        {
            "attempt": 0,
            "state": "finished",
            "exit_code": 0,
            "outputs": [output(job.task, f"out-{uuid_}.json")],
        },
    )
    assert done["job_state"] == JobState.FINISHED, done


def _queued_jobs(owner, n: int) -> tuple[Task, list[Job]]:
    dataset: Any = DatasetFactory()
    task = task_create(
        owner=owner, executable="wms-payload-map", data_in_uid=dataset.uid, name="out"
    )
    jobs: list[Any] = [JobFactory(task=task, state=JobState.QUEUED) for _ in range(n)]
    return task, jobs


def _in_thread(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


# --- the web app, the database restarted ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_the_database_restarted_pilots_get_only_503s_then_success(make_stack, db_relay, mode):
    stack, out = make_stack(
        cpu=0,
        gpu=0,
        worker=False,
        web="gunicorn",  # two workers, as in production
        env={"DATABASE_URL": _db_url(db_relay), "DATABASE_CONNECT_TIMEOUT": "2"},
    )
    owner = UserFactory()
    task, jobs = _queued_jobs(owner, 12)
    pilot, caller = _pilot_caller(stack.server_url, "wn.db-restart.example")

    done: list[Job] = []

    def pilot_loop() -> None:
        for job in jobs:
            _run_job(caller, pilot.pk, job)
            done.append(job)

    thread, errors = _in_thread(pilot_loop)
    wait_until(lambda: len(done) >= 2 or errors, timeout=60, what="two jobs done", out=out)
    assert not errors, errors

    caller.phase = "cut"
    db_relay.cut(mode)
    wait_until(
        lambda: len([a for a in caller.after("cut") if a.status == 503]) >= 6 or errors,
        timeout=50,
        what="503s while the database is away",
        out=out,
    )
    db_relay.restore()
    caller.phase = "restored"
    thread.join(timeout=4 * CLIENT_TIMEOUT)
    assert not thread.is_alive(), "the pilot's calls never ended"
    assert not errors and not caller.failures, (errors, caller.failures, out.text()[-4000:])

    # During the outage: only 503 database_unavailable, each with Retry-After.
    during = caller.after("cut")
    refused = [a for a in during if a.status == 503]
    assert len(refused) >= 6
    assert {a.error for a in refused} == {"database_unavailable"}
    assert {a.retry_after for a in refused} == {"10"}
    # After it: success, each call within a few tries (one stale connection per web worker).
    after = caller.after("restored")
    assert after and all(a.status in (200, 503) for a in after)
    runs: list[int] = []
    tries = 0
    for a in after:
        tries += 1
        if a.status == 200:
            runs.append(tries)
            tries = 0
    assert runs and max(runs) <= 3, runs
    assert {a.call for a in caller.answers if a.status == 200} == {"heartbeat", "start", "report"}

    # Every job ran once and finished; nothing was written twice.
    for job in Job.objects.filter(task=task):
        assert job.state == JobState.FINISHED
        attempts = list(job.attempts.values_list("number", "state"))
        assert attempts == [(0, AttemptState.FINISHED)], attempts
        assert job.files.filter(type="output").count() == 1
    stack.check_alive()
    health = requests.get(stack.server_url + "/healthz", timeout=CLIENT_TIMEOUT)
    assert health.status_code == 200, health.text


# --- the web app, the broker restarted -----------------------------------------------------------


def _health(url: str) -> requests.Response:
    return requests.get(url + "/healthz", timeout=CLIENT_TIMEOUT)


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_the_broker_restarted_the_calls_that_publish_answer_then_publish_again(
    make_stack, broker_relay, read_commands, mode
):
    """What the API publishes (a cancel's kill_job commands, the kicks of the splitter and the
    finalizer) is published after commit, best effort: the broker away, the call still
    answers 2xx, the command waits in the database and the pilot's heartbeat carries it; only
    ``/healthz`` says 503. Once the broker is back, the next cancel publishes again."""
    stack, out = make_stack(
        cpu=0,
        gpu=0,
        worker=False,
        web="gunicorn",
        env={"CELERY_BROKER_URL": _broker_url(broker_relay), "WMS_HEALTHZ_BROKER_TTL": "0"},
    )
    owner = UserFactory()
    _token, key = api_token(owner)
    user = Caller(stack.server_url, {"Authorization": f"Token {key}"})
    (t1, (a,)), (t2, (b,)), (t3, (c,)) = (_queued_jobs(owner, 1) for _ in range(3))
    pilot, caller = _pilot_caller(stack.server_url, "wn.mq-restart.example")
    for job in (a, b):
        _run_job(caller, pilot.pk, job, finish=False)
    assert _health(stack.server_url).status_code == 200

    broker_relay.cut(mode)
    user.phase = caller.phase = "cut"
    done = caller.post(
        "report",
        f"/api/v1/jobs/{a.uuid}/report/",
        {"attempt": 0, "state": "finished", "exit_code": 0, "outputs": [output(t1, "a.json")]},
    )
    assert done["job_state"] == JobState.FINISHED
    user.post("cancel", f"/api/v1/tasks/{t2.pk}/cancel/", {})
    kill = PilotCommand.objects.get(pilot=pilot, command=CommandKind.KILL_JOB)
    assert kill.published_at is None  # not on the bus: the broker is away
    beat = caller.post("heartbeat", f"/api/v1/pilots/{pilot.pk}/heartbeat/", {"state": "busy"})
    assert [(x["command"], x["job_uuid"]) for x in beat["commands"]] == [("kill_job", str(b.uuid))]
    health = _health(stack.server_url)
    assert health.status_code == 503, health.text
    assert health.headers["Retry-After"] == "10"
    assert health.json()["database"] == "ok"
    assert health.json()["broker"].startswith("unavailable")
    during = caller.after("cut") + user.after("cut")
    assert [a.status for a in during] == [200] * len(during), during  # nothing refused

    broker_relay.restore()
    user.phase = caller.phase = "restored"
    wait_until(
        lambda: _health(stack.server_url).status_code == 200,
        timeout=30,
        what="/healthz to see the broker again",
        out=out,
    )
    _run_job(caller, pilot.pk, c, finish=False)
    user.post("cancel", f"/api/v1/tasks/{t3.pk}/cancel/", {})
    kill_c = PilotCommand.objects.get(pilot=pilot, job__uuid=c.uuid)
    assert kill_c.published_at is not None, out.text()[-3000:]  # on the bus again
    queued = read_commands(pilot.pk)
    assert [m["job_uuid"] for m in queued if m["command"] == "kill_job"] == [str(c.uuid)]
    assert not caller.failures and not user.failures
    stack.check_alive()


# --- the worker with beat and the events consumer ------------------------------------------------


def _probe_attempt() -> tuple[Any, JobAttempt]:
    """A pilot (not a process) with a running attempt of its own: the test publishes signed
    events as it on the bus, to see the worker's events consumer apply them."""
    pilot, _token = pilot_register(hostname="wn.probe.example", device_type="gpu")
    job: Any = JobFactory(state=JobState.RUNNING, pilot=pilot, device_type="gpu")
    attempt: Any = JobAttemptFactory(job=job, pilot=pilot, number=0)
    return pilot, attempt


def _probe(pilot: Any, attempt: JobAttempt, value: float) -> None:
    event = StatusEvent(
        job_uuid=str(attempt.job.uuid),
        attempt=0,
        state="running",
        pilot_id=pilot.pk,
        metrics={"probe": value},
    )
    publish(signed(pilot, event))  # to the real broker: the queue is there, outage or not


def _probed(attempt: JobAttempt, value: float) -> bool:
    return JobAttempt.objects.get(pk=attempt.pk).metrics.get("probe") == value


def _worker_ran_on(stack: Any, worker_pid: int) -> None:
    """The worker is the process it was (never restarted) and nothing exited."""
    stack.check_alive()
    (worker,) = [c for c in stack.children if c.name == "worker"]
    assert worker.proc.pid == worker_pid and worker.returncode is None


def _finished(task_ids: list[int], n: int) -> None:
    jobs = list(Job.objects.filter(task_id__in=task_ids))
    assert len(jobs) == n
    assert {j.state for j in jobs} == {JobState.FINISHED}
    for job in jobs:
        assert job.files.filter(type="output").count() == 1
    assert set(Task.objects.filter(pk__in=task_ids).values_list("state", flat=True)) == {
        TaskState.FINISHED
    }


def test_the_database_restarted_the_worker_beat_and_consumer_carry_on(
    make_stack, db_relay, tmp_path
):
    """Every server process reaches Postgres through the relay, cut while the task's jobs are
    being dispatched and run: the worker (splitter, executor, reaper, finalizer under beat)
    and its events consumer meet the outage and go on by themselves once it ends."""
    owner = UserFactory()
    uid = _dataset(tmp_path, "e2e.dbrestart", 6)
    stack, out = make_stack(
        cpu=1,
        gpu=0,
        env={
            "DATABASE_URL": _db_url(db_relay),
            "DATABASE_CONNECT_TIMEOUT": "2",
            "DJANGO_SECRET_KEY": settings.SECRET_KEY,  # the probe's bus key is signed with it
        },
    )
    (worker,) = [c for c in stack.children if c.name == "worker"]
    pilot, attempt = _probe_attempt()
    _probe(pilot, attempt, 1.0)
    wait_until(lambda: _probed(attempt, 1.0), timeout=30, what="the consumer", out=out)

    task = _task(owner, uid, tmp_path, "dbrestart", args="--events 200 --sleep 1")
    wait_until(
        lambda: JobAttempt.objects.filter(job__task=task).exists(),
        timeout=60,
        what="a job to start",
        out=out,
    )
    db_relay.cut()
    _probe(pilot, attempt, 2.0)  # taken while the database is away: requeued, not lost
    threading.Event().wait(6)  # an outage of a few seconds (beat runs every second)
    assert not _probed(attempt, 2.0)
    db_relay.restore()

    wait_until(lambda: _probed(attempt, 2.0), timeout=60, what="the requeued event", out=out)
    wait_until(
        lambda: Task.objects.filter(pk=task.pk, state=TaskState.FINISHED).exists(),
        timeout=120,
        what="the task to finish after the outage",
        out=out,
    )
    _finished([task.pk], 6)
    _worker_ran_on(stack, worker.proc.pid)
    assert "event_batch_requeued" in out.text()  # the consumer did meet the outage


def test_the_broker_restarted_the_worker_beat_and_consumer_reconnect(
    make_stack, broker_relay, tmp_path
):
    """The web app and the worker reach RabbitMQ through the relay (the pilots directly), cut
    while a task runs: the worker's consumer, beat, the executor's publisher and the events
    consumer reconnect by themselves; a task created after the outage is split, dispatched
    and finished by the same worker."""
    owner = UserFactory()
    first = _dataset(tmp_path, "e2e.mqrestart1", 4)
    second = _dataset(tmp_path, "e2e.mqrestart2", 4, seed=3000)
    stack, out = make_stack(
        cpu=1,
        gpu=0,
        env={
            "CELERY_BROKER_URL": _broker_url(broker_relay),
            "DJANGO_SECRET_KEY": settings.SECRET_KEY,  # the probe's bus key is signed with it
        },
    )
    (worker,) = [c for c in stack.children if c.name == "worker"]
    pilot, attempt = _probe_attempt()
    _probe(pilot, attempt, 1.0)
    wait_until(lambda: _probed(attempt, 1.0), timeout=30, what="the consumer", out=out)

    task = _task(owner, first, tmp_path, "mqrestart1", args="--events 200 --sleep 1")
    wait_until(
        lambda: JobAttempt.objects.filter(job__task=task).exists(),
        timeout=60,
        what="a job to start",
        out=out,
    )
    broker_relay.cut()
    _probe(pilot, attempt, 2.0)  # waits in the queue until the consumer is back
    threading.Event().wait(6)
    assert not _probed(attempt, 2.0)
    broker_relay.restore()

    wait_until(lambda: _probed(attempt, 2.0), timeout=60, what="the consumer back", out=out)
    later = _task(owner, second, tmp_path, "mqrestart2", args="--events 200")
    wait_until(
        lambda: (
            Task.objects.filter(pk__in=[task.pk, later.pk], state=TaskState.FINISHED).count() == 2
        ),
        timeout=120,
        what="both tasks to finish after the outage",
        out=out,
    )
    _finished([task.pk, later.pk], 8)
    _worker_ran_on(stack, worker.proc.pid)
    log = out.text()
    assert "events_consumer_reconnecting" in log  # both met the outage
    assert "Connection to broker lost" in log
    assert broker_relay.connections > 0
