"""Heartbeats and commands: state in step with the agent, metrics, commands delivered once
by the heartbeat and published to the pilot's command queue."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs.models import AttemptState, JobState
from pilots.commands import pilot_command_create
from pilots.models import CommandKind, Pilot, PilotCommand, PilotState
from pilots.services import pilot_heartbeat
from tests.factories import JobAttemptFactory, JobFactory, PilotCommandFactory
from wms import bus
from wms.exceptions import NotFound, ValidationFailed

pytestmark = pytest.mark.django_db


def beat(client, pilot, **body):
    body.setdefault("state", "idle")
    return client.post(f"/api/v1/pilots/{pilot.pk}/heartbeat/", body, format="json")


def running_attempt(pilot, **kw):
    job = JobFactory(state=JobState.RUNNING, pilot=pilot, **kw)
    return JobAttemptFactory(job=job, pilot=pilot, number=job.cur_retry)


# --- state, status, metrics --------------------------------------------------------------------


def test_the_first_heartbeat_makes_the_pilot_idle_then_state_follows_the_agent(make_pilot):
    pilot, client = make_pilot()
    response = beat(client, pilot, status="starting", metrics={"load1": 0.5, "free_disk_mb": 9})

    assert response.status_code == 200, response.json()
    assert response.json()["state"] == "idle"
    pilot.refresh_from_db()
    assert pilot.state == PilotState.IDLE
    assert pilot.status == "starting" and pilot.metrics == {"load1": 0.5, "free_disk_mb": 9}
    first = pilot.last_heartbeat

    beat(client, pilot, state="busy")
    pilot.refresh_from_db()
    assert pilot.state == PilotState.BUSY and pilot.last_heartbeat > first
    assert pilot.metrics == {"load1": 0.5, "free_disk_mb": 9}  # no metrics sent: kept

    beat(client, pilot, state="idle")
    beat(client, pilot, state="idle")  # the same state again: no transition
    beat(client, pilot, state="draining")
    beat(client, pilot, state="idle")  # a draining pilot does not come back
    pilot.refresh_from_db()
    assert pilot.state == PilotState.DRAINING
    rows = list(pilot.transitions.values_list("from_state", "to_state", "source"))
    src = f"pilot:{pilot.pk}"
    assert rows == [
        ("registered", "idle", src),
        ("idle", "busy", src),
        ("busy", "idle", src),
        ("idle", "draining", src),
    ]


def test_running_attempts_get_their_metrics(make_pilot):
    pilot, client = make_pilot()
    mine = running_attempt(pilot)
    other_pilot, _ = make_pilot(hostname="other")
    theirs = running_attempt(other_pilot)
    jobs = [
        {
            "job_uuid": str(mine.job.uuid),
            "attempt": mine.number,
            "cpu_time": 12.5,
            "rss_mb": 300.0,
            "wall_time": 20.0,
            "events_done": 1500,  # any other number is kept as a metric
        },
        {"job_uuid": str(theirs.job.uuid), "attempt": 0, "cpu_time": 99.0},
    ]

    assert beat(client, pilot, state="busy", jobs=jobs).status_code == 200

    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert mine.metrics == {
        "cpu_time": 12.5,
        "rss_mb": 300.0,
        "wall_time": 20.0,
        "events_done": 1500,
    }
    assert mine.metrics_updated_at is not None
    assert theirs.metrics == {} and theirs.metrics_updated_at is None  # not this pilot's

    beat(client, pilot, state="busy", jobs=[{**jobs[0], "cpu_time": 30.0}])
    mine.refresh_from_db()
    assert mine.metrics["cpu_time"] == 30.0 and mine.metrics["events_done"] == 1500


@pytest.mark.parametrize(
    "body",
    [
        {"state": "running"},
        {"state": "idle", "metrics": [1, 2]},
        {"state": "idle", "jobs": [{"job_uuid": "nope", "attempt": 0}]},
        {"state": "idle", "jobs": [{"job_uuid": "7b0c2f0e-8d5b-4d7a-9a43-8c1e1ad3c1b7"}]},
        {
            "state": "idle",
            "jobs": [
                {"job_uuid": "7b0c2f0e-8d5b-4d7a-9a43-8c1e1ad3c1b7", "attempt": 0, "host": "x"}
            ],
        },
        {"state": "idle", "acked_commands": ["not-a-uuid"]},
        {"state": "idle", "surprise": 1},
    ],
)
def test_a_bad_heartbeat_is_400_and_changes_nothing(make_pilot, body):
    pilot, client = make_pilot()
    before = Pilot.objects.get(pk=pilot.pk).last_heartbeat
    response = client.post(f"/api/v1/pilots/{pilot.pk}/heartbeat/", body, format="json")
    assert response.status_code == 400
    assert response.json()["error"] == "validation_failed"
    pilot.refresh_from_db()
    assert pilot.state == PilotState.REGISTERED and pilot.last_heartbeat == before


def test_the_service_refuses_a_state_it_does_not_know_and_a_missing_pilot(make_pilot):
    with pytest.raises(ValidationFailed):
        pilot_heartbeat(pilot_id=1, state="lost")
    pilot, _ = make_pilot()
    with pytest.raises(ValidationFailed):
        pilot_heartbeat(pilot_id=pilot.pk, state="idle", acked_commands=["not-an-id"])
    with pytest.raises(NotFound):
        pilot_heartbeat(pilot_id=987654, state="idle")


# --- commands ----------------------------------------------------------------------------------


def test_commands_are_delivered_by_one_heartbeat_only_and_acked(make_pilot):
    pilot, client = make_pilot()
    job = running_attempt(pilot).job
    kill = pilot_command_create(
        pilot_id=pilot.pk, command=CommandKind.KILL_JOB, job_id=job.pk, attempt=0, reason="why"
    )
    drain = pilot_command_create(pilot_id=pilot.pk, command=CommandKind.DRAIN)
    PilotCommandFactory(command=CommandKind.SHUTDOWN)  # another pilot's

    first = beat(client, pilot).json()
    second = beat(client, pilot).json()

    assert first["commands"] == [
        {
            "id": str(kill.pk),
            "command": "kill_job",
            "job_uuid": str(job.uuid),
            "attempt": 0,
            "reason": "why",
        },
        {"id": str(drain.pk), "command": "drain", "job_uuid": "", "attempt": None, "reason": ""},
    ]
    assert second["commands"] == []
    assert PilotCommand.objects.filter(pilot=pilot, delivered_at__isnull=False).count() == 2

    beat(client, pilot, acked_commands=[str(kill.pk), str(drain.pk)])
    kill.refresh_from_db()
    drain.refresh_from_db()
    assert kill.acked_at is not None and drain.acked_at is not None
    acked = kill.acked_at
    beat(client, pilot, acked_commands=[str(kill.pk)])  # acked twice: the first time stays
    kill.refresh_from_db()
    assert kill.acked_at == acked


def test_a_command_acked_from_the_queue_is_not_delivered_again(make_pilot):
    pilot, client = make_pilot()
    cmd = pilot_command_create(pilot_id=pilot.pk, command=CommandKind.SHUTDOWN)
    assert beat(client, pilot, acked_commands=[str(cmd.pk)]).json()["commands"] == []
    cmd.refresh_from_db()
    assert cmd.acked_at is not None and cmd.delivered_at is None


def test_another_pilots_command_cannot_be_acked(make_pilot):
    pilot, client = make_pilot()
    foreign = PilotCommandFactory()
    beat(client, pilot, acked_commands=[str(foreign.pk)])
    foreign.refresh_from_db()
    assert foreign.acked_at is None


@pytest.mark.parametrize("reported", ["idle", "busy", "draining"])
def test_a_lost_pilot_heard_from_again_is_live_again_and_not_told_to_shut_down(
    make_pilot, reported
):
    pilot, client = make_pilot()
    Pilot.objects.filter(pk=pilot.pk).update(state=PilotState.LOST)

    first = beat(client, pilot, state=reported).json()
    second = beat(client, pilot, state=reported).json()

    assert first["commands"] == [] and second["commands"] == []
    assert first["state"] == reported
    pilot.refresh_from_db()
    assert pilot.state == reported and pilot.last_heartbeat is not None
    row = pilot.transitions.get()
    assert (row.from_state, row.to_state) == ("lost", reported)
    assert (row.source, row.reason) == (f"pilot:{pilot.pk}", "heard from again")
    assert not PilotCommand.objects.filter(pilot=pilot).exists()


def test_a_terminated_pilot_that_is_still_alive_is_told_to_shut_down_once(make_pilot):
    pilot, client = make_pilot()
    Pilot.objects.filter(pk=pilot.pk).update(state=PilotState.TERMINATED)

    first = beat(client, pilot).json()
    second = beat(client, pilot).json()

    assert [c["command"] for c in first["commands"]] == ["shutdown"]
    assert first["state"] == "terminated" and second["commands"] == []
    assert Pilot.objects.get(pk=pilot.pk).state == PilotState.TERMINATED
    assert PilotCommand.objects.filter(pilot=pilot).count() == 1


def test_a_command_is_published_to_the_pilots_queue_after_commit(
    make_pilot, bus_prefix, django_capture_on_commit_callbacks, read_commands
):
    pilot, _ = make_pilot()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        cmd = pilot_command_create(pilot_id=pilot.pk, command=CommandKind.DRAIN, reason="maint")
        assert read_commands(pilot.pk) == []  # nothing before the commit
    assert len(callbacks) == 1
    (message,) = read_commands(pilot.pk)
    assert message == {
        "command": "drain",
        "pilot_id": pilot.pk,
        "id": str(cmd.pk),
        "job_uuid": "",
        "attempt": None,
        "reason": "maint",
        "v": 1,
        "kind": "command",
    }
    cmd.refresh_from_db()
    assert cmd.published_at is not None and cmd.delivered_at is None


def test_a_broker_failure_leaves_the_command_to_the_heartbeat(
    make_pilot, bus_prefix, settings, django_capture_on_commit_callbacks
):
    pilot, client = make_pilot()
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:1//"  # nobody listens there
    bus.reset_connection()
    with django_capture_on_commit_callbacks(execute=True):
        cmd = pilot_command_create(pilot_id=pilot.pk, command=CommandKind.SHUTDOWN)
    cmd.refresh_from_db()
    assert cmd.published_at is None
    assert [c["id"] for c in beat(client, pilot).json()["commands"]] == [str(cmd.pk)]


def test_pilot_command_create_refuses_bad_input(make_pilot):
    pilot, _ = make_pilot()
    with pytest.raises(ValidationFailed):
        pilot_command_create(pilot_id=pilot.pk, command="explode")
    with pytest.raises(ValidationFailed):
        pilot_command_create(pilot_id=pilot.pk, command=CommandKind.KILL_JOB)
    with pytest.raises(NotFound):
        pilot_command_create(pilot_id=987654, command=CommandKind.DRAIN)
    assert not PilotCommand.objects.exists()


def test_a_heartbeat_costs_the_same_queries_whatever_it_carries(make_pilot):
    def cost(n: int) -> int:
        pilot, _ = make_pilot(hostname=f"wn{n}")
        pilot_heartbeat(pilot_id=pilot.pk, state="idle")  # registered → idle done
        attempts = [running_attempt(pilot) for _ in range(n)]
        commands = [
            pilot_command_create(pilot_id=pilot.pk, command=CommandKind.DRAIN) for _ in range(n)
        ]
        jobs = [
            {"job_uuid": str(a.job.uuid), "attempt": a.number, "cpu_time": 1.0} for a in attempts
        ]
        with CaptureQueriesContext(connection) as ctx:
            reply = pilot_heartbeat(
                pilot_id=pilot.pk,
                state="busy",
                metrics={"load1": 1.0},
                jobs=jobs,
                acked_commands=[c.pk for c in commands[: n // 2]],
            )
        assert len(reply.commands) == n - n // 2
        assert (
            JobAttemptFactory._meta.model.objects.filter(
                pilot=pilot, metrics__cpu_time=1.0, state=AttemptState.RUNNING
            ).count()
            == n
        )
        return len(ctx.captured_queries)

    assert cost(2) == cost(40)


# --- the cost of a heartbeat (issue 15) --------------------------------------------------------


def test_a_heartbeat_that_changes_nothing_costs_two_statements(make_pilot):
    """The agent's heartbeat of an idle pilot (no attempt named, ``reporting`` sent): the
    row's lock and update in one statement, the commands' delivery in another. Nothing is
    written about a state that does not change."""
    pilot, _ = make_pilot()
    pilot_heartbeat(pilot_id=pilot.pk, state="idle")  # registered → idle
    before = pilot.transitions.count()

    with CaptureQueriesContext(connection) as ctx:
        reply = pilot_heartbeat(
            pilot_id=pilot.pk, state="idle", status="idle", metrics={"load1": 0.1}, reporting=[]
        )

    assert [q["sql"].split()[0] for q in ctx.captured_queries] == ["UPDATE", "UPDATE"]
    assert reply.state == PilotState.IDLE and reply.commands == []
    pilot.refresh_from_db()
    assert pilot.status == "idle" and pilot.metrics == {"load1": 0.1}
    assert pilot.transitions.count() == before


def test_a_keyed_heartbeat_through_the_api_costs_six_statements(make_pilot):
    """What the agent sends: its token and its idempotency key (one read: the pilot's row and
    the remembered answer), the answer's INSERT, the transaction (here a savepoint in the
    test's, and its release), the heartbeat's two statements."""
    pilot, client = make_pilot()
    beat(client, pilot)  # registered → idle
    url = f"/api/v1/pilots/{pilot.pk}/heartbeat/"
    body = {"state": "idle", "status": "idle", "metrics": {"load1": 0.1}, "reporting": []}

    with CaptureQueriesContext(connection) as ctx:
        response = client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="hb-cost-0001")

    assert response.status_code == 200, response.json()
    assert len(ctx.captured_queries) == 6, [q["sql"][:80] for q in ctx.captured_queries]
    assert "wms_idempotentrequest" in ctx.captured_queries[0]["sql"]  # read with the token

    again = client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="hb-cost-0001")
    assert again.json() == response.json() and again["Idempotent-Replayed"] == "true"


def test_a_heartbeat_does_not_wait_for_the_wal_flush(make_pilot):
    """Its transaction commits asynchronously (``synchronous_commit`` off for it alone): a
    heartbeat's writes are all written again by the next one."""
    pilot, _ = make_pilot()
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
        pilot_heartbeat(pilot_id=pilot.pk, state="idle")
        cursor.execute("SHOW synchronous_commit")  # in the same (the test's) transaction
        assert cursor.fetchone()[0] == "off"


