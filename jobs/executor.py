"""The executor: ``defined`` jobs of enabled tasks become messages on the device queues.

A dispatch cycle, per device type, repeats until nothing is left (or a bound is hit):

1. **claim** (one transaction): ``SELECT ... FOR UPDATE SKIP LOCKED`` a batch of ``defined``
   jobs of running tasks with the executor on, highest rank first, then oldest; move them to
   ``queued`` with ONE UPDATE (and one bulk insert of transition rows); read what their
   messages need; commit. The claim is durable before anything is published.
2. **publish** the batch on one channel with publisher confirms.
3. If publishing failed, the batch goes back ``queued → defined`` (it will be claimed again).
   If the process died between 1 and 2, the reconciler publishes jobs that stayed ``queued``
   too long without a start. Either way nothing is lost; a duplicate message is harmless
   because a pilot's start is an atomic claim.

Backpressure: a queue already holding ``WMS_QUEUE_MAX_DEPTH`` ready messages gets no more, so
queues stay short and the order by rank is decided here, at claim time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from files.models import File, FileType
from jobs.models import Job, JobState, task_model
from wms import bus
from wms.choices import DeviceType, TaskState, TransitionSource
from wms.contract import InputFile, JobMessage
from wms.exceptions import BrokerError
from wms.statemachine import apply_transition_bulk
from wms.switches import service_tick, switch_enabled

log = structlog.get_logger(__name__)

DISPATCHABLE_TASK_STATES = (TaskState.DEFINED, TaskState.RUNNING)


@dataclass
class DispatchResult:
    published: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failed: int = 0
    throttled: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.published.values())


MESSAGE_COLUMNS = (
    "id",
    "uuid",
    "cur_retry",
    "task_id",
    "executable",
    "args",
    "device_type",
    "mode",
    "rank",
)


def build_messages(
    job_ids: list[int],
    *,
    jobs: list[dict] | None = None,
    tasks: Mapping[int, Mapping[str, Any]] | None = None,
) -> list[JobMessage]:
    """The job messages of these jobs: three queries whatever their number (two when the
    caller already read the jobs' ``MESSAGE_COLUMNS``, in the order wanted, as ``jobs``; one
    when it also read their tasks' ``data_out_url`` and ``data_out_uid``, by task id, as
    ``tasks``)."""
    if jobs is None:
        jobs = list(
            Job.objects.filter(pk__in=job_ids).order_by("-rank", "id").values(*MESSAGE_COLUMNS)
        )
    if tasks is None:
        tasks = {
            t["id"]: t
            for t in task_model()
            .objects.filter(pk__in={j["task_id"] for j in jobs})
            .values("id", "data_out_url", "data_out_uid")
        }
    inputs: dict[int, list[InputFile]] = defaultdict(list)
    for f in (
        File.objects.filter(job_id__in=job_ids, type=FileType.INPUT)
        .order_by("id")
        .values("job_id", "file_name", "url", "size", "check_sum", "dataset__uid")
    ):
        inputs[f["job_id"]].append(
            InputFile(
                name=f["file_name"],
                dataset_uid=str(f["dataset__uid"] or ""),
                url=f["url"],
                size=f["size"],
                check_sum=f["check_sum"],
            )
        )
    server_url = settings.WMS_SERVER_URL
    return [
        JobMessage(
            job_uuid=str(j["uuid"]),
            attempt=j["cur_retry"],
            task_id=j["task_id"],
            executable=j["executable"],
            args=j["args"],
            device_type=j["device_type"],
            mode=j["mode"],
            inputs=inputs[j["id"]],
            output_url=tasks[j["task_id"]]["data_out_url"],
            output_dataset_uid=str(tasks[j["task_id"]]["data_out_uid"] or ""),
            server_url=server_url,
            rank=j["rank"],
        )
        for j in jobs
    ]


@transaction.atomic
def _claim(device_type: str, limit: int) -> tuple[list[int], list[JobMessage]]:
    ids = list(
        Job.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(
            state=JobState.DEFINED,
            device_type=device_type,
            task__state__in=DISPATCHABLE_TASK_STATES,
            task__executor_enabled=True,
        )
        .order_by("-rank", "id")
        .values_list("id", flat=True)[:limit]
    )
    if not ids:
        return [], []
    moved = apply_transition_bulk(
        Job,
        ids,
        JobState.QUEUED,
        from_state=JobState.DEFINED,
        source=TransitionSource.EXECUTOR,
        reason="dispatched",
        locked=True,
    )
    return moved, build_messages(moved)


@transaction.atomic
def _unclaim(job_ids: list[int], reason: str) -> int:
    held = list(
        Job.objects.select_for_update(skip_locked=True)
        .filter(pk__in=job_ids, state=JobState.QUEUED)
        .values_list("id", flat=True)
    )
    return len(
        apply_transition_bulk(
            Job,
            held,
            JobState.DEFINED,
            from_state=JobState.QUEUED,
            source=TransitionSource.EXECUTOR,
            reason=reason,
            locked=True,
        )
    )


@transaction.atomic
def unqueue_task(task_id: int, *, source: str, reason: str) -> int:
    """A task was paused: its ``queued`` jobs go back to ``defined`` (set-based), so the
    messages already on the broker find them not queued and start nothing; the resume
    dispatches them again. A job locked at that moment (a start or a claim under way) is
    skipped: a start that wins is a start before the pause, and a claim that commits after
    it is refused at the pilot's start (``task_paused``), which puts the job back too."""
    ids = list(
        Job.objects.select_for_update(skip_locked=True)
        .filter(task_id=task_id, state=JobState.QUEUED)
        .values_list("id", flat=True)
    )
    if not ids:
        return 0
    moved = apply_transition_bulk(
        Job,
        ids,
        JobState.DEFINED,
        from_state=JobState.QUEUED,
        source=source,
        reason=reason,
        locked=True,
    )
    log.info("task_jobs_unqueued", task_id=task_id, jobs=len(moved))
    return len(moved)


