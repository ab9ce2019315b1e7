"""The demo's services (devtools/demo.py) and the accounts ``manage.py up`` makes (wms/services.py).

The demo's jobs are run here by calling the map payload in-process, as a pilot would run it, so
the summary's checks (outputs read back, checksums, merged seeds and events) meet real files.
"""

from __future__ import annotations

import json
from collections.abc import Collection

import pytest
from django.contrib.auth import get_user_model

from devtools import demo
from devtools.services import demo_operator_ensure
from files.dsm import get_dsm
from files.models import Dataset, DatasetEntry, DatasetState, File, FileStatus, FileType
from files.services import file_create
from jobs.models import Job, JobState
from payloads import histo, runtime
from pilots.services import pilot_registrar_ensure
from tasks.models import Task
from tasks.splitter import task_split
from tests.factories import JobAttemptFactory
from wms import checksums
from wms.models import ApiToken
from wms.services import api_token_hash

pytestmark = pytest.mark.django_db


def test_pilot_registrar_gets_a_hashed_token_and_may_add_pilots_only():
    key = pilot_registrar_ensure()

    user = get_user_model().objects.get(username="pilot-registrar")
    token = ApiToken.objects.get(user=user)
    assert token.key_hash == api_token_hash(key) and key not in token.key_hash
    assert token.is_active()
    other = pilot_registrar_ensure()  # another site's: both work
    assert other != key and ApiToken.objects.filter(user=user, revoked_at=None).count() == 2
    assert user.has_perm("pilots.add_pilot")
    assert not user.is_staff and not user.is_superuser
    assert not user.has_usable_password()
    assert not user.has_perm("tasks.add_task")


def test_manage_up_replaces_the_token_of_its_local_pilots():
    first = pilot_registrar_ensure(label="local pilots", replace=True)
    site = pilot_registrar_ensure()
    second = pilot_registrar_ensure(label="local pilots", replace=True)

    hashes = {t.key_hash: t for t in ApiToken.objects.all()}
    assert hashes[api_token_hash(first)].revoked_at is not None
    assert hashes[api_token_hash(second)].is_active()
    assert hashes[api_token_hash(site)].is_active()  # another name: untouched


def test_demo_operator_is_one_plain_account():
    first = demo_operator_ensure()
    assert demo_operator_ensure().pk == first.pk
    assert not first.is_staff and first.is_active


@pytest.fixture
def run(tmp_path, settings):
    settings.WMS_OUTPUT_ROOT = tmp_path.as_uri()  # the outputs written below are under it
    return demo.demo_start(
        owner=demo_operator_ensure(), files=6, events=200, gpu_files_per_job=4, var_dir=tmp_path
    )


def test_demo_start_registers_real_inputs_and_two_tasks(run, tmp_path):
    ds = Dataset.objects.get(uid=run.dataset_uid)
    assert ds.state == DatasetState.CLOSED and ds.file_count == 6
    for entry in DatasetEntry.objects.filter(dataset=ds):
        path = run.directory / "inputs" / entry.name
        assert entry.url == path.as_uri()
        assert entry.size == path.stat().st_size > 0
        assert entry.check_sum == checksums.file_checksum(path, "adler32")
        assert histo.read_seed_file(path).seed == run.seeds[entry.name]
    assert str(run.directory).startswith(str(tmp_path / "demo"))

    cpu, gpu = (Task.objects.get(pk=t.task_id) for t in run.tasks)
    assert (cpu.device_type, cpu.files_per_job, cpu.executable) == ("cpu", 1, "wms-payload-map")
    assert (gpu.device_type, gpu.files_per_job, gpu.args) == ("gpu", 4, "--process higgs")
    assert {cpu.owner.username, gpu.owner.username} == {"demo"}
    assert [t.expected_jobs for t in run.tasks] == [6, 2]  # 6 files, 4 per GPU job: 4 + 2


