"""Lost attempts given back to their pilot (docs/lifecycle.md, "Reconciliation").

The reaper ends a silent pilot's attempts as ``lost``; when the pilot is heard from again, an
attempt whose job has not started a newer one (``defined`` or ``queued`` with
``cur_retry = attempt + 1``) is **reclaimed**: the job goes back to ``running`` with this pilot
and ``cur_retry = attempt``, the attempt row back to ``running`` (a queued message of the newer
attempt is then refused at start as stale). The pilot's heartbeat asks for it
(``pilots.reconcile``), and so does a final report of such an attempt that reaches the server
first (:func:`attempts_reclaim_reported`, from ``jobs.reports.job_events_apply``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import structlog
from django.db.models import F
from django.utils import timezone

from jobs.models import AttemptState, Job, JobAttempt, JobState
from wms.contract import StatusEvent
from wms.statemachine import apply_transition_by_state

log = structlog.get_logger(__name__)

RECLAIM_REASON = "reclaimed: the pilot came back"
# A lost attempt is reclaimed only while its job waits for the next attempt in these states;
# a held job waits for a person, a cancelled or final one is over: the pilot gets a kill.
RECLAIMABLE_JOB_STATES = (JobState.DEFINED, JobState.QUEUED)


def attempts_reclaim_reported(events: Sequence[StatusEvent]) -> int:
    """Final reports of lost attempts, sent by their own pilot before its heartbeat said it was
    back (the spool's sender and the heartbeat are two threads; either may come first): the
    attempts are reclaimed first, when their job has not started again, so the report is
    applied to them instead of being ignored and the job run again. Called by
    ``jobs.reports.job_events_apply`` in its transaction; one query when no attempt is found.
    """
    finals = {(ev.job_uuid, ev.attempt, ev.pilot_id) for ev in events if ev.state != "running"}
    if not finals:
        return 0
    found: dict[int, list[tuple[int, int, int]]] = {}
    for pk, job_id, number, pilot_id, uid in JobAttempt.objects.filter(
        state=AttemptState.LOST,
        job__uuid__in={u for u, _, _ in finals},
        job__state__in=RECLAIMABLE_JOB_STATES,
        job__cur_retry=F("number") + 1,
    ).values_list("pk", "job_id", "number", "pilot_id", "job__uuid"):
        if (str(uid), number, pilot_id) in finals:
            found.setdefault(pilot_id, []).append((job_id, number, pk))
    now = timezone.now()
    return sum(
        attempts_reclaim(pilot_id, items, now)[0] for pilot_id, items in sorted(found.items())
    )


def attempts_reclaim(
    pilot_id: int, reclaim: list[tuple[int, int, int]], now: datetime
) -> tuple[int, list[tuple[int, int]]]:
    """Give lost attempts back to their pilot: jobs locked and checked again, then one UPDATE
    per job state and one for the attempts. Returns (reclaimed, refused (job id, number))."""
    if not reclaim:
        return 0, []
    wanted = {job_id: (number, pk) for job_id, number, pk in reclaim}
    rows = []
    refused = []
    for job_id, state, cur_retry in (
        Job.objects.select_for_update(of=("self",))
        .filter(pk__in=list(wanted))
        .order_by("id")
        .values_list("id", "state", "cur_retry")
    ):
        number = wanted[job_id][0]
        if state in RECLAIMABLE_JOB_STATES and cur_retry == number + 1:
            rows.append((job_id, state))
        else:
            refused.append((job_id, number))
    if not rows:
        return 0, refused
    by_state = apply_transition_by_state(
        Job,
        rows,
        JobState.RUNNING,
        source=f"pilot:{pilot_id}",
        reason=RECLAIM_REASON,
        updates={"cur_retry": F("cur_retry") - 1, "pilot_id": pilot_id, "time_end": None},
    )
    ids = [job_id for pks in by_state.values() for job_id in pks]
    JobAttempt.objects.filter(
        pk__in=[wanted[job_id][1] for job_id in ids], state=AttemptState.LOST
    ).update(state=AttemptState.RUNNING, ended_at=None, error_code="", error_message="")
    log.warning(
        "attempts_reclaimed",
        pilot_id=pilot_id,
        jobs=len(ids),
        first=ids[0],
        detail="the pilot was declared lost but came back: its attempts are its own again",
    )
    return len(ids), refused