def test_an_idle_pilot_with_a_forgotten_attempt_still_fails_it(make_pilot, settings):
    """The heartbeat skips the search for attempts the pilot does not name only when none
    runs on it: one that does (started long ago, named nowhere) still fails as
    ``not_on_pilot``."""
    settings.WMS_NOT_ON_PILOT_GRACE = 60
    pilot, _ = make_pilot()
    pilot_heartbeat(pilot_id=pilot.pk, state="idle")
    attempt = running_attempt(pilot)
    type(attempt).objects.filter(pk=attempt.pk).update(
        started_at=attempt.started_at.replace(year=2000)
    )

    pilot_heartbeat(pilot_id=pilot.pk, state="idle", reporting=[])

    attempt.refresh_from_db()
    assert attempt.state == AttemptState.FAILED and attempt.error_code == "not_on_pilot"


def test_commands_come_in_the_order_they_were_made_and_once(make_pilot):
    pilot, _ = make_pilot()
    made = [pilot_command_create(pilot_id=pilot.pk, command=CommandKind.DRAIN) for _ in range(5)]

    first = pilot_heartbeat(pilot_id=pilot.pk, state="idle")
    again = pilot_heartbeat(pilot_id=pilot.pk, state="idle")

    assert [c.id for c in first.commands] == [str(c.pk) for c in made]
    assert again.commands == []
    assert not PilotCommand.objects.filter(pilot=pilot, delivered_at__isnull=True).exists()


