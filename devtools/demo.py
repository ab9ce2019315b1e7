"""The demo (``manage.py demo``): a real dataset, two real tasks, checkable results.

:func:`demo_start` writes ``files`` small seed files under ``VAR_DIR/demo/<run>/inputs``,
registers them as an input dataset in the DSM (``file://`` URLs, real sizes, adler32 checksums),
closes the dataset and creates two tasks over it, owned by the demo operator:

- ``cpu``: ``wms-payload-map`` (the Z → ll mass), one input file per job;
- ``gpu``: ``wms-payload-map --process higgs`` (the H → gamma gamma mass) on the GPU queue,
  several input files per job, so fewer and bigger jobs.

:func:`demo_progress` reads the jobs per state; :func:`demo_summary` reads what the tasks
produced and *checks* it: every finished job's ``hist.json`` is read back from its URL, its size
and checksum compared with what the DSM registered, and the histograms merged; the merge must
hold exactly the seeds of the finished jobs' inputs and ``seeds x events`` entries
(docs/demo.md). Task-level completion is not needed: "done" is read from job states.

The writes go through the DSM client and ``tasks.create``; the command stays thin.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import structlog
from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Count

from files.dsm import FileInfo, get_dsm, iter_files
from files.models import File, FileType
from jobs.models import FINAL_JOB_STATES, JobAttempt, JobState
from payloads import histo
from tasks.create import task_create
from tasks.models import Task
from tasks.selectors import tasks_job_counts
from wms import checksums
from wms.choices import DeviceType, TransitionSource

log = structlog.get_logger(__name__)

DEFAULT_FILES = 24
DEFAULT_EVENTS = 50_000
DEFAULT_GPU_FILES_PER_JOB = 4
DEFAULT_BASE_SEED = 20_240_125
MAP_EXECUTABLE = "wms-payload-map"


@dataclass(frozen=True)
class DemoTask:
    label: str  # "cpu" | "gpu"
    task_id: int
    device_type: str
    expected_jobs: int
    output_url: str


@dataclass(frozen=True)
class DemoRun:
    name: str
    directory: Path
    dataset_uid: uuid.UUID
    events: int
    seeds: dict[str, int]  # input file name -> seed
    tasks: tuple[DemoTask, ...]

    @property
    def task_ids(self) -> list[int]:
        return [t.task_id for t in self.tasks]


@dataclass(frozen=True)
class TaskProgress:
    task: DemoTask
    state: str
    counts: dict[str, int]

    @property
    def jobs(self) -> int:
        return sum(self.counts.values())

    @property
    def final(self) -> int:
        return sum(self.counts[s] for s in FINAL_JOB_STATES)

    @property
    def done(self) -> bool:
        """Every job the task will have exists and is final."""
        return self.jobs >= self.task.expected_jobs and self.final == self.jobs

    def line(self) -> str:
        shown = " ".join(f"{s} {self.counts[s]}" for s in JobState.values)
        return (
            f"{self.task.label} task {self.task.task_id} [{self.state}]: "
            f"{self.final}/{self.task.expected_jobs} final | {shown}"
        )


@dataclass(frozen=True)
class OutputCheck:
    name: str
    size: int
    check_sum: str
    url: str
    problem: str = ""  # "" when the file on disk matches what was registered
    verified: bool = False


@dataclass
class TaskSummary:
    progress: TaskProgress
    output_dataset_uid: str = ""
    registered: list[FileInfo] = field(default_factory=list)  # the output dataset's files
    outputs: list[OutputCheck] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # attempts per state
    merged_path: Path | None = None
    merged: histo.Histogram | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        c = self.progress.counts
        return (
            self.progress.done and c[JobState.FINISHED] == self.progress.jobs and not self.problems
        )


# --- start --------------------------------------------------------------------------------------


def demo_inputs_write(
    *, directory: Path, files: int, events: int, base_seed: int
) -> tuple[list[dict[str, object]], dict[str, int]]:
    """Write the seed files; return their catalogue entries (name, size, adler32 checksum,
    ``file://`` URL) and the seed of each file name."""
    directory.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, object]] = []
    seeds: dict[str, int] = {}
    for i in range(files):
        seed = base_seed + i
        path = directory / f"seed-{i:04d}.json"
        path.write_text(histo.seed_file_text(seed, events, "z"), encoding="utf-8")
        entries.append(
            {
                "name": path.name,
                "size": path.stat().st_size,
                "check_sum": checksums.file_checksum(path, "adler32"),
                "url": path.resolve().as_uri(),
            }
        )
        seeds[path.name] = seed
    return entries, seeds


