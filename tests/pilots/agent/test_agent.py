"""The agent against the real RabbitMQ (a namespace of the test's own) and the fake WMS: taking
messages, start answers, slots, commands from both paths, drain, shutdown, idle exit."""

from __future__ import annotations

import itertools
import threading
import time

import psutil

from tests.pilots.agent.conftest import job_message
from tests.pilots.agent.fakewms import wait_until
from wms.contract import Command


def publish_job(bus, fake_wms, outdir, *args, **kw):
    job = job_message(outdir, *args, **kw)
    fake_wms.jobs[job.job_uuid] = job.to_dict()
    bus.publish(job)
    return job


def test_it_registers_declares_heartbeats_and_says_goodbye(
    bus, fake_wms, agent_config, start_agent
):
    running = start_agent(agent_config, site="SITE-A", slots=3)
    pilot_id = running.agent.pilot_id

    (register,) = fake_wms.calls_to("register")
    assert register.body["hostname"] == "wn001.test"
    assert (register.body["site"], register.body["device_type"], register.body["slots"]) == (
        "SITE-A",
        "cpu",
        3,
    )
    assert register.body["cores"] >= 1 and register.body["memory_mb"] > 0
    assert bus.command_queue_exists(pilot_id)
    beat = wait_until(lambda: fake_wms.calls_to("heartbeat"))[0]
    assert beat.auth == f"Pilot pilot-token-{pilot_id}"
    assert beat.body["state"] == "idle" and beat.body["jobs"] == []
    assert {"load1", "free_disk_mb", "cpu_percent", "rss_mb"} <= set(beat.body["metrics"])

    assert running.stop("drain") == 0

    (terminate,) = fake_wms.calls_to("terminate")
    assert "drain" in terminate.body["reason"]
    assert not bus.command_queue_exists(pilot_id)  # no litter on the broker


def test_a_job_is_started_acked_run_and_reported(bus, fake_wms, agent_config, start_agent, outdir):
    running = start_agent(agent_config)
    job = publish_job(bus, fake_wms, outdir, "write", "hist.json={}")

    (report,) = wait_until(lambda: fake_wms.final_reports(job.job_uuid))
    (start,) = fake_wms.calls_to("start", job.job_uuid)
    assert start.body == {"attempt": 0}
    assert report.body["state"] == "finished" and report.body["exit_code"] == 0
    assert {o["name"] for o in report.body["outputs"]} == {"hist.json", f"{job.job_uuid}.0.log"}
    assert (outdir / job.job_uuid / "hist.json").read_text() == "{}"
    assert report.spooled  # on disk before it was sent
    running.stop()
    assert bus.ready() == 0
    assert list(running.agent.spool.paths()) == []  # acknowledged, so deleted
    assert not (running.agent.work_dir / "jobs" / f"{job.job_uuid}.0").exists()


def test_the_server_s_copy_of_the_job_is_the_one_run(
    bus, fake_wms, agent_config, start_agent, outdir, caplog
):
    running = start_agent(agent_config)
    job = job_message(outdir, "write", "from-the-bus.txt=1")
    server_copy = job_message(outdir, "write", "from-the-server.txt=1", job_uuid=job.job_uuid)
    answer = {k: v for k, v in server_copy.to_dict().items() if k not in ("v", "kind")}
    fake_wms.start_answer = lambda uuid, body: (200, answer)
    bus.publish(job)

    (report,) = wait_until(lambda: fake_wms.final_reports(job.job_uuid))
    running.stop()

    names = {o["name"] for o in report.body["outputs"] if o["type"] == "output"}
    assert names == {"from-the-server.txt"}
    assert "start_answer_not_a_job_message" not in caplog.text


def test_start_409_acks_and_drops_the_message(bus, fake_wms, agent_config, start_agent, outdir):
    fake_wms.start_answer = lambda uuid, body: (409, {"error": "job_not_queued", "detail": "x"})
    running = start_agent(agent_config)
    job = publish_job(bus, fake_wms, outdir, "write", "a=1")

    wait_until(lambda: fake_wms.calls_to("start", job.job_uuid))
    running.stop()

    assert bus.ready() == 0  # acked: gone for good
    assert len(fake_wms.calls_to("start", job.job_uuid)) == 1
    assert fake_wms.final_reports() == []


