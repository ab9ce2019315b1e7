"""The bodies of the pilot's REST calls, built and checked by ``wms.contract``: the wire
format the server's serializers take (pilots/api/pilot_serializers.py), and the rule that
the agent builds no body by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pilots.api.pilot_serializers import PilotHeartbeatSerializer, PilotRegisterSerializer
from tests.pilots.agent.conftest import job_message
from wms.contract import (
    MAX_EVENTS,
    MAX_STARTS,
    ContractError,
    EventsBody,
    HeartbeatBody,
    HeartbeatJob,
    HeartbeatReply,
    OrphanReport,
    Registration,
    RegistrationAnswer,
    ReportBody,
    StartBody,
    StartsBody,
    StatusEvent,
    TerminateBody,
    decode_events_answer,
    decode_start_answer,
    decode_starts_answer,
)

AGENT = Path(__file__).resolve().parents[2] / "pilots" / "agent"
UUID = "0b6f4a52-8a43-4f0c-9b3e-3a1f5c6d7e8f"


def registration(**kw) -> Registration:
    values = dict(
        hostname="wn1",
        site="s",
        device_type="cpu",
        cores=4,
        memory_mb=8000,
        gpus=0,
        slots=2,
        version="1.0",
    )
    return Registration(**{**values, **kw})


def test_a_registration_body_is_what_the_server_takes_and_orphans_only_when_there_are_some():
    plain = registration().to_dict()
    assert "orphans" not in plain
    assert PilotRegisterSerializer(data=plain).is_valid()
    body = registration(orphans=[OrphanReport(UUID, 1, 7, [123, 456])]).to_dict()
    assert body["orphans"] == [{"job_uuid": UUID, "attempt": 1, "pilot_id": 7, "pids": [123, 456]}]
    serializer = PilotRegisterSerializer(data=body)
    assert serializer.is_valid(), serializer.errors


def test_a_registration_with_a_bad_device_type_or_no_slot_is_refused():
    with pytest.raises(ContractError, match="device_type"):
        registration(device_type="tpu")
    with pytest.raises(ContractError, match="slots"):
        registration(slots=0)


def test_a_registration_answer_needs_an_id_and_a_token_and_keeps_only_usable_settings():
    answer = RegistrationAnswer.from_dict(
        {
            "pilot_id": 3,
            "token": "t",
            "device_type": "gpu",
            "bus_prefix": "x",
            "queue_type": "quorum",
            "heartbeat_interval": 30,
            "job_queue": "x.jobs.gpu",
        }
    )
    assert (answer.pilot_id, answer.token, answer.device_type) == (3, "t", "gpu")
    assert (answer.bus_prefix, answer.queue_type, answer.heartbeat_interval) == (
        "x",
        "quorum",
        30.0,
    )
    odd = RegistrationAnswer.from_dict(
        {
            "pilot_id": 3,
            "token": "t",
            "device_type": "tpu",
            "bus_prefix": 5,
            "heartbeat_interval": -1,
        }
    )
    assert (odd.device_type, odd.bus_prefix, odd.heartbeat_interval) == ("", "", None)
    for bad in ({"token": "t"}, {"pilot_id": True, "token": "t"}, {"pilot_id": 3, "token": ""}, []):
        with pytest.raises(ContractError, match="pilot_id/token"):
            RegistrationAnswer.from_dict(bad)


def test_a_heartbeat_body_is_what_the_server_takes_and_reporting_is_left_out_when_none():
    job = HeartbeatJob(UUID, 2, cpu_time=1.5, rss_mb=10.0, wall_time=3.0, max_rss_mb=12.0)
    body = HeartbeatBody(
        state="busy",
        status="busy: 1/1",
        metrics={"load": 0.5},
        jobs=[job],
        acked_commands=[UUID],
        reporting=[(UUID, 1)],
    ).to_dict()
    assert list(body) == ["state", "status", "metrics", "jobs", "acked_commands", "reporting"]
    assert body["jobs"] == [
        {
            "job_uuid": UUID,
            "attempt": 2,
            "cpu_time": 1.5,
            "rss_mb": 10.0,
            "wall_time": 3.0,
            "max_rss_mb": 12.0,
        }
    ]
    assert body["reporting"] == [{"job_uuid": UUID, "attempt": 1}]
    serializer = PilotHeartbeatSerializer(data=body)
    assert serializer.is_valid(), serializer.errors
    bare = HeartbeatBody(state="idle", status="", metrics={}, jobs=[], acked_commands=[])
    assert "reporting" not in bare.to_dict()
    with pytest.raises(ContractError, match="state"):
        HeartbeatBody(state="lost", status="", metrics={}, jobs=[], acked_commands=[])


def test_a_heartbeat_reply_is_read_leniently():
    reply = HeartbeatReply.from_dict(
        {"heartbeat_interval": 20, "state": "busy", "commands": [{"command": "drain"}]}
    )
    assert (reply.heartbeat_interval, reply.state, reply.commands) == (
        20.0,
        "busy",
        [{"command": "drain"}],
    )
    assert HeartbeatReply.from_dict(None) == HeartbeatReply()
    assert (
        HeartbeatReply.from_dict({"commands": {"a": 1}, "heartbeat_interval": True}).commands == []
    )


def test_a_report_body_is_the_status_event_without_its_envelope():
    event = StatusEvent(
        job_uuid=UUID,
        attempt=1,
        state="failed",
        pilot_id=4,
        exit_code=3,
        error_code="nonzero_exit",
        error_message="exit code 3",
        metrics={"cpu_time": 1.0},
    )
    body = ReportBody.from_event(event).to_dict()
    assert body == {
        "attempt": 1,
        "state": "failed",
        "exit_code": 3,
        "error_code": "nonzero_exit",
        "error_message": "exit code 3",
        "metrics": {"cpu_time": 1.0},
        "outputs": [],
    }
    assert ReportBody.from_dict(body) == ReportBody.from_event(event)
    assert ReportBody.from_dict(b'{"attempt": 0, "state": "running"}').state == "running"
    with pytest.raises(ContractError):
        ReportBody(attempt=1, state="lost")
    with pytest.raises(ContractError):
        ReportBody(attempt=-1, state="running")
    with pytest.raises(ContractError, match="exit_code"):
        ReportBody.from_dict({"attempt": 1, "state": "failed", "exit_code": "3"})


def test_start_and_terminate_bodies_and_the_start_answer(tmp_path):
    assert StartBody(2).to_dict() == {"attempt": 2}
    with pytest.raises(ContractError):
        StartBody(-1).to_dict()
    assert TerminateBody("idle").to_dict() == {"reason": "idle"}
    message = job_message(tmp_path)
    answer = {k: v for k, v in message.to_dict().items() if k not in ("v", "kind")}
    assert decode_start_answer(answer) == message
    with pytest.raises(ContractError):
        decode_start_answer({"job_uuid": UUID})


# --- the agent builds no body by hand -----------------------------------------------------------

ENDPOINTS = {
    "register",
    "heartbeat",
    "start",
    "starts",
    "report",
    "terminate",
    "events",
    "post",
    "post_retrying",
}


def _client_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of an endpoint method on something named ``client`` (``self.client.start(...)``,
    ``self._client(url).report(...)``)."""
    calls = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in ENDPOINTS:
            continue
        owner = node.func.value
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if isinstance(owner, ast.Call):
            f = owner.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        if "client" in name:
            calls.append(node)
    return calls


