"""The spool: a final report is on disk before it is sent, stays there while the WMS cannot take
it, goes when the WMS answered 2xx/409/4xx, and is sent again by a later run of the pilot."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest

from pilots.agent.spool import ReportSender, Spool
from tests.pilots.agent.fakewms import FakeWMS, wait_until

REPORT = {
    "attempt": 1,
    "state": "finished",
    "exit_code": 0,
    "error_code": "",
    "error_message": "",
    "metrics": {"wall_time": 1.5},
    "outputs": [],
}


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "work" / "spool")


@pytest.fixture
def pilot(fake_wms: FakeWMS) -> tuple[int, str]:
    """A pilot token the fake WMS knows."""
    fake_wms.tokens["pilot-token-3"] = 3
    return 3, "pilot-token-3"


def put(spool: Spool, server_url: str, pilot: tuple[int, str], job_uuid: str = "j-1") -> Path:
    return spool.put(
        job_uuid=job_uuid,
        attempt=1,
        report=REPORT,
        pilot_id=pilot[0],
        server_url=server_url,
        token=pilot[1],
    )


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nobody listens there now


def test_the_write_is_atomic_and_private(spool, fake_wms, pilot):
    path = put(spool, fake_wms.url, pilot)

    assert [p.name for p in spool.directory.iterdir()] == [path.name]  # no temporary left
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the pilot's token
    entry = spool.read(path)
    assert entry is not None
    assert (entry.job_uuid, entry.attempt, entry.report) == ("j-1", 1, REPORT)


def test_a_report_is_in_the_spool_while_it_is_sent_and_deleted_on_200(spool, fake_wms, pilot):
    path = put(spool, fake_wms.url, pilot)

    assert ReportSender(spool).flush() == 0

    (call,) = fake_wms.final_reports("j-1")
    assert call.body == REPORT and call.auth == "Pilot pilot-token-3"
    assert call.spooled == [path.name]  # on disk when the WMS received it
    assert not path.exists()


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_report_stays_on_5xx(spool, fake_wms, pilot, status):
    fake_wms.report_answer = lambda uuid, body: (status, {"error": "internal_error"})
    path = put(spool, fake_wms.url, pilot)

    assert ReportSender(spool).flush() == 1
    assert path.exists() and len(fake_wms.final_reports()) == 1


def test_a_report_stays_when_the_wms_is_unreachable(spool, pilot):
    path = put(spool, closed_port_url(), pilot)

    assert ReportSender(spool, timeout=2).flush() == 1
    assert path.exists()


@pytest.mark.parametrize(
    ("status", "error"), [(409, "stale_attempt"), (400, "validation_failed"), (403, "forbidden")]
)
def test_a_report_refused_for_good_is_dropped(spool, fake_wms, pilot, status, error, caplog):
    fake_wms.report_answer = lambda uuid, body: (status, {"error": error, "detail": "no"})
    path = put(spool, fake_wms.url, pilot)

    assert ReportSender(spool).flush() == 0
    assert not path.exists()
    assert "report_refused_dropped" in caplog.text and str(status) in caplog.text


def test_the_background_loop_sends_again_with_backoff_until_the_wms_is_back(spool, fake_wms, pilot):
    answers = iter([(503, {}), (503, {})])
    fake_wms.report_answer = lambda uuid, body: next(answers, (200, {"outcome": "applied"}))
    path = put(spool, fake_wms.url, pilot)
    sender = ReportSender(spool, first_backoff=0.05, max_backoff=0.2)
    sender.start()
    try:
        wait_until(lambda: not path.exists(), timeout=5)
    finally:
        sender.stop()

    assert len(fake_wms.final_reports("j-1")) == 3


def test_a_later_run_sends_what_an_earlier_one_left_with_the_earlier_token(
    tmp_path, fake_wms, pilot
):
    # run 1: the WMS is down; the report stays
    first = Spool(tmp_path / "spool")
    put(first, closed_port_url(), pilot, "j-9")
    assert ReportSender(first, timeout=2).flush() == 1
    # the WMS comes back at its address; the file points there (rewrite the URL as if it had)
    entry = first.read(first.paths()[0])
    assert entry is not None
    first.put(
        job_uuid="j-9",
        attempt=1,
        report=entry.report,
        pilot_id=entry.pilot_id,
        server_url=fake_wms.url,
        token=entry.token,
    )

    # run 2: a new Spool on the same directory, a new sender, nothing else shared
    second = Spool(tmp_path / "spool")
    assert len(second) == 1
    assert ReportSender(second).flush() == 0

    (call,) = fake_wms.final_reports("j-9")
    assert call.auth == "Pilot pilot-token-3"  # the attempt belongs to the pilot that ran it
    assert len(second) == 0


def test_an_unreadable_entry_is_set_aside_not_retried_forever(spool, fake_wms, pilot):
    bad = spool.directory / "broken.0.report.json"
    bad.write_text("{not json")
    put(spool, fake_wms.url, pilot)

    assert ReportSender(spool).flush() == 0
    assert not bad.exists() and bad.with_name(bad.name + ".bad").exists()
    assert len(fake_wms.final_reports()) == 1


def test_the_spooled_attempts_are_listed_for_the_heartbeat_by_pilot(spool, pilot):
    url = closed_port_url()
    put(spool, url, pilot, job_uuid="j-1")
    put(spool, url, (4, "pilot-token-4"), job_uuid="j-2")  # a former run's pilot
    (spool.directory / ".j-3.1.report.json.1.2.tmp").write_text("{}")  # not a report yet

    assert sorted(spool.attempts()) == [("j-1", 1), ("j-2", 1)]
    assert spool.attempts(pilot[0]) == [("j-1", 1)]
    assert spool.attempts(99) == []


def test_a_spooled_report_keeps_its_idempotency_key_across_resends_and_runs(spool, fake_wms, pilot):
    """Made once when spooled, on disk with the report: every resend, by this run or a later
    one (a new Spool and sender on the same directory), is the same call."""
    fake_wms.report_answer = lambda uuid, body: (503, {"error": "database_unavailable"})
    path = put(spool, fake_wms.url, pilot)
    entry = spool.read(path)
    assert entry is not None and len(entry.key) == 36
    ReportSender(spool, timeout=5).flush()
    ReportSender(spool, timeout=5).flush()

    fake_wms.report_answer = lambda uuid, body: (200, {"outcome": "applied"})
    later = Spool(spool.directory)
    assert ReportSender(later, timeout=5).flush() == 0

    calls = fake_wms.calls_to("report")
    assert len(calls) == 3 and {c.key for c in calls} == {entry.key}


def test_a_report_spooled_before_keys_gets_a_stable_one(spool, fake_wms, pilot):
    import json

    path = put(spool, fake_wms.url, pilot)
    document = json.loads(path.read_text())
    del document["idempotency_key"]
    path.write_text(json.dumps(document))
    first, second = spool.read(path), spool.read(path)
    assert first is not None and second is not None
    assert first.key == second.key and len(first.key) == 36


# --- several reports waiting: one call ------------------------------------------------------


def test_the_reports_waiting_together_go_in_one_call_each_answered_on_its_own(
    spool, fake_wms, pilot, caplog
):
    paths = [put(spool, fake_wms.url, pilot, f"j-{i}") for i in range(5)]
    refused = "j-3"
    fake_wms.report_answer = lambda uuid, body: (
        (403, {"error": "permission_denied", "detail": "not this pilot's"})
        if uuid == refused
        else (200, {"outcome": "applied", "job_state": "finished"})
    )

    assert ReportSender(spool).flush() == 0

    (call,) = fake_wms.calls_to("events")
    assert call.path == f"/api/v1/pilots/{pilot[0]}/events/"
    assert [e["job_uuid"] for e in call.body["events"]] == [f"j-{i}" for i in range(5)]
    assert all(
        {k: v for k, v in e.items() if k != "job_uuid"} == REPORT for e in call.body["events"]
    )
    assert sorted(call.spooled) == sorted(p.name for p in paths)  # all on disk when sent
    assert not any(p.exists() for p in paths)  # taken, or refused for good: gone
    assert "report_refused_dropped" in caplog.text and refused in caplog.text
    # no report went on its own: every report the WMS saw came in the call
    assert len(fake_wms.final_reports()) == 5
    assert all(c.key == call.key for c in fake_wms.final_reports())


def test_a_batch_the_wms_cannot_take_stays_whole_and_is_the_same_call_when_sent_again(
    spool, fake_wms, pilot
):
    paths = [put(spool, fake_wms.url, pilot, f"j-{i}") for i in range(3)]
    fake_wms.report_answer = lambda uuid, body: (503, {"error": "database_unavailable"})

    assert ReportSender(spool).flush() == 3
    assert all(p.exists() for p in paths)

    fake_wms.report_answer = lambda uuid, body: (200, {"outcome": "applied"})
    assert ReportSender(Spool(spool.directory)).flush() == 0  # a later run

    first, second = fake_wms.calls_to("events")
    assert first.key == second.key and len(first.key) == 36  # replayed if it was taken


def test_a_batch_refused_as_a_whole_is_sent_report_by_report(spool, fake_wms, pilot):
    paths = [put(spool, fake_wms.url, pilot, f"j-{i}") for i in range(3)]
    real = fake_wms.dispatch

    def no_bulk(path, auth, body, *, key=""):
        if path.endswith("/events/"):
            return 413, {"error": "request_too_large", "detail": "too big"}
        return real(path, auth, body, key=key)

    fake_wms.dispatch = no_bulk  # type: ignore[method-assign]

    assert ReportSender(spool).flush() == 0

    assert not any(p.exists() for p in paths)
    singles = [c for c in fake_wms.calls if c.path.endswith("/report/")]
    assert sorted(c.path.split("/")[4] for c in singles) == ["j-0", "j-1", "j-2"]
    assert len({c.key for c in singles}) == 3  # each with its own report's key


def test_the_reports_of_two_pilots_go_in_two_calls_each_with_its_token(spool, fake_wms, pilot):
    fake_wms.tokens["pilot-token-4"] = 4
    for i in range(2):
        put(spool, fake_wms.url, pilot, f"a-{i}")
        put(spool, fake_wms.url, (4, "pilot-token-4"), f"b-{i}")

    assert ReportSender(spool).flush() == 0

    calls = fake_wms.calls_to("events")
    assert sorted((c.path, c.auth) for c in calls) == [
        ("/api/v1/pilots/3/events/", "Pilot pilot-token-3"),
        ("/api/v1/pilots/4/events/", "Pilot pilot-token-4"),
    ]


def test_batches_are_cut_by_count(spool, fake_wms, pilot, monkeypatch):
    from pilots.agent import spool as spool_module

    monkeypatch.setattr(spool_module, "BATCH_REPORTS", 2)
    for i in range(5):
        put(spool, fake_wms.url, pilot, f"j-{i}")

    assert ReportSender(spool).flush() == 0

    sizes = [len(c.body["events"]) for c in fake_wms.calls_to("events")]
    assert sizes == [2, 2]  # and the fifth alone, as a report
    assert len(fake_wms.calls_to("report")) == 5


def test_reports_spooled_close_together_are_gathered_into_one_call(spool, fake_wms, pilot):
    """Woken by a report, the sender waits ``gather`` seconds for more: three jobs ending
    within it are reported in one call; without it the first goes alone."""
    import time

    sender = ReportSender(spool, gather=0.3)
    sender.start()
    try:
        for i in range(3):
            put(spool, fake_wms.url, pilot, f"g-{i}")
            sender.wake()
            time.sleep(0.02)
        wait_until(lambda: len(fake_wms.final_reports()) == 3, timeout=5)
    finally:
        sender.stop()
    (call,) = fake_wms.calls_to("events")
    assert [e["job_uuid"] for e in call.body["events"]] == ["g-0", "g-1", "g-2"]
    assert all(c.key == call.key for c in fake_wms.final_reports())  # none went alone
    assert len(spool) == 0

    at_once = ReportSender(spool, gather=0)
    at_once.start()
    try:
        put(spool, fake_wms.url, pilot, "n-0")
        at_once.wake()
        wait_until(lambda: fake_wms.final_reports("n-0"), timeout=5)
    finally:
        at_once.stop()
    assert len(fake_wms.calls_to("events")) == 1  # the lone report went as a report
