"""The runner with real child processes: outputs, log, checksums, exit codes, stage-in, kills."""

from __future__ import annotations

import os
import threading
import time
import zlib
from pathlib import Path

import psutil
import pytest

from pilots.agent.runner import JobRunner
from tests.pilots.agent.conftest import job_message, read_json
from tests.pilots.agent.fakewms import wait_until
from wms.checksums import file_checksum
from wms.contract import InputFile
from wms.locations import canonical_roots


# Where these tests' inputs may come from: the test's temporary directory, and the places
# the refusals below name (so that they fail for their own reason, not for their root).
def roots(tmp_path: Path) -> tuple[str, ...]:
    return canonical_roots(
        [
            tmp_path.resolve().as_uri(),
            "root://eos.example.org/",
            "https://example.org/",
            "file:///nonexistent",
        ]
    )


def run(job, tmp_path: Path, **kw):
    kw.setdefault("storage_roots", roots(tmp_path))
    runner = JobRunner(job, work_root=tmp_path / "work", sample_interval=0.05, **kw)
    return runner, runner.run()


def test_a_finished_job_s_outputs_and_log_are_checksummed_and_copied(tmp_path, outdir):
    job = job_message(outdir, "write", "hist.json={}", "sub/b.txt=hello", attempt=2)
    _, result = run(job, tmp_path)

    assert (result.state, result.exit_code, result.error_code) == ("finished", 0, "")
    by_name = {o["name"]: o for o in result.outputs}
    assert set(by_name) == {"hist.json", "sub/b.txt", f"{job.job_uuid}.2.log"}
    dest = outdir / job.job_uuid
    assert (dest / "sub" / "b.txt").read_text() == "hello"
    b = by_name["sub/b.txt"]
    assert b["type"] == "output" and b["size"] == 5
    assert b["check_sum"] == f"adler32:{zlib.adler32(b'hello'):08x}"
    assert b["url"] == (dest / "sub" / "b.txt").as_uri()
    log_entry = by_name[f"{job.job_uuid}.2.log"]
    log_copy = outdir / job.job_uuid / "2" / f"{job.job_uuid}.2.log"
    assert log_entry["type"] == "log" and log_entry["url"] == log_copy.as_uri()
    assert log_entry["check_sum"] == file_checksum(log_copy)
    text = log_copy.read_text()
    assert "stdout: wrote 2 files" in text and "stderr: a line on stderr" in text
    assert result.metrics["wall_time"] > 0 and result.metrics["cpu_time"] > 0
    assert result.log_staged


def test_a_nonzero_exit_fails_and_keeps_outputs_out_of_the_dataset(tmp_path, outdir):
    job = job_message(outdir, "write", "partial.dat=x", "--exit", "3")
    _, result = run(job, tmp_path)

    assert (result.state, result.exit_code, result.error_code) == ("failed", 3, "nonzero_exit")
    assert [o["type"] for o in result.outputs] == ["log"]
    assert not (outdir / job.job_uuid / "partial.dat").exists()


def test_a_missing_executable_is_exec_failed_with_its_log(tmp_path, outdir):
    job = job_message(outdir, executable=str(tmp_path / "no-such-program"))
    _, result = run(job, tmp_path)

    assert (result.state, result.exit_code, result.error_code) == ("failed", None, "exec_failed")
    assert "no-such-program" in result.error_message
    assert [o["type"] for o in result.outputs] == ["log"]