def _is_to_dict(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "to_dict"
    )


def test_a_starts_body_holds_attempts_and_its_answer_is_read_per_start(tmp_path):
    assert StartsBody(((UUID, 0), (UUID, 3))).to_dict() == {
        "starts": [{"job_uuid": UUID, "attempt": 0}, {"job_uuid": UUID, "attempt": 3}]
    }
    for bad in ((), tuple((UUID, 0) for _ in range(MAX_STARTS + 1))):
        with pytest.raises(ContractError):
            StartsBody(bad)
    with pytest.raises(ContractError):
        StartsBody(((UUID, -1),)).to_dict()

    message = job_message(tmp_path)
    job = {k: v for k, v in message.to_dict().items() if k not in ("v", "kind")}
    answer = {
        "results": [
            {"job_uuid": message.job_uuid, "attempt": 0, "outcome": "started", "job": job},
            {"job_uuid": UUID, "attempt": 0, "outcome": "started", "job": {"job_uuid": UUID}},
            {"job_uuid": UUID, "attempt": 1, "error": "job_not_queued", "detail": "taken"},
        ]
    }
    started, unreadable, refused = decode_starts_answer(answer, 3)
    assert (started.ok, started.job) == (True, message)
    assert (unreadable.ok, unreadable.job) == (True, None)  # the pilot runs its own copy
    assert (refused.ok, refused.error, refused.detail, refused.job) == (
        False,
        "job_not_queued",
        "taken",
        None,
    )
    with pytest.raises(ContractError, match="one result per start"):
        decode_starts_answer(answer, 2)
    with pytest.raises(ContractError, match="outcome"):
        decode_starts_answer({"results": [{"job_uuid": UUID, "outcome": "eaten"}]}, 1)
    with pytest.raises(ContractError):
        decode_starts_answer({"results": ["x"]}, 1)