def test_start_5xx_is_retried_with_its_key_then_requeued(
    bus, fake_wms, agent_config, start_agent, outdir
):
    fake_wms.start_answer = lambda uuid, body: (503, {"error": "unavailable", "detail": "db"})
    running = start_agent(agent_config, start_retries=2)
    job = publish_job(bus, fake_wms, outdir, "write", "a=1")

    wait_until(lambda: len(fake_wms.calls_to("start", job.job_uuid)) >= 3)
    calls = fake_wms.calls_to("start", job.job_uuid)[:3]
    running.stop()

    keys = {c.key for c in calls}
    assert len(keys) == 1 and len(keys.pop()) == 36  # one call, tried three times
    wait_until(lambda: bus.ready() == 1)  # rejected with requeue: still there for someone else
    assert fake_wms.final_reports() == []


def test_a_start_whose_answer_was_lost_is_sent_again_and_runs_once(
    bus, fake_wms, agent_config, start_agent, outdir
):
    """The first start's answer never comes (the read time-out passes): the same call, with
    the same key, is sent again; the job runs once and its message is acked."""
    answered = threading.Event()

    def slow_first(uuid, body):
        if not answered.is_set():
            answered.set()
            time.sleep(2.0)  # longer than the pilot's read time-out
        return 200, fake_wms.jobs.get(uuid, {})

    fake_wms.start_answer = slow_first
    running = start_agent(agent_config, http_timeout=0.5)
    job = publish_job(bus, fake_wms, outdir, "write", "a=1")

    wait_until(lambda: fake_wms.final_reports(job.job_uuid), timeout=15)
    running.stop()

    starts = fake_wms.calls_to("start", job.job_uuid)
    assert len(starts) == 2 and starts[0].key == starts[1].key
    assert len(fake_wms.final_reports(job.job_uuid)) == 1
    assert bus.ready() == 0


def test_a_malformed_message_is_acked_and_dropped(
    bus, fake_wms, agent_config, start_agent, outdir, caplog
):
    running = start_agent(agent_config)
    bus.publish(b"this is not JSON")
    bus.publish(b'{"v": 99, "kind": "job"}')
    job = publish_job(bus, fake_wms, outdir, "write", "a=1")  # behind them, still taken

    wait_until(lambda: fake_wms.final_reports(job.job_uuid))
    running.stop()

    assert bus.ready() == 0
    assert [c.path for c in fake_wms.calls_to("start")] == [f"/api/v1/jobs/{job.job_uuid}/start/"]
    assert caplog.text.count("job_message_malformed_dropped") == 2


def test_never_more_jobs_at_once_than_slots(
    bus, fake_wms, agent_config, start_agent, outdir, tmp_path
):
    record = tmp_path / "record.txt"
    running = start_agent(agent_config, slots=2)
    jobs = [
        publish_job(bus, fake_wms, outdir, "sleep", "1.0", "--record", str(record))
        for _ in range(5)
    ]

    wait_until(lambda: len(fake_wms.final_reports()) == 5, timeout=15)
    running.stop()

    assert {c.body["state"] for c in fake_wms.final_reports()} == {"finished"}
    assert {j.job_uuid for j in jobs} == {c.path.split("/")[4] for c in fake_wms.final_reports()}
    # the processes' own clock: how many were alive at once
    events = sorted(
        (float(t), +1 if what == "start" else -1)
        for what, _, t in (line.split() for line in record.read_text().splitlines())
    )
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 2  # in parallel, never beyond the slots
    # (The server may see a third start before the previous final report: a slot is free as
    # soon as its process ended; reporting and the spool do not hold a slot.)
    assert bus.ready() == 0


def test_kill_job_by_the_command_queue_kills_the_tree_once(
    bus, fake_wms, agent_config, start_agent, outdir, tmp_path
):
    pidfile = tmp_path / "pids"
    running = start_agent(agent_config)
    job = publish_job(bus, fake_wms, outdir, "spawn", str(pidfile))
    child, grandchild = map(
        int, wait_until(lambda: pidfile.exists() and pidfile.read_text()).split()
    )
    command = Command(
        command="kill_job",
        pilot_id=running.agent.pilot_id,
        id="cmd-1",
        job_uuid=job.job_uuid,
        attempt=0,
        reason="task cancelled",
    )

    bus.send_command(command)
    fake_wms.commands = [  # the same command by the heartbeat path too
        {"id": "cmd-1", "command": "kill_job", "job_uuid": job.job_uuid, "attempt": 0}
    ]

    (report,) = wait_until(lambda: fake_wms.final_reports(job.job_uuid))
    assert report.body["state"] == "failed" and report.body["error_code"] == "killed"
    assert "task cancelled" in report.body["error_message"]
    assert [o["type"] for o in report.body["outputs"]] == ["log"]
    wait_until(lambda: not psutil.pid_exists(child) and not psutil.pid_exists(grandchild), 5)
    wait_until(lambda: not fake_wms.commands)  # the heartbeat handed it out
    time.sleep(0.5)  # a few more heartbeats
    running.stop()
    acks = [i for c in fake_wms.calls_to("heartbeat") for i in c.body["acked_commands"]]
    assert acks == ["cmd-1"]  # executed and acknowledged once, whatever the path