def demo_start(
    *,
    owner: User,
    files: int = DEFAULT_FILES,
    events: int = DEFAULT_EVENTS,
    gpu_files_per_job: int = DEFAULT_GPU_FILES_PER_JOB,
    base_seed: int = DEFAULT_BASE_SEED,
    cpu_args: str = "",
    gpu_args: str = "--process higgs",
    gpu: bool = True,
    max_retries: int = 3,
    var_dir: Path | None = None,
) -> DemoRun:
    """Register the demo's input dataset, close it and create the demo's tasks over it."""
    if files < 1:
        raise ValueError("the demo needs at least one input file")
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    directory = Path(var_dir or settings.VAR_DIR) / "demo" / name
    entries, seeds = demo_inputs_write(
        directory=directory / "inputs", files=files, events=events, base_seed=base_seed
    )
    with get_dsm() as dsm:
        info = dsm.register_dataset(
            f"{name}-inputs", role="input", location=(directory / "inputs").resolve().as_uri()
        )
        dsm.register_files(info.uid, entries)
        dsm.close_dataset(info.uid, source=TransitionSource.COMMAND, reason="demo inputs complete")
    log.info("demo_inputs_registered", dataset_uid=str(info.uid), files=files, run=name)

    specs = [("cpu", DeviceType.CPU, 1, cpu_args)]
    if gpu:
        specs.append(("gpu", DeviceType.GPU, gpu_files_per_job, gpu_args))
    tasks = []
    for label, device, per_job, args in specs:
        # the outputs go to the task's own place in its owner's folder of WMS_OUTPUT_ROOT
        task = task_create(
            owner=owner,
            name=f"{name} {label}",
            executable=MAP_EXECUTABLE,
            args=args,
            data_in_uid=info.uid,
            device_type=device,
            files_per_job=per_job,
            max_retries=max_retries,
        )
        tasks.append(
            DemoTask(
                label=label,
                task_id=task.pk,
                device_type=device,
                expected_jobs=math.ceil(files / per_job),
                output_url=task.data_out_url,
            )
        )
    log.info("demo_started", run=name, task_ids=[t.task_id for t in tasks])
    return DemoRun(
        name=name,
        directory=directory,
        dataset_uid=info.uid,
        events=events,
        seeds=seeds,
        tasks=tuple(tasks),
    )


# --- progress and summary (reads) ---------------------------------------------------------------


def demo_progress(run: DemoRun) -> list[TaskProgress]:
    counts = tasks_job_counts(task_ids=run.task_ids)
    states = dict(Task.objects.filter(pk__in=run.task_ids).values_list("pk", "state"))
    return [
        TaskProgress(task=t, state=states[t.task_id], counts=counts[t.task_id]) for t in run.tasks
    ]


def demo_done(progress: Iterable[TaskProgress]) -> bool:
    return all(p.done for p in progress)


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    if url.startswith("/"):
        return Path(url)
    return None


def _check_output(name: str, size: int, check_sum: str, url: str) -> OutputCheck:
    path = _local_path(url)
    if path is None:
        return OutputCheck(name, size, check_sum, url)  # not readable from here: not verified
    if not path.is_file():
        return OutputCheck(name, size, check_sum, url, problem=f"{path} does not exist")
    real_size = path.stat().st_size
    if real_size != size:
        return OutputCheck(
            name, size, check_sum, url, problem=f"size {real_size} on disk, {size} registered"
        )
    if check_sum:
        algorithm = check_sum.split(":", 1)[0]
        real = checksums.file_checksum(path, algorithm)
        if real != check_sum:
            return OutputCheck(
                name,
                size,
                check_sum,
                url,
                problem=f"checksum {real} on disk, {check_sum} registered",
            )
    return OutputCheck(name, size, check_sum, url, verified=True)