def run_jobs_like_a_pilot(run: demo.DemoRun, tmp_path, *, fail: Collection[int] = frozenset()):
    """Split the tasks, then run every job's payload and record it finished with its output."""
    for t in run.tasks:
        task_split(task_id=t.task_id)
    for job in Job.objects.filter(task_id__in=run.task_ids).order_by("id"):
        if job.pk in fail:
            Job.objects.filter(pk=job.pk).update(state=JobState.FAILED)
            continue
        inputs = job.files.filter(type=FileType.INPUT).order_by("id")
        out = tmp_path / "work" / str(job.uuid)
        env = {
            runtime.INPUT_FILES: json.dumps([f.url for f in inputs]),
            runtime.OUTPUT_DIR: str(out),
        }
        assert histo.map_main(job.args.split(), env) == 0
        path = out / "hist.json"
        spec = {
            "name": f"{job.uuid}/hist.json",  # as jobs.outputs names a finished output
            "size": path.stat().st_size,
            "check_sum": checksums.file_checksum(path),
            "url": path.as_uri(),
        }
        out_uid = job.task.data_out_uid
        assert out_uid is not None  # task_create registered the output dataset
        with get_dsm() as dsm:
            dsm.register_files(out_uid, [spec])
        file_create(
            file_name=spec["name"],
            type=FileType.OUTPUT,
            job_id=job.pk,
            task_id=job.task_id,
            size=spec["size"],
            check_sum=spec["check_sum"],
            status=FileStatus.READY,
            url=spec["url"],
        )
        JobAttemptFactory(job=job, number=0, state="finished")
        Job.objects.filter(pk=job.pk).update(state=JobState.FINISHED)


def test_progress_counts_jobs_and_done_needs_every_expected_job_final(run, tmp_path):
    before = demo.demo_progress(run)
    assert [p.jobs for p in before] == [0, 0] and not demo.demo_done(before)

    run_jobs_like_a_pilot(run, tmp_path)

    after = demo.demo_progress(run)
    assert [p.counts["finished"] for p in after] == [6, 2]
    assert demo.demo_done(after)
    assert "6/6 final" in after[0].line()


def test_summary_checks_outputs_and_the_merged_histogram(run, tmp_path):
    run_jobs_like_a_pilot(run, tmp_path)

    cpu, gpu = demo.demo_summary(run)

    assert cpu.ok and gpu.ok, cpu.problems + gpu.problems
    assert all(o.verified for o in cpu.outputs) and len(cpu.outputs) == 6
    assert len(cpu.registered) == 6 and cpu.output_dataset_uid
    assert cpu.attempts == {"finished": 6} and gpu.attempts == {"finished": 2}
    assert cpu.merged.seeds == sorted(run.seeds.values())
    assert cpu.merged.entries == 6 * 200 and cpu.merged.jobs == 6
    assert gpu.merged.observable == "m_gg" and gpu.merged.jobs == 2
    assert histo.load(cpu.merged_path) == cpu.merged
    assert len(demo.sparkline(cpu.merged)) == 60


def test_summary_finds_a_tampered_output(run, tmp_path):
    run_jobs_like_a_pilot(run, tmp_path)
    victim = Job.objects.filter(task_id=run.tasks[0].task_id).order_by("id").first()
    path = tmp_path / "work" / str(victim.uuid) / "hist.json"
    path.write_text(path.read_text().replace('"jobs":1', '"jobs":2'))

    cpu, gpu = demo.demo_summary(run)

    assert not cpu.ok and gpu.ok
    assert any("checksum" in p for p in cpu.problems)


def test_summary_finds_an_output_missing_from_the_output_dataset(run, tmp_path):
    run_jobs_like_a_pilot(run, tmp_path)
    gpu_job = Job.objects.filter(task_id=run.tasks[1].task_id).order_by("id").first()
    File.objects.filter(job=gpu_job, type=FileType.OUTPUT).update(file_name="elsewhere.json")

    cpu, gpu = demo.demo_summary(run)

    assert cpu.ok and not gpu.ok
    assert gpu.problems == ["output elsewhere.json is not in the output dataset"]


def test_summary_is_not_ok_when_a_job_failed(run, tmp_path):
    for t in run.tasks:
        task_split(task_id=t.task_id)
    first_cpu_job = (
        Job.objects.filter(task_id=run.tasks[0].task_id).order_by("id").values_list("pk", flat=True)
    )[0]
    run_jobs_like_a_pilot(run, tmp_path, fail={first_cpu_job})

    cpu, gpu = demo.demo_summary(run)

    assert cpu.progress.done and not cpu.ok  # every job final, one failed
    assert cpu.progress.counts["failed"] == 1 and gpu.ok
    assert cpu.merged.entries == 5 * 200  # the merge holds exactly the finished jobs' seeds
