"""Issue 4's end to end: real web app, worker with beat and pilot agents on Postgres + RabbitMQ.

A task over a dataset runs to the end on real pilots; every job finishes exactly once; every
output and log file is registered with size and checksum; CPU jobs run only on CPU pilots and
GPU jobs only on GPU pilots; a failing executable is retried then failed; a pilot killed with
SIGKILL is declared lost and its job runs again on another pilot.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from urllib.parse import unquote, urlparse

import psutil
import pytest

from devtools.demo import demo_inputs_write
from files.dsm import get_dsm
from files.models import DatasetEntry, File, FileType
from jobs.models import AttemptState, Job, JobAttempt, JobState
from pilots.models import PilotState
from tasks.create import task_create
from tests.e2e.conftest import wait_until
from tests.factories import UserFactory
from wms import checksums

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FINAL = (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)


def _dataset(tmp_path: Path, name: str, n: int, *, seed: int = 1000):
    entries, _seeds = demo_inputs_write(
        directory=tmp_path / name, files=n, events=2000, base_seed=seed
    )
    with get_dsm() as dsm:
        info = dsm.register_dataset(name, role="input")
        dsm.register_files(info.uid, entries)
        dsm.close_dataset(info.uid, source="command")
    return info.uid


def _task(owner, uid, tmp_path, label, **kw):
    out = (tmp_path / "outputs" / owner.username / label).resolve().as_uri() + "/"
    return task_create(
        owner=owner,
        name=label,
        executable="wms-payload-map",
        args=kw.pop("args", "--events 2000"),
        data_in_uid=uid,
        data_out_url=out,
        storage_url=out,
        **kw,
    )


def _all_final(task_ids, expected):
    jobs = Job.objects.filter(task_id__in=task_ids)
    return jobs.count() == expected and not jobs.exclude(state__in=FINAL).exists()


def _local(url: str) -> Path:
    return Path(unquote(urlparse(url).path))


def test_a_dataset_runs_to_the_end_on_cpu_and_gpu_pilots(make_stack, tmp_path):
    owner = UserFactory()
    cpu_uid = _dataset(tmp_path, "e2e.cpu", 20)
    gpu_uid = _dataset(tmp_path, "e2e.gpu", 6, seed=5000)
    _stack, out = make_stack(cpu=1, gpu=1)
    cpu = _task(owner, cpu_uid, tmp_path, "cpu")
    gpu = _task(owner, gpu_uid, tmp_path, "gpu", device_type="gpu", files_per_job=2)
    wait_until(
        lambda: _all_final([cpu.pk, gpu.pk], 20 + 3),
        timeout=240,
        what="every job of both tasks to end",
        out=out,
    )
    for task, device, n_jobs in ((cpu, "cpu", 20), (gpu, "gpu", 3)):
        jobs = list(Job.objects.filter(task=task))
        assert len(jobs) == n_jobs
        assert {j.state for j in jobs} == {JobState.FINISHED}, out.text()[-4000:]
        for job in jobs:
            attempts = list(job.attempts.all())
            # finished exactly once: one attempt, finished, on a pilot of the task's device
            assert [(a.number, a.state) for a in attempts] == [(0, AttemptState.FINISHED)]
            assert attempts[0].pilot.device_type == device
            assert job.pilot.device_type == device
            assert job.time_start and job.time_end and job.time_end >= job.time_start
            files = {f.type: f for f in job.files.exclude(type=FileType.INPUT)}
            assert set(files) == {FileType.OUTPUT, FileType.LOG}
            assert job.file_out_id == files[FileType.OUTPUT].id
            assert job.file_log_id == files[FileType.LOG].id
            for f in files.values():
                path = _local(f.url)
                assert path.is_file(), f.url
                assert f.size == path.stat().st_size > 0
                assert f.check_sum == checksums.file_checksum(path)
                entry = DatasetEntry.objects.get(dataset__uid=task.data_out_uid, url=f.url)
                assert (entry.size, entry.check_sum) == (f.size, f.check_sum)
        task.refresh_from_db()
        out_entries = DatasetEntry.objects.filter(dataset__uid=task.data_out_uid)
        assert out_entries.count() == 2 * n_jobs
        assert File.objects.filter(task=task, type=FileType.INPUT).count() == (
            20 if device == "cpu" else 6
        )


def test_a_failing_executable_is_retried_then_failed(make_stack, tmp_path):
    owner = UserFactory()
    uid = _dataset(tmp_path, "e2e.fail", 2)
    _stack, out = make_stack(cpu=1, gpu=0)
    task = _task(owner, uid, tmp_path, "fail", args="--events 100 --fail-rate 1", max_retries=2)
    wait_until(lambda: _all_final([task.pk], 2), timeout=180, what="both jobs to end", out=out)
    for job in Job.objects.filter(task=task):
        assert job.state == JobState.FAILED
        assert job.cur_retry == 2
        attempts = list(job.attempts.order_by("number"))
        assert [(a.number, a.state) for a in attempts] == [
            (0, AttemptState.FAILED),
            (1, AttemptState.FAILED),
            (2, AttemptState.FAILED),
        ]
        assert all(a.exit_code not in (None, 0) and a.error_code for a in attempts)
        # the job went round: defined → queued → running → defined ... → failed
        states = list(job.transitions.values_list("to_state", flat=True))
        assert states.count("running") == 3 and states[-1] == "failed"
        # every attempt's log was kept and registered
        assert job.files.filter(type=FileType.LOG).count() == 3


def _payload_of(job_uuid: str) -> psutil.Process | None:
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("WMS_JOB_UUID") == job_uuid:
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_pilot_killed_mid_job_is_lost_and_its_job_runs_elsewhere(make_stack, tmp_path):
    owner = UserFactory()
    uid = _dataset(tmp_path, "e2e.lost", 1)
    _stack, out = make_stack(cpu=2, gpu=0, env={"WMS_PILOT_LOST_AFTER": "8", "WMS_REAP_EVERY": "2"})
    task = _task(owner, uid, tmp_path, "lost", args="--events 100 --sleep 6", max_retries=2)
    attempt = wait_until(
        lambda: JobAttempt.objects.filter(job__task=task, state=AttemptState.RUNNING).first(),
        timeout=120,
        what="the job to start",
        out=out,
    )
    job = attempt.job
    payload = wait_until(lambda: _payload_of(str(job.uuid)), timeout=30, what="the payload")
    agent = payload.parent()
    while agent is not None and "pilots.agent" not in " ".join(agent.cmdline()):
        agent = agent.parent()
    assert agent is not None, "the payload's pilot process was not found"
    os.kill(agent.pid, signal.SIGKILL)
    # the payload ran in a session of its own: the pilot's guardian kills it (docs/pilot.md)
    wait_until(lambda: not _running(payload), timeout=30, what="the payload to die", out=out)

    wait_until(
        lambda: Job.objects.filter(pk=job.pk, state=JobState.FINISHED).exists(),
        timeout=180,
        what="the job to run again and finish",
        out=out,
    )
    attempts = list(JobAttempt.objects.filter(job=job).order_by("number"))
    assert attempts[0].state == AttemptState.LOST
    assert attempts[0].error_code == "lost_heartbeat"
    assert attempts[-1].state == AttemptState.FINISHED
    assert attempts[-1].pilot_id != attempts[0].pilot_id
    lost_pilot = attempts[0].pilot
    lost_pilot.refresh_from_db()
    assert lost_pilot.state == PilotState.LOST