def test_the_job_gets_its_environment_and_file_inputs(tmp_path, outdir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("A")
    (data / "b c.txt").write_text("B")
    inputs = [
        InputFile(name="a.txt", dataset_uid="d", url=(data / "a.txt").as_uri()),
        InputFile(name="b c.txt", dataset_uid="d", url=str(data / "b c.txt")),  # a plain path
    ]
    job = job_message(outdir, "env", inputs=inputs, attempt=1)
    os.environ["WMS_PILOT_REGISTER_TOKEN"] = "secret"  # the pilot's settings stay the pilot's
    try:
        runner, result = run(job, tmp_path)
    finally:
        del os.environ["WMS_PILOT_REGISTER_TOKEN"]

    assert result.state == "finished", result.error_message
    env = read_json(outdir / job.job_uuid / "env.json")
    assert env["WMS_JOB_UUID"] == job.job_uuid
    assert (env["WMS_ATTEMPT"], env["WMS_TASK_ID"]) == ("1", "42")
    assert env["WMS_OUTPUT_DIR"] == str(runner.outputs_dir) == str(Path(env["_cwd"]) / "outputs")
    assert env["_contents"] == ["A", "B"]
    assert "WMS_PILOT_REGISTER_TOKEN" not in env


def test_copy_mode_copies_inputs_into_the_work_dir_and_checks_them(tmp_path, outdir):
    src = tmp_path / "in.txt"
    src.write_text("payload")
    good = InputFile("in.txt", "d", src.as_uri(), 7, file_checksum(src))
    job = job_message(outdir, "env", inputs=[good])
    runner, result = run(job, tmp_path, stage_in="copy")
    env = read_json(outdir / job.job_uuid / "env.json")
    assert result.state == "finished"
    assert read_json_list(env["WMS_INPUT_FILES"]) == [str(runner.inputs_dir / "in.txt")]

    bad = InputFile("in.txt", "d", src.as_uri(), 7, "adler32:00000001")
    _, result = run(job_message(outdir, "env", inputs=[bad]), tmp_path, stage_in="copy")
    assert (result.state, result.error_code) == ("failed", "stage_in_failed")
    assert "checksum" in result.error_message


def read_json_list(text: str) -> list:
    import json

    return json.loads(text)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("root://eos.example.org//data/x.root", "scheme 'root'"),
        ("https://example.org/x", "scheme 'https'"),
        ("file:///nonexistent/x.root", "not a readable file"),
        ("", "no URL"),
    ],
)
def test_inputs_that_cannot_be_staged_fail_clearly(tmp_path, outdir, url, why):
    job = job_message(outdir, "env", inputs=[InputFile("x.root", "d", url)])
    _, result = run(job, tmp_path)

    assert (result.state, result.error_code) == ("failed", "stage_in_failed")
    assert why in result.error_message
    assert [o["type"] for o in result.outputs] == ["log"]  # the log says it too
    log_copy = outdir / job.job_uuid / "0" / f"{job.job_uuid}.0.log"
    assert why in log_copy.read_text()


def test_an_output_url_that_cannot_be_written_fails_the_stage_out(tmp_path):
    job = job_message(tmp_path, "write", "a=1")
    job = type(job)(**{**job.__dict__, "output_url": "s3://bucket/x"})
    runner, result = run(job, tmp_path)

    assert (result.state, result.error_code) == ("failed", "stage_out_failed")
    assert result.outputs == [] and not result.log_staged
    assert runner.log_path.is_file()  # kept on the node, and the report says where
    assert str(runner.log_path) in result.error_message


def _start_in_thread(runner: JobRunner) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(runner.run()))
    thread.start()
    return thread, out


def test_kill_reaches_the_whole_process_group(tmp_path, outdir):
    pidfile = tmp_path / "pids"
    runner = JobRunner(
        job_message(outdir, "spawn", str(pidfile)),
        work_root=tmp_path / "work",
        grace_period=5,
        sample_interval=0.05,
    )
    thread, out = _start_in_thread(runner)
    child, grandchild = map(
        int, wait_until(lambda: pidfile.exists() and pidfile.read_text()).split()
    )
    assert psutil.pid_exists(child) and psutil.pid_exists(grandchild)

    runner.kill("cancelled by the user")
    thread.join(10)

    assert not thread.is_alive()
    wait_until(lambda: not psutil.pid_exists(child) and not psutil.pid_exists(grandchild), 5)
    result = out[0]
    assert (result.state, result.error_code) == ("failed", "killed")
    assert "cancelled by the user" in result.error_message
    assert result.exit_code == 128 + 15  # SIGTERM
    assert [o["type"] for o in result.outputs] == ["log"]  # the log is kept


