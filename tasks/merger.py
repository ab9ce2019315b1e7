"""The merger: a task's outputs are merged in groups, level by level, into a tree of merge jobs.

Run inside the finalizer's cycle (:func:`tasks.finalizer.task_finalize`, kicked on commit when a
job of the task becomes final, and by beat), with the task row held ``FOR UPDATE SKIP LOCKED``:
two mergers never group one task at once, and the task never ends while a merge can still be
created (the merger runs first; a merge it creates is an open job). The rules
(docs/lifecycle.md, "Merge jobs"):

- The jobs of level ``L`` (0: map jobs, 1, 2, ...: merge jobs), in id order, are cut into groups
  of ``merge_group_size`` (G). A full group is ready as soon as its G members are final. The
  last, short group is ready only when no more level-``L`` jobs can come (level 0: the input
  dataset is closed and every input file has a job; level ``L > 0``: level ``L - 1`` is complete
  and every group of it is decided) and every other group of the level is decided.
- A ready group whose members all finished becomes ONE merge job of level ``L + 1`` (mode merge,
  the task's ``merge_executable`` / ``merge_args``, device type, rank and retries), ``defined``;
  its input FILE_DAT rows point at the members' output catalogue entries; the members'
  ``parent_job_id`` is set to it (one UPDATE) and their outputs are marked ``intermediate``.
- A member failed for good (failed or cancelled): rule ``partial`` merges the members that
  finished (a group with none contributes nothing); rule ``fail`` creates no merge for the task
  at all and counts the group in ``merge_groups_failed``: the task fails at its end.
- A short last group of ONE job is not merged alone: it joins the next level, at its end.
- A single job at the top with nothing more to come is the root: its output is the final one.
  With ``merge_max_level`` = M > 0 the jobs of level M are the tops (no merge above them).
- A member that has a parent is never grouped again (the grouping is a pure function of the
  jobs' levels, states and parents, so running the merger twice creates nothing twice).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog
from django.utils import timezone

from files.build import NewFile
from files.models import File, FileStatus, FileType
from files.services import files_mark_intermediate
from jobs.build import JobSpec, jobs_build
from jobs.models import FINAL_JOB_STATES, Job, JobState
from tasks.models import MergeOnChildFailure, Task, TaskState
from wms.choices import Mode
from wms.kicks import kick_dispatch

log = structlog.get_logger(__name__)


@dataclass
class _Member:
    id: int
    level: int
    state: str
    parent_id: int | None


# A merge to create: (its level, the group's members, the members whose outputs it reads).
_Planned = tuple[int, list[_Member], list[_Member]]


@dataclass
class MergeResult:
    task_id: int
    created: list[int] = field(default_factory=list)  # the new merge jobs' ids
    blocked: int = 0  # groups with a failed member under rule "fail"
    root_id: int | None = None  # the job whose output is the task's final one, once known


def task_merge_locked(*, task: Task, level0_complete: Any) -> MergeResult:
    """Create the merge jobs that are ready. The caller holds the task row locked and runs in
    a transaction. ``level0_complete`` is called (at most once) to learn whether more map jobs
    can come (the finalizer's "input fully split")."""
    result = MergeResult(task_id=task.pk)
    size = task.merge_group_size
    if task.state != TaskState.RUNNING or size < 2:
        return result
    partial = task.merge_on_child_failure == MergeOnChildFailure.PARTIAL
    by_level: dict[int, list[_Member]] = defaultdict(list)
    level_of: dict[int, int] = {}
    for row in (
        Job.objects.filter(task_id=task.pk)
        .order_by("level", "id")
        .values_list("id", "level", "state", "parent_job_id")
    ):
        by_level[row[1]].append(_Member(*row))
        level_of[row[0]] = row[1]
    planned: list[_Planned] = []
    complete = bool(by_level[0]) and bool(level0_complete())
    carry: list[_Member] = []
    level = 0
    while True:
        members = by_level[level] + carry
        carry = []
        if not members:
            break
        if task.merge_max_level and level >= task.merge_max_level:
            break  # the tops: no merge above the configured level
        if complete and len(members) == 1:
            if members[0].state == JobState.FINISHED:
                result.root_id = members[0].id
            break
        groups = [members[i : i + size] for i in range(0, len(members), size)]
        decided = 0  # groups merged, dead (partial, nothing finished) or carried
        for idx, group in enumerate(groups):
            last = idx == len(groups) - 1
            lone = group[0] if len(group) == 1 and last else None
            if lone and lone.parent_id and level_of.get(lone.parent_id, 0) > level + 1:
                carry = group  # carried up earlier and merged above: still a member up there
                decided += 1
                continue
            if any(m.parent_id is not None for m in group):
                decided += 1  # merged already
                continue
            if len(group) < size and not (last and complete and decided == len(groups) - 1):
                continue  # more members may come, or the other groups are not decided yet
            if any(m.state not in FINAL_JOB_STATES for m in group):
                continue
            done = [m for m in group if m.state == JobState.FINISHED]
            if len(group) == 1:  # the short last group of one: it joins the next level
                if done:
                    carry = group
                    decided += 1
                elif partial:
                    decided += 1
                else:
                    result.blocked += 1
                continue
            if len(done) == len(group) or (partial and done):
                planned.append((level + 1, group, done))
                new = _Member(id=0, level=level + 1, state=JobState.DEFINED, parent_id=None)
                by_level[level + 1].append(new)  # the next level sees it (not final)
                decided += 1
            elif partial:
                decided += 1  # nothing finished in it: the group contributes nothing
            else:
                result.blocked += 1
        complete = complete and decided == len(groups)
        level += 1
    if result.blocked and not partial:
        planned = []  # rule "fail": the tree cannot be completed, nothing more is merged
    if planned:
        result.created = _create_merges(task, planned)
    if task.merge_groups_failed != result.blocked:
        Task.objects.filter(pk=task.pk).update(
            merge_groups_failed=result.blocked, updated_at=timezone.now()
        )
        task.merge_groups_failed = result.blocked
    if result.created:
        log.info(
            "merge_jobs_created",
            task_id=task.pk,
            jobs=len(result.created),
            levels=sorted({lv for lv, _, _ in planned}),
        )

        kick_dispatch()
    elif result.blocked:
        log.warning("merge_groups_blocked", task_id=task.pk, groups=result.blocked)
    return result


def _create_merges(task: Task, planned: list[_Planned]) -> list[int]:
    """One merge job per group, built by ``jobs.build`` (one call per level) with its input
    FILE_DAT rows (the members' ready outputs) and the members as its children; the members'
    outputs are then marked intermediate."""
    done_ids = [m.id for _, _, done in planned for m in done]
    outputs: dict[int | None, list[File]] = defaultdict(list)  # File.job_id is nullable
    for f in File.objects.filter(
        job_id__in=done_ids, type=FileType.OUTPUT, status=FileStatus.READY
    ).order_by("id"):
        outputs[f.job_id].append(f)
    by_level: dict[int, list[tuple[list[_Member], list[_Member]]]] = defaultdict(list)
    for level, group, done in planned:  # planned is in level order already
        by_level[level].append((group, done))
    created: list[int] = []
    for level, groups in by_level.items():
        spec = JobSpec(
            task_id=task.pk,
            executable=task.merge_executable,
            args=task.merge_args,
            rank=task.rank,
            retries=task.max_retries,
            device_type=task.device_type,
            mode=Mode.MERGE,
            level=level,
        )
        inputs = [
            [
                NewFile(
                    file_name=f.file_name,
                    type=FileType.INPUT,
                    size=f.size,
                    status=FileStatus.READY,
                    check_sum=f.check_sum,
                    url=f.url,
                    job_id=None,
                    task_id=task.pk,
                    dataset_id=f.dataset_id,
                    entry_id=f.entry_id,
                )
                for m in done
                for f in outputs[m.id]
            ]
            for _, done in groups
        ]
        created += jobs_build(
            spec=spec, inputs=inputs, children=[[m.id for m in group] for group, _ in groups]
        )
    files_mark_intermediate(job_ids=done_ids)
    return created