def _is_histogram(name: str, url: str) -> bool:
    return name.endswith(histo.OUTPUT_NAME) or url.endswith(histo.OUTPUT_NAME)


def demo_task_summary(run: DemoRun, progress: TaskProgress) -> TaskSummary:
    """What one task produced, checked against what its inputs say it must hold."""
    summary = TaskSummary(progress=progress)
    task = Task.objects.only("data_out_uid").get(pk=progress.task.task_id)
    summary.attempts = dict(
        JobAttempt.objects.filter(job__task_id=task.pk)
        .values_list("state")
        .annotate(n=Count("id"))
        .order_by()
    )
    outputs = list(
        File.objects.filter(
            job__task_id=task.pk, type=FileType.OUTPUT, job__state=JobState.FINISHED
        )
        .order_by("id")
        .values_list("file_name", "size", "check_sum", "url")
    )
    if task.data_out_uid:
        summary.output_dataset_uid = str(task.data_out_uid)
        with get_dsm() as dsm:
            summary.registered = list(iter_files(dsm, task.data_out_uid))
        # FILE_DAT's name is the name in the DSM (jobs.outputs registers it so)
        by_name = {f.name: f for f in summary.registered}
        for name, size, check_sum, _url in outputs:
            entry = by_name.get(name)
            if entry is None:
                summary.problems.append(f"output {name} is not in the output dataset")
            elif (entry.size, entry.check_sum) != (size, check_sum):
                summary.problems.append(
                    f"output {name}: {entry.size} B {entry.check_sum} in the output dataset, "
                    f"{size} B {check_sum} in FILE_DAT"
                )
    summary.outputs = [_check_output(*row) for row in outputs]
    summary.problems.extend(f"{o.name}: {o.problem}" for o in summary.outputs if o.problem)

    finished = progress.counts[JobState.FINISHED]
    hists = [o for o in summary.outputs if _is_histogram(o.name, o.url)]
    if len(hists) < finished:
        summary.problems.append(f"{finished} finished jobs but {len(hists)} histogram outputs")
    if hists and all(o.verified for o in hists):
        try:
            merged = histo.merge_files(_local_path(o.url) for o in hists)  # type: ignore[misc]
        except (OSError, histo.HistogramError) as exc:
            summary.problems.append(f"cannot merge the outputs: {exc}")
        else:
            summary.merged = merged
            summary.merged_path = histo.dump(
                merged, run.directory / f"merged-{progress.task.label}.json"
            )
            input_names = File.objects.filter(
                job__task_id=task.pk, type=FileType.INPUT, job__state=JobState.FINISHED
            ).values_list("file_name", flat=True)
            expected_seeds = sorted(run.seeds[n] for n in input_names if n in run.seeds)
            if merged.seeds != expected_seeds:
                summary.problems.append(
                    f"merged histogram holds seeds {merged.seeds[:5]}..., "
                    f"the finished jobs read {expected_seeds[:5]}..."
                )
            if merged.entries != len(expected_seeds) * run.events:
                summary.problems.append(
                    f"merged histogram holds {merged.entries} events, "
                    f"expected {len(expected_seeds)} x {run.events}"
                )
    return summary


def demo_summary(run: DemoRun) -> list[TaskSummary]:
    return [demo_task_summary(run, p) for p in demo_progress(run)]


def sparkline(hist: histo.Histogram, width: int = 60) -> str:
    """The histogram as one line of block characters (the peak is visible at a glance)."""
    blocks = " ▁▂▃▄▅▆▇█"
    values = hist.sumw
    if len(values) > width:
        step = math.ceil(len(values) / width)
        values = [sum(values[i : i + step]) for i in range(0, len(values), step)]
    top = max(values) or 1.0
    return "".join(blocks[round(v / top * (len(blocks) - 1))] for v in values)