def _room(device_type: str) -> int:
    limit = settings.WMS_DISPATCH_MAX_PER_RUN
    max_depth = settings.WMS_QUEUE_MAX_DEPTH
    if max_depth > 0:
        limit = min(limit, max_depth - bus.queue_depth(device_type))
    return max(0, limit)


# Publishing runs in one long-lived thread (its own broker connection, see wms.bus), so that
# the next batch is claimed in the database while the previous one is being published and
# confirmed: the two halves overlap instead of adding up.
_publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wms-publish")


def _dispatch_device(device_type: str, room: int, result: DispatchResult) -> None:
    in_flight: tuple[list[int], Future] | None = None

    def settle(batch: tuple[list[int], Future]) -> bool:
        ids, future = batch
        try:
            future.result()
        except BrokerError as exc:
            back = _unclaim(ids, reason=f"publish failed: {exc.detail}")
            result.failed += len(ids)
            log.warning(
                "dispatch_publish_failed",
                device_type=device_type,
                jobs=len(ids),
                returned=back,
                detail=str(exc.detail),
            )
            return False
        result.published[device_type] += len(ids)
        return True

    while room > 0:
        ids, messages = _claim(device_type, min(settings.WMS_DISPATCH_BATCH, room))
        if in_flight is not None and not settle(in_flight):
            in_flight = None
            if ids:  # claimed while the previous batch failed: give it back too
                _unclaim(ids, reason="publish of the previous batch failed")
                result.failed += len(ids)
            break
        in_flight = None
        if not ids:
            break
        in_flight = (ids, _publisher.submit(bus.publish_jobs, messages))
        room -= len(ids)
    if in_flight is not None:
        settle(in_flight)


def dispatch(
    *, device_types: tuple[str, ...] = tuple(DeviceType.values), beat: bool = False
) -> DispatchResult:
    """One executor cycle: claim, publish, repeat per device type until empty or full."""
    result = DispatchResult()
    if beat and not service_tick("executor", min_interval=settings.WMS_DISPATCH_EVERY / 2):
        return result
    if not switch_enabled("executor"):
        return result
    for device_type in device_types:
        try:
            room = _room(device_type)
        except BrokerError as exc:
            log.warning("dispatch_broker_unavailable", device_type=device_type, detail=str(exc))
            continue
        if room == 0:
            result.throttled.append(device_type)
            continue
        _dispatch_device(device_type, room, result)
        if result.published[device_type]:
            log.info("jobs_dispatched", device_type=device_type, jobs=result.published[device_type])
    return result


def republish_stale(*, older_than: float | None = None, limit: int = 10_000) -> int:
    """Publish again the jobs ``queued`` for longer than ``older_than`` seconds without a start.

    Their messages were lost (a crash between claim and publish, a purged queue, a broker that
    lost a non-replicated queue). Their ``state_changed_at`` is reset, so each is republished
    once per timeout; a duplicate is dropped by the pilot's atomic start.
    """
    older_than = settings.WMS_QUEUED_REPUBLISH_AFTER if older_than is None else older_than
    cutoff = timezone.now() - timedelta(seconds=older_than)
    with transaction.atomic():
        ids = list(
            Job.objects.select_for_update(skip_locked=True)
            .filter(state=JobState.QUEUED, state_changed_at__lt=cutoff)
            .order_by("state_changed_at")
            .values_list("id", flat=True)[:limit]
        )
        if not ids:
            return 0
        messages = build_messages(ids)
        Job.objects.filter(pk__in=ids, state=JobState.QUEUED).update(
            state_changed_at=timezone.now(), updated_at=timezone.now()
        )
    try:
        bus.publish_jobs(messages)
    except BrokerError as exc:
        # The jobs stay queued with a fresh timestamp; the next timeout retries them.
        log.warning("republish_failed", jobs=len(ids), detail=str(exc.detail))
        return 0
    log.info("jobs_republished", jobs=len(ids), older_than=older_than)
    return len(ids)
