"""The agent takes the job messages waiting for its free slots together and starts them in one
``POST /pilots/{id}/starts/`` (issue 15), acking each message by its own answer; against the
real RabbitMQ and the fake WMS."""

from __future__ import annotations

from tests.pilots.agent.fakewms import wait_until
from tests.pilots.agent.test_agent import publish_job


def test_the_messages_waiting_for_free_slots_are_started_in_one_call(
    bus, fake_wms, agent_config, start_agent, outdir
):
    jobs = [publish_job(bus, fake_wms, outdir, "write", f"out{i}.txt=x") for i in range(4)]
    running = start_agent(agent_config, slots=4)

    wait_until(lambda: len(fake_wms.final_reports()) == 4, timeout=15)
    running.stop()

    assert fake_wms.starts_calls == [4]
    assert {c.path.split("/")[4] for c in fake_wms.final_reports()} == {j.job_uuid for j in jobs}
    assert {c.body["state"] for c in fake_wms.final_reports()} == {"finished"}
    # one call, one idempotency key for its retries; each start recorded with its attempt
    assert len({c.key for c in fake_wms.calls_to("start")}) == 1
    assert all(c.body == {"attempt": 0} for c in fake_wms.calls_to("start"))
    assert bus.ready() == 0


def test_a_start_refused_in_a_batch_drops_its_message_alone(
    bus, fake_wms, agent_config, start_agent, outdir
):
    jobs = [publish_job(bus, fake_wms, outdir, "write", f"out{i}.txt=x") for i in range(3)]
    refused = jobs[1].job_uuid

    def answer(uuid, body):
        if uuid == refused:
            return 409, {"error": "job_not_queued", "detail": "cancelled"}
        return 200, fake_wms.jobs[uuid]

    fake_wms.start_answer = answer
    running = start_agent(agent_config, slots=3)

    wait_until(lambda: len(fake_wms.final_reports()) == 2, timeout=15)
    running.stop()

    assert fake_wms.starts_calls == [3]
    assert {c.path.split("/")[4] for c in fake_wms.final_reports()} == {
        jobs[0].job_uuid,
        jobs[2].job_uuid,
    }
    assert len(fake_wms.calls_to("start", refused)) == 1  # dropped: not taken again
    assert bus.ready() == 0


def test_the_same_message_twice_in_a_batch_runs_once(
    bus, fake_wms, agent_config, start_agent, outdir
):
    job = publish_job(bus, fake_wms, outdir, "write", "out.txt=x")
    bus.publish(job)  # published again (the executor's re-publish of a queued job)
    other = publish_job(bus, fake_wms, outdir, "write", "other.txt=x")
    running = start_agent(agent_config, slots=3)

    wait_until(lambda: len(fake_wms.final_reports()) == 2, timeout=15)
    running.stop()

    assert fake_wms.starts_calls == [2]
    assert len(fake_wms.final_reports(job.job_uuid)) == 1
    assert len(fake_wms.final_reports(other.job_uuid)) == 1
    assert bus.ready() == 0


def test_a_server_without_the_batched_call_gets_one_start_per_message(
    bus, fake_wms, agent_config, start_agent, outdir
):
    jobs = [publish_job(bus, fake_wms, outdir, "write", f"out{i}.txt=x") for i in range(3)]
    original = fake_wms._starts
    fake_wms._starts = lambda auth, body, call: (404, {"error": "not_found", "detail": "starts"})
    try:
        running = start_agent(agent_config, slots=3)
        wait_until(lambda: len(fake_wms.final_reports()) == 3, timeout=15)
        running.stop()
    finally:
        fake_wms._starts = original

    starts = fake_wms.calls_to("start")
    assert sorted(c.path.split("/")[4] for c in starts) == sorted(j.job_uuid for j in jobs)
    assert len({c.key for c in starts}) == 3  # each its own call
    assert bus.ready() == 0


def test_a_batch_whose_answer_is_lost_is_sent_again_with_its_key_and_runs_once(
    bus, fake_wms, agent_config, start_agent, outdir
):
    jobs = [publish_job(bus, fake_wms, outdir, "write", f"out{i}.txt=x") for i in range(2)]
    original = fake_wms._starts
    failures = []

    def flaky(auth, body, call):
        if not failures:
            failures.append(call.key)
            return 503, {"error": "unavailable", "detail": "db"}
        return original(auth, body, call)

    fake_wms._starts = flaky
    try:
        running = start_agent(agent_config, slots=2)
        wait_until(lambda: len(fake_wms.final_reports()) == 2, timeout=15)
        running.stop()
    finally:
        fake_wms._starts = original

    assert fake_wms.starts_calls == [2]  # the retry, answered
    assert {c.key for c in fake_wms.calls_to("start")} == set(failures)  # the same key
    assert {c.path.split("/")[4] for c in fake_wms.final_reports()} == {j.job_uuid for j in jobs}
    assert bus.ready() == 0


def test_a_job_thread_is_shown_to_the_watchdog_only_once_it_runs(
    monkeypatch, bus, fake_wms, agent_config, start_agent, outdir
):
    """A job thread created but not started yet is not alive: had the watchdog seen it then,
    it would have freed the slot of a job that had not begun (``slot_stuck``; seen once in
    2,000 jobs of the end-to-end benchmark)."""
    import threading
    import time

    holder: dict = {}
    verdicts: list = []
    real = threading.Thread

    class Probe(real):  # type: ignore[misc, valid-type]
        def start(self) -> None:
            agent = holder.get("agent")
            if agent is not None and self.name.startswith("job-"):
                verdicts.extend(
                    agent.watchdog.why_stuck(r, time.monotonic()) for r in agent.slots.running()
                )
            super().start()

    monkeypatch.setattr(threading, "Thread", Probe)
    running = start_agent(agent_config, slots=2)
    holder["agent"] = running.agent
    for i in range(2):
        publish_job(bus, fake_wms, outdir, "write", f"out{i}.txt=x")
    wait_until(lambda: len(fake_wms.final_reports()) == 2, timeout=15)
    running.stop()

    assert verdicts and all(v is None for v in verdicts), verdicts