def test_an_events_body_holds_reports_with_their_jobs_and_its_answer_is_checked():
    report = ReportBody(attempt=0, state="finished", exit_code=0)
    body = EventsBody(((UUID, report),)).to_dict()
    assert body == {"events": [{"job_uuid": UUID, **report.to_dict()}]}
    with pytest.raises(ContractError):
        EventsBody(())
    with pytest.raises(ContractError):
        EventsBody(tuple((UUID, report) for _ in range(MAX_EVENTS + 1)))

    answer = {
        "results": [
            {"job_uuid": UUID, "attempt": 0, "outcome": "applied", "job_state": "finished"},
            {"job_uuid": UUID, "attempt": 1, "error": "not_found", "detail": "gone"},
        ]
    }
    applied, refused = decode_events_answer(answer, 2)
    assert (applied.ok, applied.outcome, applied.job_state) == (True, "applied", "finished")
    assert (refused.ok, refused.error, refused.detail) == (False, "not_found", "gone")
    with pytest.raises(ContractError, match="one result per event"):
        decode_events_answer(answer, 3)
    with pytest.raises(ContractError, match="outcome"):
        decode_events_answer({"results": [{"job_uuid": UUID, "outcome": "eaten"}]}, 1)
    with pytest.raises(ContractError):
        decode_events_answer({"results": [{"attempt": "0", "outcome": "applied"}]}, 1)
    with pytest.raises(ContractError):
        decode_events_answer(b"[]", 0)


def test_the_agent_sends_only_bodies_built_by_the_contract():
    """Only the session calls the REST client (its own methods take contract objects), and
    every body it passes is a contract object's ``to_dict()``; the spool's sender re-sends
    the report bodies the session stored."""
    callers = {}
    for path in sorted(AGENT.glob("*.py")):
        if path.name == "client.py":
            continue
        calls = _client_calls(ast.parse(path.read_text()))
        if calls:
            callers[path.name] = calls
    assert set(callers) == {"session.py", "spool.py"}, set(callers)
    for call in callers["session.py"]:
        bodies = [a for a in call.args if not isinstance(a, ast.Constant)]
        body = bodies[-1]  # (job uuid,) body
        assert _is_to_dict(body), ast.unparse(call)
    resend, batch = sorted(callers["spool.py"], key=lambda c: c.func.attr != "report")
    assert ast.unparse(resend.args[1]) == "entry.report"
    assert batch.func.attr == "events" and _is_to_dict(batch.args[1]), ast.unparse(batch)


def test_the_session_takes_contract_objects_only():
    tree = ast.parse((AGENT / "session.py").read_text())
    (session,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session"]
    methods = {n.name: n for n in session.body if isinstance(n, ast.FunctionDef)}
    annotations = {
        name: [ast.unparse(a.annotation) for a in methods[name].args.args[1:] if a.annotation]
        for name in ("start", "heartbeat", "report")
    }
    assert annotations == {
        "start": ["JobMessage", "str"],
        "heartbeat": ["HeartbeatBody"],
        "report": ["str", "ReportBody"],
    }
