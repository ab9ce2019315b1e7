"""Issue 5's merge end to end: a map task with merge group size 3 over 10 seed files, on the real
web app, worker with beat and a pilot agent (Postgres + RabbitMQ), runs to one merged output.

The tree is checked (every map job has a parent, the levels reduce to one root), the root's
histogram equals the merge of every map output read back from its file:// URL and the merge of
the histograms expected from the seeds, the task is finished, its output dataset closed, and the
consumed outputs are marked intermediate.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from devtools.demo import demo_inputs_write
from files.dsm import get_dsm
from files.models import Dataset, DatasetState, File, FileType
from jobs.models import Job, JobState
from payloads import histo
from tasks.create import task_create
from tasks.models import Task, TaskState
from tests.e2e.conftest import wait_until
from tests.factories import UserFactory
from wms.choices import Mode

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

EVENTS = 500


def _local(url: str) -> Path:
    return Path(unquote(urlparse(url).path))


def test_a_map_task_merged_in_groups_of_three_ends_with_one_merged_output(make_stack, tmp_path):
    owner = UserFactory()
    entries, seeds = demo_inputs_write(
        directory=tmp_path / "merge-inputs", files=10, events=EVENTS, base_seed=7000
    )
    with get_dsm() as dsm:
        info = dsm.register_dataset("e2e.merge", role="input")
        dsm.register_files(info.uid, entries)
        dsm.close_dataset(info.uid, source="command")
    _stack, out = make_stack(cpu=1, gpu=0, slots=2, env={"WMS_FINALIZE_EVERY": "2"})
    out_url = (tmp_path / "outputs" / owner.username / "run").resolve().as_uri() + "/"
    task = task_create(
        owner=owner,
        name="merge",
        executable="wms-payload-map",
        args=f"--events {EVENTS}",
        data_in_uid=info.uid,
        data_out_url=out_url,
        storage_url=out_url,
        merge_group_size=3,
    )

    wait_until(
        # the finalizer claims output_closed_at in its transaction and closes the output
        # dataset after that commits: both are awaited
        lambda: (
            Task.objects.filter(pk=task.pk, output_closed_at__isnull=False).exists()
            and Dataset.objects.filter(uid=task.data_out_uid, state=DatasetState.CLOSED).exists()
        ),
        timeout=300,
        what="the task to end and its output dataset to close",
        out=out,
    )
    task.refresh_from_db()
    assert task.state == TaskState.FINISHED, out.text()[-4000:]
    assert Dataset.objects.get(uid=task.data_out_uid).state == DatasetState.CLOSED
    jobs = list(Job.objects.filter(task=task).order_by("level", "id"))
    assert {j.state for j in jobs} == {JobState.FINISHED}

    # The tree: 10 map jobs; level 1: 3 merges of 3 (the tenth is not merged alone);
    # level 2: one merge of the three; level 3: the root, over it and the tenth map job.
    maps = [j for j in jobs if j.level == 0]
    by_level = {lv: [j for j in jobs if j.level == lv] for lv in {j.level for j in jobs}}
    assert {lv: len(js) for lv, js in by_level.items()} == {0: 10, 1: 3, 2: 1, 3: 1}
    assert all(j.mode == Mode.MAP for j in maps)
    assert all(j.mode == Mode.MERGE for j in jobs if j.level)
    assert all(j.parent_job_id is not None for j in maps)
    [root] = [j for j in jobs if j.parent_job_id is None]
    assert root.level == 3
    for job in jobs:
        if job.parent_job_id is not None:
            assert job.parent_job.level > job.level
    assert task.jobs_finished == 15

    # The content: the root's histogram is the merge of all the map outputs and of the
    # histograms the seeds give.
    map_hists = [histo.load(_local(j.file_out.url)) for j in maps]
    root_hist = histo.load(_local(root.file_out.url))
    assert root_hist == histo.merge(map_hists)
    expected = histo.merge(histo.generate([(seed, EVENTS)]) for seed in seeds.values())
    assert root_hist == expected
    assert root_hist.jobs == 10 and sorted(root_hist.seeds) == sorted(seeds.values())

    # Intermediate outputs: every output but the root's.
    outputs = File.objects.filter(task=task, type=FileType.OUTPUT, status="ready")
    assert outputs.count() == 15
    assert list(outputs.filter(intermediate=False).values_list("job_id", flat=True)) == [root.pk]
    # Each merge read exactly its children's outputs.
    for merge in (j for j in jobs if j.level):
        inputs = sorted(File.objects.filter(job=merge, type=FileType.INPUT).values_list("url"))
        kids = sorted((k.file_out.url,) for k in Job.objects.filter(parent_job=merge))
        assert inputs == kids