def test_a_kill_is_obeyed_at_once_and_a_short_job_is_seen_ending_at_once(tmp_path, outdir):
    runner = JobRunner(job_message(outdir, "sleep", "30"), work_root=tmp_path / "work")
    thread, out = _start_in_thread(runner)
    wait_until(lambda: runner.pid is not None)
    time.sleep(0.3)  # well into its wait for the exit

    t0 = time.monotonic()
    runner.kill("cancelled")
    thread.join(10)

    assert time.monotonic() - t0 < 0.5  # SIGTERM at once, not at the next look
    assert out[0].error_code == "killed"

    quick = JobRunner(job_message(outdir, executable="/bin/true"), work_root=tmp_path / "w2")
    t0 = time.monotonic()
    assert quick.run().state == "finished"
    assert quick.metrics()["wall_time"] < 0.5


def test_a_job_ignoring_sigterm_gets_sigkill_after_the_grace_period(tmp_path, outdir):
    pidfile = tmp_path / "pid"
    runner = JobRunner(
        job_message(outdir, "ignore-term", str(pidfile)),
        work_root=tmp_path / "work",
        grace_period=0.5,
        sample_interval=0.05,
    )
    thread, out = _start_in_thread(runner)
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))

    t0 = time.monotonic()
    runner.kill("shutdown")
    thread.join(10)
    elapsed = time.monotonic() - t0

    assert not psutil.pid_exists(pid)
    assert elapsed >= 0.5  # it survived SIGTERM for the grace period
    result = out[0]
    assert (result.state, result.error_code, result.exit_code) == ("failed", "killed", 128 + 9)
    assert "SIGKILL" in result.error_message


def test_a_kill_before_the_start_runs_nothing(tmp_path, outdir):
    runner = JobRunner(job_message(outdir, "write", "a=1"), work_root=tmp_path / "work")
    runner.kill("cancelled")
    result = runner.run()

    assert (result.state, result.error_code) == ("failed", "killed")
    assert runner.pid is None
    assert not (outdir / runner.job.job_uuid / "a").exists()


def test_a_fresh_work_dir_per_attempt(tmp_path, outdir):
    job = job_message(outdir, "write", "a=1")
    stale = tmp_path / "work" / "jobs" / f"{job.job_uuid}.0" / "outputs"
    stale.mkdir(parents=True)
    (stale / "left-over").write_text("from a crashed run")

    _, result = run(job, tmp_path)

    assert {o["name"] for o in result.outputs if o["type"] == "output"} == {"a"}


def test_a_short_job_is_measured_by_wait4_without_a_tree_walk(tmp_path, outdir):
    job = job_message(outdir, "write", "a=1")
    runner = JobRunner(job, work_root=tmp_path / "work", sample_interval=30.0)
    result = runner.run()

    assert result.state == "finished"
    # no sample in the job's life: CPU time and peak RSS come from the reaped child's rusage
    assert result.metrics["cpu_time"] > 0 and result.metrics["max_rss_mb"] > 1
    assert result.metrics["rss_mb"] == 0  # nothing left running


def test_a_longer_job_is_sampled_while_it_runs(tmp_path, outdir):
    runner = JobRunner(job_message(outdir, "sleep", "10"), work_root=tmp_path / "work")
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        wait_until(lambda: runner.pid is not None)
        assert runner.metrics()["rss_mb"] == 0  # not at the start: after one interval (1 s)
        wait_until(lambda: runner.metrics()["rss_mb"] > 1, timeout=8)
    finally:
        runner.kill("test over")
        thread.join(10)


@pytest.mark.parametrize("scratch", [False, True])
def test_cleanup_removes_the_work_dir_whatever_the_job_left_in_it(tmp_path, outdir, scratch):
    args = ("write", "a=1") if scratch else ("sleep", "0")
    runner, result = run(job_message(outdir, *args), tmp_path)
    assert result.log_staged
    if scratch:
        (runner.dir / "scratch" / "deep").mkdir(parents=True)
        (runner.dir / "scratch" / "deep" / "tmp.dat").write_text("x")

    runner.cleanup()

    assert not runner.dir.exists()
    assert runner.dir.parent.is_dir()  # jobs/ itself stays