def test_kill_job_by_the_heartbeat_answer(bus, fake_wms, agent_config, start_agent, outdir):
    running = start_agent(agent_config)
    job = publish_job(bus, fake_wms, outdir, "sleep", "30")
    wait_until(lambda: job.job_uuid in running.agent.jobs and running.agent.jobs[job.job_uuid])
    wait_until(lambda: running.agent.jobs[job.job_uuid].runner.pid)
    fake_wms.commands = [
        {"id": "c-7", "command": "kill_job", "job_uuid": job.job_uuid, "attempt": None}
    ]

    (report,) = wait_until(lambda: fake_wms.final_reports(job.job_uuid))
    assert report.body["error_code"] == "killed"
    running.stop()


def test_heartbeats_carry_the_job_s_metrics_and_no_running_report_is_sent(
    bus, fake_wms, agent_config, start_agent, outdir
):
    running = start_agent(agent_config)
    job = publish_job(bus, fake_wms, outdir, "sleep", "1.2")

    busy = wait_until(
        lambda: [
            c
            for c in fake_wms.calls_to("heartbeat")
            if c.body["jobs"] and c.body["jobs"][0]["wall_time"] > 0.3
        ]
    )
    (entry,) = busy[0].body["jobs"]
    assert busy[0].body["state"] == "busy"
    assert entry["job_uuid"] == job.job_uuid and entry["attempt"] == 0
    assert entry["rss_mb"] > 0 and entry["cpu_time"] >= 0
    wait_until(lambda: fake_wms.final_reports(job.job_uuid))
    # running metrics travel one way: in the heartbeat (docs/pilot.md)
    assert [c.body["state"] for c in fake_wms.calls_to("report", job.job_uuid)] == ["finished"]
    running.stop()


def test_drain_finishes_the_running_job_takes_no_more_and_exits(
    bus, fake_wms, agent_config, start_agent, outdir
):
    running = start_agent(agent_config)
    first = publish_job(bus, fake_wms, outdir, "sleep", "0.5")
    wait_until(lambda: running.agent.jobs)

    bus.send_command(Command(command="drain", pilot_id=running.agent.pilot_id, id="d-1"))
    wait_until(lambda: running.agent.draining)
    second = publish_job(bus, fake_wms, outdir, "write", "a=1")
    assert running.stop("drain") == 0  # joins; the drain itself came from the bus

    (report,) = fake_wms.final_reports(first.job_uuid)
    assert report.body["state"] == "finished"
    assert fake_wms.calls_to("start", second.job_uuid) == []
    assert bus.ready() == 1
    assert "drain command" in fake_wms.calls_to("terminate")[0].body["reason"]
    assert any(c.body["state"] == "draining" for c in fake_wms.calls_to("heartbeat"))


def test_shutdown_kills_the_running_jobs_reports_them_and_exits(
    bus, fake_wms, agent_config, start_agent, outdir
):
    running = start_agent(agent_config, slots=2)
    jobs = [publish_job(bus, fake_wms, outdir, "sleep", "30") for _ in range(2)]
    wait_until(
        lambda: (
            len(running.agent.jobs) == 2 and all(r.runner.pid for r in running.agent.jobs.values())
        )
    )

    fake_wms.commands = [{"id": "s-1", "command": "shutdown", "reason": "node maintenance"}]
    running.thread.join(15)

    assert not running.thread.is_alive() and running.result == [0]
    for job in jobs:
        (report,) = fake_wms.final_reports(job.job_uuid)
        assert report.body["error_code"] == "killed"
        assert "node maintenance" in report.body["error_message"]
    assert "node maintenance" in fake_wms.calls_to("terminate")[0].body["reason"]