def test_a_heartbeat_for_a_missing_pilot_leaves_the_callers_transaction_usable(make_pilot):
    """The heartbeat has no savepoint of its own: a missing pilot writes nothing and is
    refused outside its transaction, so a caller's transaction goes on."""
    with pytest.raises(NotFound):
        pilot_heartbeat(pilot_id=987654, state="idle")
    pilot, _ = make_pilot()  # the test's transaction still works
    assert pilot_heartbeat(pilot_id=pilot.pk, state="idle").state == PilotState.IDLE


def test_a_healthy_heartbeat_writes_no_log_line(make_pilot, caplog):
    """A pilot's call writes no request lines (the short path of ``wms.middleware``) and a
    heartbeat that changes no state logs nothing; a change of state is logged."""
    pilot, client = make_pilot()
    with caplog.at_level("INFO"):
        caplog.clear()
        beat(client, pilot)  # registered → idle
        changed = [r for r in caplog.records if r.levelno >= 20]
        caplog.clear()
        for _ in range(3):
            assert beat(client, pilot).status_code == 200

    assert [_event(r) for r in changed] == ["pilot_state_changed"]
    assert [_event(r) for r in caplog.records if r.levelno >= 20] == []


def _event(record) -> str | None:
    return record.msg.get("event") if isinstance(record.msg, dict) else record.getMessage()