def test_idle_exit(bus, fake_wms, agent_config, start_agent):
    running = start_agent(agent_config, idle_timeout=0.5)

    running.thread.join(10)

    assert not running.thread.is_alive() and running.result == [0]
    assert "idle" in fake_wms.calls_to("terminate")[0].body["reason"]


def test_a_wms_outage_loses_no_result(bus, fake_wms, agent_config, start_agent, outdir):
    fake_wms.report_answer = lambda uuid, body: (503, {"error": "unavailable"})
    running = start_agent(agent_config)
    job = publish_job(bus, fake_wms, outdir, "write", "a=1")

    wait_until(lambda: fake_wms.final_reports(job.job_uuid))
    spooled = wait_until(lambda: running.agent.spool.paths())
    assert len(spooled) == 1 and spooled[0].exists()

    fake_wms.report_answer = lambda uuid, body: (200, {"outcome": "applied"})
    wait_until(lambda: not spooled[0].exists(), timeout=10)  # the background loop, with backoff
    running.stop()
    assert fake_wms.final_reports(job.job_uuid)[-1].body["state"] == "finished"


def test_a_revoked_token_stops_the_pilot(bus, fake_wms, agent_config, start_agent):
    running = start_agent(agent_config)
    fake_wms.tokens.clear()  # revoked in the admin: every pilot call is 401 now

    running.thread.join(10)

    assert not running.thread.is_alive() and running.result == [3]


def test_the_embedded_filesystem_broker_works_too(tmp_path, fake_wms, agent_config, outdir):
    """``manage.py up`` runs pilots on kombu's filesystem transport (folders as broker options)."""
    import threading
    from dataclasses import replace

    from kombu import Connection, Producer

    from pilots.agent.agent import Agent
    from wms.topology import Topology

    folders = {}
    for key, sub in (
        ("data_folder_in", "q"),
        ("data_folder_out", "q"),
        ("processed_folder", "done"),
        ("control_folder", "control"),
    ):
        (tmp_path / "broker" / sub).mkdir(parents=True, exist_ok=True)
        folders[key] = str(tmp_path / "broker" / sub)
    config = replace(agent_config, broker_url="filesystem://", broker_options=folders)
    agent = Agent(config, install_signals=False, sample_interval=0.1)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    thread.start()
    wait_until(agent.registered.is_set)
    job = job_message(outdir, "write", "h.json=1")
    fake_wms.jobs[job.job_uuid] = job.to_dict()
    conn = Connection("filesystem://", transport_options=folders)
    topology = Topology(fake_wms.bus_prefix)
    publish = Producer(conn.default_channel).publish
    publish(
        job.encode(),
        exchange=topology.jobs_exchange,
        routing_key="cpu",
        declare=[topology.job_queue("cpu")],
    )
    try:
        (report,) = wait_until(lambda: fake_wms.final_reports(job.job_uuid))
        assert report.body["state"] == "finished"
        publish(
            Command(command="drain", pilot_id=agent.pilot_id, id="d").encode(),
            exchange=topology.commands_exchange,
            routing_key=topology.command_routing_key(agent.pilot_id),
        )
        thread.join(10)  # the command came through the filesystem queue
        assert not thread.is_alive() and result == [0]
    finally:
        if thread.is_alive():
            agent.shutdown("test teardown")
            thread.join(10)
        conn.release()


def test_a_pilot_that_cannot_reach_the_wms_runs_on_spools_backs_off_and_never_exits(
    bus, fake_wms, agent_config, start_agent, outdir
):
    """Issue 13, item 2: the WMS away (every heartbeat and report 503), then back saying the
    pilot is ``lost``: the job runs to its end, its report waits in the spool and is named in
    the heartbeats as ``reporting``, the heartbeats back off (jittered, growing gaps), and the
    pilot neither exits nor kills anything."""
    running = start_agent(agent_config)
    job = publish_job(bus, fake_wms, outdir, "sleep", "0.6")
    wait_until(lambda: job.job_uuid in running.agent.jobs)
    fake_wms.heartbeat_answer = lambda body: (503, {"error": "unavailable"})
    fake_wms.report_answer = lambda uuid, body: (503, {"error": "unavailable"})
    down_since = len(fake_wms.calls_to("heartbeat"))

    wait_until(lambda: running.agent.spool.paths(), timeout=10)
    named = wait_until(
        lambda: [
            c
            for c in fake_wms.calls_to("heartbeat")[down_since:]
            if c.body.get("reporting") == [{"job_uuid": job.job_uuid, "attempt": 0}]
            and c.body["jobs"] == []  # ended: named as reporting only
        ],
        timeout=20,
    )
    assert named
    wait_until(lambda: len(fake_wms.calls_to("heartbeat")[down_since:]) >= 5, timeout=20)
    beats = [c.at for c in fake_wms.calls_to("heartbeat")[down_since:]]
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    # backed off: the gaps grow beyond the interval the WMS asked for (0.2 s)
    assert max(gaps) > fake_wms.heartbeat_interval * 1.2
    assert running.thread.is_alive()

    # The WMS is back and says the pilot is lost (an old server would add a shutdown; ours
    # does not): the pilot carries on, sends its report, and stays.
    fake_wms.report_answer = lambda uuid, body: (200, {"outcome": "applied"})
    fake_wms.heartbeat_answer = lambda body: (
        200,
        {"commands": [], "heartbeat_interval": fake_wms.heartbeat_interval, "state": "lost"},
    )
    wait_until(lambda: not running.agent.spool.paths(), timeout=20)
    after = len(fake_wms.calls_to("heartbeat"))
    wait_until(lambda: len(fake_wms.calls_to("heartbeat")) > after + 2, timeout=10)
    assert running.thread.is_alive() and not running.agent.shutting_down
    assert fake_wms.calls_to("heartbeat")[-1].body["reporting"] == []
    assert fake_wms.final_reports(job.job_uuid)[-1].body["state"] == "finished"
    assert running.stop("drain") == 0


def test_a_start_refused_because_the_pilot_is_lost_requeues_the_message(
    bus, fake_wms, agent_config, start_agent, outdir
):
    refused = {"n": 0}

    def answer(uuid, body):
        if refused["n"] < 1:
            refused["n"] += 1
            return 409, {"error": "pilot_not_live", "detail": "lost"}
        return 200, fake_wms.jobs.get(uuid, {})

    fake_wms.start_answer = answer
    running = start_agent(agent_config)
    job = publish_job(bus, fake_wms, outdir, "write", "a=1")

    (report,) = wait_until(lambda: fake_wms.final_reports(job.job_uuid), timeout=20)
    assert len(fake_wms.calls_to("start", job.job_uuid)) == 2  # requeued, taken again
    assert report.body["state"] == "finished"
    running.stop()


def test_no_idle_exit_while_reports_wait_for_an_unreachable_wms(
    bus, fake_wms, agent_config, start_agent, outdir
):
    fake_wms.report_answer = lambda uuid, body: (503, {"error": "unavailable"})
    running = start_agent(agent_config, idle_timeout=0.5)
    job = publish_job(bus, fake_wms, outdir, "write", "a=1")
    wait_until(lambda: running.agent.spool.paths())
    # idle far beyond the timeout, but its report is not taken yet: it stays
    seen = len(fake_wms.final_reports(job.job_uuid))
    wait_until(lambda: len(fake_wms.final_reports(job.job_uuid)) >= seen + 2, timeout=20)
    assert running.thread.is_alive() and running.agent.spool.paths()

    fake_wms.report_answer = lambda uuid, body: (200, {"outcome": "applied"})
    running.thread.join(30)  # the report is taken; now it is idle and exits
    assert not running.thread.is_alive() and running.result == [0]
    assert not running.agent.spool.paths()


def test_every_broker_operation_of_the_job_connection_has_a_time_out(agent_config):
    """py-amqp's socket read/write time-outs (``broker_timeout``) bound a ``basic_get``, an
    ack or a reject on a broker that stopped answering; a site's own option wins."""
    from dataclasses import replace

    from pilots.agent.agent import Agent

    agent = Agent(replace(agent_config, broker_timeout=7.0), install_signals=False)
    conn = agent.intake.new_connection()
    try:
        assert conn.transport_options["read_timeout"] == 7.0
        assert conn.transport_options["write_timeout"] == 7.0
        assert conn.connect_timeout == 7.0
    finally:
        conn.release()
    own = replace(agent_config, broker_options={"read_timeout": "3"})
    conn = Agent(own, install_signals=False).intake.new_connection()
    try:
        assert conn.transport_options["read_timeout"] == 3.0
    finally:
        conn.release()
